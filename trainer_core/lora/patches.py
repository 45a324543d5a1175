"""The parts of a LoRA file that no adapter of this pack holds, applied to an expert as ComfyUI applies them.

ComfyUI's own trainer (comfy_extras/nodes_train.py) saves, beside the block LoRAs, full-weight differences of every
1-D weight (``.diff``: the norms) and every bias (``.diff_b``), and LoRAs on the layers outside the transformer blocks
(patch_embedding, the text and time embeddings, time_projection, head). A peft adapter here holds block LoRAs only
(:func:`trainer_core.lora.attach_lora`), so a render merges the rest into the expert's weights for its duration, the
way ComfyUI patches a weight (comfy/lora.py ``calculate_weight``): in float32, ``W + strength · (alpha / rank) ·
up @ down`` or ``W + strength · diff``, then back to the weight's dtype. The original tensors are put back after.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import LoraFileError
from ..keys import diffusers_module_to_original
from .fit import DIFF_PARTS, is_lora_target, listed
from .io import PREFIX

_NATIVE = re.compile(
    re.escape(PREFIX) + r"(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|diff|diff_b)$"
)


def split_patches(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ComfyUI-native ``tensors`` (as :func:`trainer_core.lora.read_lora_file` returns them) split into the block
    LoRAs an adapter of this pack holds and the weight patches a render merges (see the module notes)."""
    adapter, patches = {}, {}
    for key, t in tensors.items():
        m = _NATIVE.match(key)
        in_adapter = m is not None and m["part"] not in DIFF_PARTS and is_lora_target(m["module"])
        (adapter if in_adapter else patches)[key] = t
    return adapter, patches


def describe_patches(patches: dict[str, torch.Tensor]) -> str:
    """What weight patches hold, in a few words with examples (for messages)."""
    parts = {k: m for k in patches if (m := _NATIVE.match(k)) is not None}
    diffs = sorted(k.removeprefix(PREFIX) for k, m in parts.items() if m["part"] in DIFF_PARTS)
    loras = sorted({m["module"] for m in parts.values() if m["part"] not in DIFF_PARTS})
    said = [f"full-weight differences ({listed(diffs)})"] if diffs else []
    return " and ".join(said + ([f"LoRAs outside the transformer blocks' layers ({listed(loras)})"] if loras else []))


def _deltas(patches: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per original parameter name, its patch: ``(down, up, alpha)`` for a LoRA or ``(diff,)``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in patches.items():
        m = _NATIVE.match(key)
        if m is None:
            raise LoraFileError(f"LoRA tensor {key} is not in ComfyUI-native naming - read files with read_lora_file")
        parts.setdefault(m["module"], {})[m["part"]] = t
    deltas: dict[str, tuple[torch.Tensor, ...]] = {}
    for module, p in parts.items():
        if "lora_down.weight" in p:
            down = p["lora_down.weight"]
            alpha = p.get("alpha", torch.tensor(float(down.shape[0])))  # no alpha: scale 1, as ComfyUI
            deltas[f"{module}.weight"] = (down, p["lora_up.weight"], alpha)
        deltas |= {f"{module}.{param}": (p[part],) for part, param in DIFF_PARTS.items() if part in p}
    return deltas


def _patched(weight: torch.Tensor, delta: tuple[torch.Tensor, ...], strength: float) -> torch.Tensor:
    """``weight`` with ``delta`` added as ComfyUI adds it: in float32, returned in the weight's dtype."""
    w = weight.detach().to(torch.float32, copy=True)
    if len(delta) == 1:
        return (w + strength * delta[0].to(w.device, torch.float32)).to(weight.dtype)
    down, up, alpha = (t.to(w.device, torch.float32) for t in delta)
    scale = strength * (float(alpha) / down.shape[0])
    return (w + (scale * torch.mm(up.flatten(1), down.flatten(1))).reshape(w.shape)).to(weight.dtype)


def _parameters(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Original parameter name -> (the module holding it, its attribute), peft's layers resolved to their base."""
    found = {}
    for name, module in model.named_modules():
        try:
            original = diffusers_module_to_original(name)
        except KeyError:
            continue
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        found |= {f"{original}.{attr}": (base, attr) for attr in ("weight", "bias") if hasattr(base, attr)}
    return found


@contextlib.contextmanager
def merged_patches(model: nn.Module, patches: dict[str, torch.Tensor], strength: float, source: str) -> Iterator[None]:
    """Merge weight ``patches`` (split off by :func:`split_patches`) into ``model``'s weights at ``strength`` for the
    duration; the original tensors come back on exit, on the device the parameter is then on. ``source`` names
    the file in errors (a patch of a quantized weight cannot be merged)."""
    deltas = _deltas(patches)
    params = _parameters(model) if deltas else {}
    missing = sorted(p for p in deltas if p not in params)
    if missing:
        raise LoraFileError(f"{source} patches {listed(missing)}, missing from these experts - use a LoRA made for "
                            "this model")
    frozen = sorted(p for p in deltas if getattr(*params[p]) is None)
    if frozen:
        raise LoraFileError(f"{source} patches {listed(frozen)}, which these experts hold quantized - render it with "
                            "unquantized experts, or with ComfyUI's LoraLoaderModelOnly")
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.inference_mode(False), torch.no_grad():
            for param, delta in deltas.items():
                tensor = getattr(*params[param])
                saved[param] = tensor.data.to("cpu")  # a GPU expert keeps no second copy on the card
                tensor.data = _patched(tensor, delta, strength)
        yield
    finally:
        for param, original in saved.items():
            tensor = getattr(*params[param])
            tensor.data = original.to(tensor.device)
