"""Continue training from an existing LoRA pair: ``lora.init_high`` / ``lora.init_low``.

The trained expert's adapter starts from exactly the file's weights: its output at step 0 is the base model plus
the file's LoRA as ComfyUI applies it. The file may have any format :mod:`.formats` reads, a lower rank than
``lora.rank`` (per module; the extra directions start fresh: ``lora_B`` zero, ``lora_A`` peft's random init, so
they train from the first step) and fewer modules than ``lora.target_modules`` (the others start fresh). A larger
rank or a target outside ``lora.target_modules`` is refused: either would drop part of the file.
"""

from __future__ import annotations

from torch import nn

from ..config import JobConfig
from ..errors import ConfigError
from ..names import EXPERT_SUFFIX
from .formats import check_fits_config, expert_arch, read_lora_file
from .io import load_lora_tensors, native_modules


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
        ranks = {m: down.shape[0] for m, (down, _, _) in native_modules(tensors).items()}
        check_fits_config(ranks, cfg.lora, f"{setting}: {path}")


def init_expert_lora(model: nn.Module, expert: str, cfg: JobConfig, adapter_name: str = "default") -> None:
    """Load ``expert``'s init file (if the job names one) into its freshly attached adapter ``adapter_name``."""
    path = init_file(cfg, expert)
    if path is None:
        return
    setting = f"lora.init_{expert}"
    tensors = read_lora_file(path, setting, arch=dict(model.config), expert=expert)
    where = f"{setting}: {path}"
    check_fits_config({m: down.shape[0] for m, (down, _, _) in native_modules(tensors).items()}, cfg.lora, where)
    load_lora_tensors(model, tensors, cfg.lora, adapter_name, keep_init=True, source=where)
