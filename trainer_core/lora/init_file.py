"""Continue training from an existing LoRA pair: ``lora.init_high`` / ``lora.init_low``.

The trained expert's adapter starts from exactly the file's weights: its output at step 0 is the base model plus
the file's LoRA as ComfyUI applies it. The file may have any format :mod:`.formats` reads, a lower rank than
``lora.rank`` (per module; the extra directions start fresh: ``lora_B`` zero, ``lora_A`` peft's random init, so
they train from the first step) and fewer modules than ``lora.target_modules`` (the others start fresh). A larger
rank or a target outside ``lora.target_modules`` is refused: either would drop part of the file. So is a file of
ComfyUI's own trainer holding full-weight differences or LoRAs outside the blocks (:mod:`.patches`): this trainer
trains and saves block LoRAs only, so those parts would be lost from every file the run saves.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import JobConfig
from ..errors import ConfigError, LoraFileError
from ..names import EXPERT_SUFFIX
from .formats import check_fits_config, expert_arch, pair_warnings, read_lora_file
from .io import load_lora_tensors, native_modules
from .patches import describe_patches, split_patches


def init_file(cfg: JobConfig, expert: str) -> str | None:
    """The LoRA file ``expert``'s adapter starts from (``lora.init_high`` / ``lora.init_low``), if any."""
    return cfg.lora.init_high if expert == "high" else cfg.lora.init_low


def check_lora_init(cfg: JobConfig) -> None:
    """Check the init files before any model loads (read whole: LoRA files are small): readable, a LoRA for these
    experts with finite values, within ``lora.rank`` and ``lora.target_modules``, and given only for experts that
    train."""
    for expert in EXPERT_SUFFIX:
        path = init_file(cfg, expert)
        if path is None:
            continue
        setting = f"lora.init_{expert}"
        if expert not in cfg.multistage.stages:
            raise ConfigError(
                f"{setting} is set but the {expert}-noise expert is not trained (multistage.train_"
                f"{EXPERT_SUFFIX[expert]}: false) - remove {setting} or train that expert"
            )
        tensors = read_lora_file(path, setting, arch=expert_arch(cfg.model, expert), expert=expert)
        tensors = _block_loras(tensors, setting, f"{setting}: {path}")
        ranks = {m: down.shape[0] for m, (down, _, _) in native_modules(tensors).items()}
        check_fits_config(ranks, cfg.lora, f"{setting}: {path}")


def init_warnings(cfg: JobConfig) -> list[str]:
    """One line when the init files' names say they are swapped, or one file starts both experts."""
    files = {e: Path(p) for e in EXPERT_SUFFIX if (p := init_file(cfg, e)) is not None}
    return pair_warnings(files, {e: f"lora.init_{e}" for e in EXPERT_SUFFIX})


def _block_loras(tensors: dict[str, torch.Tensor], setting: str, where: str) -> dict[str, torch.Tensor]:
    """The file's block LoRAs; a file that holds more (ComfyUI's trainer's differences and outer LoRAs) is refused."""
    adapter, patches = split_patches(tensors)
    if patches:
        raise LoraFileError(
            f"{where} holds {describe_patches(patches)}, as ComfyUI's own trainer saves them: training here cannot "
            f"continue from it (this trainer trains and saves block LoRAs only, so those parts would be lost) - "
            f"continue it with ComfyUI's Train LoRA node (existing_lora), or remove {setting} to train a new LoRA"
        )
    return adapter


def init_expert_lora(model: nn.Module, expert: str, cfg: JobConfig, adapter_name: str = "default") -> None:
    """Load ``expert``'s init file (if the job names one) into its freshly attached adapter ``adapter_name``."""
    path = init_file(cfg, expert)
    if path is None:
        return
    setting = f"lora.init_{expert}"
    where = f"{setting}: {path}"
    # check_lora_init read this file before (its warnings were said then)
    read = read_lora_file(path, setting, arch=dict(model.config), expert=expert, on_warning=lambda _: None)
    tensors = _block_loras(read, setting, where)
    check_fits_config({m: down.shape[0] for m, (down, _, _) in native_modules(tensors).items()}, cfg.lora, where)
    load_lora_tensors(model, tensors, cfg.lora, adapter_name, keep_init=True, source=where)
