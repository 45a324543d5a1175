"""Attach a trainable peft LoRA adapter to a diffusers ``WanTransformer3DModel``.

Only the Linear layers inside the transformer blocks are targeted (``trainer_core.keys.lora_target_regex``), so
every adapted module has an original-name counterpart that ComfyUI can patch. The base stays frozen; the LoRA
weights are kept in fp32 even when the base is bf16/fp16/quantized, so small updates are not rounded away.
"""

from __future__ import annotations

import peft
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import LoraConfig
from ..keys import lora_target_regex
from .dropout import use_global_batch_dropout

#: Parameter-name fragments of peft's LoRA weights (``...to_q.lora_A.<adapter>.weight``).
_LORA_PARAM_MARKERS = (".lora_A.", ".lora_B.")


def attach_lora(transformer: nn.Module, cfg: LoraConfig, adapter_name: str = "default") -> None:
    """Freeze ``transformer`` and add a LoRA adapter named ``adapter_name`` to its block Linears.

    ``r = cfg.rank``, ``lora_alpha = cfg.effective_alpha`` (forward scale alpha / rank), dropout ``cfg.dropout``
    (masks drawn per global batch: :mod:`.dropout`).
    ``lora_A`` gets peft's default Kaiming init and ``lora_B`` zeros, so the adapter starts as a no-op.
    """
    transformer.requires_grad_(False)
    transformer.add_adapter(
        peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.effective_alpha,
            lora_dropout=cfg.dropout,
            target_modules=lora_target_regex(cfg.target_modules),
            init_lora_weights=True,
        ),
        adapter_name=adapter_name,
    )
    for name, param in transformer.named_parameters():
        if _is_lora_param(name, adapter_name):
            # peft creates the adapter in the base layer's dtype; bf16 LoRA weights lose small updates.
            param.data = param.data.float()
            param.requires_grad_(True)
    use_global_batch_dropout(transformer, adapter_name)
    # Kept so that per-forward switches (trainer_core.train.step) need not walk thousands of modules each time.
    transformer.lora_layers = [m for m in transformer.modules() if isinstance(m, BaseTunerLayer)]


def detach_lora(transformer: nn.Module) -> None:
    """Remove every LoRA adapter: peft's layers go back to their base layers (the model is as before
    :func:`attach_lora`)."""
    if getattr(transformer, "peft_config", None):
        transformer.unload_lora()
    transformer.__dict__.pop("lora_layers", None)


def lora_parameters(transformer: nn.Module, adapter_name: str = "default") -> list[nn.Parameter]:
    """The trainable LoRA weights of ``adapter_name`` (what the optimizer gets), in a stable order."""
    params = [p for n, p in transformer.named_parameters() if _is_lora_param(n, adapter_name)]
    if not params:
        raise ValueError(f"the transformer has no LoRA adapter named {adapter_name!r}; call attach_lora first")
    return params


def _is_lora_param(name: str, adapter_name: str) -> bool:
    return any(m in name for m in _LORA_PARAM_MARKERS) and name.endswith(f".{adapter_name}.weight")

