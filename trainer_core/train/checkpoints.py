"""Run-folder bookkeeping: file names, periodic LoRA pairs, keep-last-K pruning, finding the latest state."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

STATE_PREFIX = "training_state_"
_STATE_RE = re.compile(rf"^{STATE_PREFIX}(\d+)\.safetensors$")


def state_file_name(step: int) -> str:
    """File name of the resumable training state written at ``step``."""
    return f"{STATE_PREFIX}{step:06d}.safetensors"


def list_states(run_dir: Path) -> list[tuple[int, Path]]:
    """Training-state files in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STATE_RE.match(p.name))]
    return sorted(found)


def resolve_resume(resume: str, run_dir: Path) -> Path:
    """Turn the ``resume`` setting ('latest', a state file, or a run folder) into a state file path."""
    if resume == "latest":
        states = list_states(run_dir)
        if not states:
            raise ConfigError(
                f"resume: 'latest' found no {STATE_PREFIX}*.safetensors in {run_dir} - "
                "train once with save.save_training_state on, or give the path of a state file"
            )
        return states[-1][1]
    path = Path(resume)
    if path.is_dir():
        states = list_states(path)
        if not states:
            raise ConfigError(f"resume: folder {path} holds no {STATE_PREFIX}*.safetensors - point at a state file")
        return states[-1][1]
    if not path.is_file():
        raise ConfigError(f"resume: {path} does not exist - give a {STATE_PREFIX}*.safetensors file or 'latest'")
    return path


def checkpoint_steps(run_dir: Path, name: str) -> list[int]:
    """Steps for which this job has LoRA files or states in ``run_dir``, oldest first."""
    pat = re.compile(rf"^{re.escape(name)}_(\d+)_(?:high|low)_noise\.safetensors$")
    steps = {int(m.group(1)) for p in run_dir.iterdir() if (m := pat.match(p.name))} if run_dir.is_dir() else set()
    steps |= {s for s, _ in list_states(run_dir)}
    return sorted(steps)


def prune_checkpoints(run_dir: Path, name: str, keep_last: int, protect: set[int] | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoint steps (LoRA pairs and states together); 0 keeps all."""
    if keep_last <= 0:
        return []
    steps = checkpoint_steps(run_dir, name)
    doomed = [s for s in steps[:-keep_last] if s not in (protect or set())]
    removed = []
    for step in doomed:
        for p in (
            run_dir / f"{name}_{step:06d}_high_noise.safetensors",
            run_dir / f"{name}_{step:06d}_low_noise.safetensors",
            run_dir / state_file_name(step),
        ):
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed
