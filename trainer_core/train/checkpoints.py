"""Checkpoints: writing a run's LoRA pairs and resumable states (never a non-finite one), and restoring them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config import JobConfig
from ..errors import TrainingDiverged
from ..lora import load_lora_state, lora_file_name, lora_state_dict_comfy, save_lora_tensors
from ..names import DTYPES, TRAINER
from ..regularizers import ema_lora_file_name, ema_lora_state_dict
from .experts import Expert
from .resume import apply_hyperparameters
from .runs import RunFolder, state_file_name, write_losses
from .state_io import load_state, save_state


def lora_metadata(cfg: JobConfig, base_model: str, step: int, expert: str, run_id: str = "") -> dict[str, str]:
    """Safetensors metadata of a saved LoRA: config, step, trigger word, base model, expert, the run's id."""
    return {
        "training_config": cfg.model_dump_json(),
        "step": str(step),
        "run_id": run_id,
        "trigger_word": cfg.trigger_word or "",
        "base_model": base_model,
        "expert": f"{expert}_noise",
        "trainer": f"{TRAINER} {__version__}",
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


def _non_finite(snap: ExpertSnapshot) -> str | None:
    """The first LoRA weight or optimizer moment of ``snap`` that is NaN/Inf, by name, or None."""
    tensors = [(f"LoRA {k}", v) for k, v in snap.lora.items()]
    for i, st in snap.state["optimizer"]["state"].items():
        tensors += [(f"optimizer state {i}.{k}", v) for k, v in st.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    for name, t in tensors:
        if not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(
    cfg: JobConfig,
    base_model: str,
    experts: dict[str, ExpertSnapshot],
    progress: dict[str, Any],
    run: RunFolder,
) -> tuple[dict[str, Path], Path | None]:
    """Write each expert's LoRA (and EMA LoRA) in ComfyUI naming, the resumable state if enabled, and
    ``losses.csv`` into the run's folder, record them in its manifest and prune its older checkpoints.

    ``experts`` are :func:`expert_snapshot` s; ``progress`` holds ``step``, ``epoch``, ``batch_pos``, ``dataset``,
    ``losses`` (list of (step, expert, loss)) and optionally ``validation`` (the same, of validation losses). A
    snapshot holding a NaN/Inf weight or optimizer moment is refused (:class:`TrainingDiverged`) before anything is
    written.
    """
    step = int(progress["step"])
    for name, snap in experts.items():
        bad = _non_finite(snap)
        if bad is not None:
            raise TrainingDiverged(f"the {name}-noise expert's {bad} became NaN/Inf by step {step}; nothing was "
                                   "saved for it")
    dtype = DTYPES[cfg.save.dtype]
    files, written = {}, []
    for name, snap in experts.items():
        meta = lora_metadata(cfg, base_model, step, name, run.run_id)
        files[name] = save_lora_tensors(
            run.path / lora_file_name(cfg.name, step, name), _in_dtype(snap.lora, dtype), cfg.lora, meta
        )
        written.append(files[name])
        if snap.ema_lora is not None:
            written.append(save_lora_tensors(
                run.path / ema_lora_file_name(cfg.name, step, name), _in_dtype(snap.ema_lora, dtype), cfg.lora,
                {**meta, "ema_decay": f"{snap.ema_decay:g}"},
            ))
    state_path = None
    if cfg.save.save_training_state:
        state: dict[str, Any] = {
            "progress": {k: progress[k] for k in ("step", "epoch", "batch_pos", "dataset")},
            "losses": [list(x) for x in progress["losses"]],
            "validation": [list(x) for x in progress.get("validation", [])],
            "experts": {n: snap.state for n, snap in experts.items()},
            "lora": {n: snap.lora for n, snap in experts.items()},
            "rng": {"torch": torch.get_rng_state()},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
        meta = {"training_config": cfg.model_dump_json(), "step": str(step), "run_id": run.run_id}
        state_path = save_state(run.path / state_file_name(step), state, meta)
        written.append(state_path)
    write_losses(run.path, progress["losses"], progress.get("validation", []))
    run.record_checkpoint(step, written, cfg.save.keep_last)
    return files, state_path


def load_checkpoint(path: Path, cfg: JobConfig, experts: dict[str, Expert]) -> dict[str, Any]:
    """Restore LoRAs, optimizers, schedules, EMAs and RNG from a state file; return the saved progress."""
    state, _ = load_state(path)
    for name, ex in experts.items():
        load_lora_state(ex.model, state["lora"][name], cfg.lora)
        ex.load_state_dict(state["experts"][name])
        apply_hyperparameters(ex.optimizer, ex.scheduler, cfg.optimizer, ex.steps_done)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    progress = dict(state["progress"])
    for key in ("losses", "validation"):  # a state from before validation losses has none
        progress[key] = [(int(s), str(e), float(v)) for s, e, v in state.get(key, [])]
    return progress
