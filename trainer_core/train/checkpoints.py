"""Run-folder bookkeeping: saving and resuming checkpoints, file names, keep-last-K pruning, the latest state."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .. import __version__
from ..config import JobConfig
from ..errors import ConfigError
from ..fileio import atomic_write
from ..lora import load_lora_state, lora_file_name, lora_state_dict_comfy, save_lora_tensors
from ..regularizers import ema_lora_file_name, ema_lora_state_dict
from .experts import Expert
from .state_io import load_state, save_state

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
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
    pat = re.compile(rf"^{re.escape(name)}_(\d+)_(?:ema_)?(?:high|low)_noise\.safetensors$")
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
        doomed_files = [run_dir / state_file_name(step)]
        for expert in ("high", "low"):
            doomed_files.append(run_dir / lora_file_name(name, step, expert))
            doomed_files.append(run_dir / ema_lora_file_name(name, step, expert))
        for p in doomed_files:
            if p.exists():
                p.unlink()
                removed.append(p)
    return removed


def lora_metadata(cfg: JobConfig, base_model: str, step: int, expert: str) -> dict[str, str]:
    """Safetensors metadata of a saved LoRA: config, step, trigger word, base model, expert."""
    return {
        "training_config": cfg.model_dump_json(),
        "step": str(step),
        "trigger_word": cfg.trigger_word or "",
        "base_model": base_model,
        "expert": f"{expert}_noise",
        "trainer": f"wan22-lora-trainer {__version__}",
    }


@dataclass
class ExpertSnapshot:
    """What a checkpoint keeps of one expert, detached from its model (so it can travel between ranks)."""

    lora: dict[str, torch.Tensor]  # ComfyUI-native tensors, fp32
    state: dict[str, Any]  # optimizer, LR schedule, EMA, steps done (Expert.state_dict)
    ema_lora: dict[str, torch.Tensor] | None = None  # the EMA weights, same layout
    ema_decay: float = 0.0


def expert_snapshot(ex: Expert, cfg: JobConfig, cpu: bool = False) -> ExpertSnapshot:
    """Snapshot ``ex`` for :func:`save_checkpoint`; ``cpu`` copies every tensor to host memory (to send it)."""
    snap = ExpertSnapshot(
        lora=lora_state_dict_comfy(ex.model, cfg.lora, torch.float32),
        state=ex.state_dict(),
    )
    if ex.ema is not None:
        snap.ema_lora, snap.ema_decay = ema_lora_state_dict(ex.ema, cfg.lora, torch.float32), ex.ema.decay
    return _to_cpu(snap) if cpu else snap


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    if isinstance(obj, ExpertSnapshot):
        return ExpertSnapshot(_to_cpu(obj.lora), _to_cpu(obj.state), _to_cpu(obj.ema_lora), obj.ema_decay)
    return obj


def _in_dtype(lora: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The saved file's tensors: weights in ``dtype``, ``alpha`` stays fp32 (as lora_state_dict_comfy writes)."""
    return {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in lora.items()}


def save_checkpoint(
    cfg: JobConfig,
    base_model: str,
    experts: dict[str, ExpertSnapshot],
    progress: dict[str, Any],
    run_dir: Path,
) -> tuple[dict[str, Path], Path | None]:
    """Write each expert's LoRA (and EMA LoRA) in ComfyUI naming, the resumable state if enabled, and prune.

    ``experts`` are :func:`expert_snapshot` s; ``progress`` holds ``step``, ``epoch``, ``batch_pos`` and ``losses``
    (list of (step, expert, loss)).
    """
    step = int(progress["step"])
    dtype = _DTYPES[cfg.save.dtype]
    files = {}
    for name, snap in experts.items():
        meta = lora_metadata(cfg, base_model, step, name)
        files[name] = save_lora_tensors(
            run_dir / lora_file_name(cfg.name, step, name), _in_dtype(snap.lora, dtype), cfg.lora, meta
        )
        if snap.ema_lora is not None:
            save_lora_tensors(
                run_dir / ema_lora_file_name(cfg.name, step, name), _in_dtype(snap.ema_lora, dtype), cfg.lora,
                {**meta, "ema_decay": f"{snap.ema_decay:g}"},
            )
    state_path = None
    if cfg.save.save_training_state:
        state: dict[str, Any] = {
            "progress": {k: progress[k] for k in ("step", "epoch", "batch_pos", "dataset")},
            "losses": [list(x) for x in progress["losses"]],
            "experts": {n: snap.state for n, snap in experts.items()},
            "lora": {n: snap.lora for n, snap in experts.items()},
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        meta = {"training_config": cfg.model_dump_json(), "step": str(step)}
        state_path = save_state(run_dir / state_file_name(step), state, meta)
    lines = ["step,expert,loss"] + [f"{s},{e},{v:.8g}" for s, e, v in progress["losses"]]
    atomic_write(run_dir / "losses.csv", lambda p: p.write_text("\n".join(lines) + "\n"))
    prune_checkpoints(run_dir, cfg.name, cfg.save.keep_last)
    return files, state_path


def check_resume_compatible(path: Path, cfg: JobConfig) -> None:
    """Refuse a training state made with other LoRA or multi-stage settings (reads metadata only, before loading)."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "state_skeleton" not in meta:
        raise ConfigError(f"resume: {path} is not a training-state file of this trainer - point at {STATE_PREFIX}*")
    saved = json.loads(meta.get("training_config", "{}"))
    for key in ("lora", "multistage"):
        current = json.loads(getattr(cfg, key).model_dump_json())
        if saved.get(key) != current:
            raise ConfigError(
                f"resume: {path} was trained with {key} = {saved.get(key)}, but this config has {current} - "
                f"resume with the original {key} settings (or start a new run without 'resume')"
            )


def load_checkpoint(path: Path, cfg: JobConfig, experts: dict[str, Expert]) -> dict[str, Any]:
    """Restore LoRAs, optimizers, schedules, EMAs and RNG from a state file; return the saved progress."""
    state, _ = load_state(path)
    for name, ex in experts.items():
        load_lora_state(ex.model, state["lora"][name], cfg.lora)
        ex.load_state_dict(state["experts"][name])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    progress = dict(state["progress"])
    progress["losses"] = [(int(s), str(e), float(v)) for s, e, v in state["losses"]]
    return progress
