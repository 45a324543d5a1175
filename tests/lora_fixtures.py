"""(Helpers, no tests.) Tiny Wan LoRA files in every format the pack reads, and ComfyUI's patch semantics.

Shared by ``tests/test_lora_formats.py`` and the out-of-suite comparison against ComfyUI itself
(``/work/comfy/compare_lora_formats.py``). Each format file holds the same kind of random LoRA for the tiny preset;
:func:`write_lora` returns, per module, the weights as stored and the scale ComfyUI applies (alpha / rank, 1 without
alpha), so :func:`comfy_patch` states ``LoraLoaderModelOnly``'s result independently of the pack's reader.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from trainer_core.config import DEFAULT_LORA_TARGETS, LoraConfig
from trainer_core.keys import LORA_TARGET_TO_DIFFUSERS
from trainer_core.lora import attach_lora, lora_parameters

#: format -> what it imitates.
FORMATS: dict[str, str] = {
    "comfyui": "ComfyUI / this trainer: diffusion_model.<module>.lora_down/lora_up + alpha",
    "comfyui_no_alpha": "the same without .alpha (scale 1)",
    "aitoolkit": "ai-toolkit Wan 2.2: diffusion_model.<module>.lora_A/lora_B, no alpha",
    "peft_default": "peft's own state dict: diffusion_model.<module>.lora_A.default/lora_B.default, no alpha",
    "diffusers": "diffusers/peft: transformer.<diffusers module>.lora_A/lora_B",
    "kohya": "kohya/musubi: lora_unet_<module>.lora_down/lora_up + alpha, bf16",
    "per_module_rank": "ComfyUI naming, rank and alpha differing per module, some modules absent",
}
#: A module's LoRA as stored: (down [r, in], up [out, r], alpha or None).
Stored = tuple[torch.Tensor, torch.Tensor, "float | None"]


def target_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """``blocks.N.<target>`` -> (out, in) of the tiny (or any) Wan transformer config ``arch``."""
    dim, ffn = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"]
    per = {t: (dim, dim) for t in DEFAULT_LORA_TARGETS} | {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    return {f"blocks.{i}.{t}": s for i in range(arch["num_layers"]) for t, s in per.items()}


def _modules(fmt: str, arch: dict, seed: int) -> dict[str, Stored]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Stored] = {}
    for k, (module, (o, i)) in enumerate(target_shapes(arch).items()):
        rank, alpha = 4, {"comfyui": 2.0, "kohya": 8.0}.get(fmt)
        if fmt == "per_module_rank":
            if k % 5 == 4:
                continue  # a module the file leaves out
            rank, alpha = 2 + k % 4, [1.0, 3.0, None, 16.0][k % 4]
        down = torch.randn(rank, i, generator=gen) * 0.1
        up = torch.randn(o, rank, generator=gen) * 0.1
        if fmt == "kohya":
            down, up = down.bfloat16(), up.bfloat16()
        out[module] = (down, up, alpha)
    return out


def _key_base(fmt: str, module: str) -> str:
    if fmt == "kohya":
        return "lora_unet_" + module.replace(".", "_")
    if fmt == "diffusers":
        block, target = module.split(".", 2)[1], module.split(".", 2)[2]
        return f"transformer.blocks.{block}.{LORA_TARGET_TO_DIFFUSERS[target]}"
    return f"diffusion_model.{module}"


def lora_state_dict(fmt: str, modules: dict[str, Stored]) -> dict[str, torch.Tensor]:
    """The tensors of a file in format ``fmt`` holding ``modules``."""
    down_up = {"aitoolkit": (".lora_A.weight", ".lora_B.weight"), "diffusers": (".lora_A.weight", ".lora_B.weight"),
               "peft_default": (".lora_A.default.weight", ".lora_B.default.weight")}.get(
        fmt, (".lora_down.weight", ".lora_up.weight"))
    sd = {}
    for module, (down, up, alpha) in modules.items():
        base = _key_base(fmt, module)
        sd[base + down_up[0]], sd[base + down_up[1]] = down.contiguous(), up.contiguous()
        if alpha is not None and fmt != "comfyui_no_alpha":
            sd[base + ".alpha"] = torch.tensor(alpha)
    return sd


def write_lora(fmt: str, path: str | Path, arch: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor,
                                                                                      float]]:
    """Write a random LoRA for ``arch`` in format ``fmt``; returns ``{module: (down, up, scale)}`` in float64 with
    the scale ComfyUI applies (alpha / rank; 1 without alpha)."""
    modules = _modules(fmt, arch, seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(fmt, modules), str(path))
    expected = {}
    for module, (down, up, alpha) in modules.items():
        scale = alpha / down.shape[0] if alpha is not None and fmt != "comfyui_no_alpha" else 1.0
        expected[module] = (down.double(), up.double(), scale)
    return expected


def write_diffusers_with_metadata(path: str | Path, arch: dict, lora_alpha: float, seed: int = 0) -> dict:
    """A diffusers-named file whose ``lora_adapter_metadata`` carries ``lora_alpha`` (diffusers' save_lora_weights);
    returns the expected modules with diffusers' scale lora_alpha / r."""
    modules = _modules("diffusers", arch, seed)
    meta = {"transformer.r": 4, "transformer.lora_alpha": lora_alpha}
    save_file(lora_state_dict("diffusers", modules), str(path), metadata={"lora_adapter_metadata": json.dumps(meta)})
    return {m: (d.double(), u.double(), lora_alpha / d.shape[0]) for m, (d, u, _) in modules.items()}


def comfy_patch(weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: float, strength: float = 1.0
                ) -> torch.Tensor:
    """LoraLoaderModelOnly's patched weight, written out in float64: W + strength · scale · up @ down."""
    return weight.double() + strength * scale * (up.double() @ down.double())


def comfy_trainer_lora(weights: dict[str, torch.Tensor], seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA as ComfyUI's own trainer saves one (comfy_extras/nodes_train.py): for every weight of the model
    (``weights``: original names) with 2+ dims a LoRA (down/up/alpha), for every other weight a full difference
    ``.diff``, for every bias a ``.diff_b``; random values, alpha 2."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in weights.items():
        module, kind = key.rsplit(".", 1)
        base = f"diffusion_model.{module}"
        if kind == "bias":
            out[base + ".diff_b"] = torch.randn(w.shape, generator=gen) * 0.05
        elif kind == "weight" and w.ndim >= 2:
            out[base + ".lora_down.weight"] = torch.randn(rank, w[0].numel(), generator=gen) * 0.1
            out[base + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=gen) * 0.1
            out[base + ".alpha"] = torch.tensor(2.0)
        elif kind == "weight":
            out[base + ".diff"] = torch.randn(w.shape, generator=gen) * 0.05
    return out


def comfy_patched(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float = 1.0
                  ) -> dict[str, torch.Tensor]:
    """ComfyUI's patched weights (comfy/lora.py ``calculate_weight``), written out in float64: per LoRA
    W + strength · (alpha / rank) · (up @ down reshaped to W), per difference W + strength · diff."""
    out = {k: v.double() for k, v in weights.items()}
    for key, t in lora.items():
        name = key.removeprefix("diffusion_model.")
        if name.endswith(".diff_b"):
            out[name.removesuffix(".diff_b") + ".bias"] += strength * t.double()
        elif name.endswith(".diff"):
            out[name.removesuffix(".diff") + ".weight"] += strength * t.double()
        elif name.endswith(".lora_up.weight"):
            module = name.removesuffix(".lora_up.weight")
            down = lora[f"diffusion_model.{module}.lora_down.weight"].double()
            alpha = float(lora.get(f"diffusion_model.{module}.alpha", down.shape[0]))
            w = out[module + ".weight"]
            out[module + ".weight"] = w + strength * alpha / down.shape[0] * (t.double() @ down).reshape(w.shape)
    return out


def with_random_lora(base: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> torch.nn.Module:
    """A copy of ``base`` with a LoRA of ``cfg`` whose weights are all random (a fresh LoRA is a no-op)."""
    model = copy.deepcopy(base)
    attach_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model
