"""Whether a LoRA file's patches fit a Wan text-to-video transformer, from shapes alone (no tensor is read).

A file is described by what it patches (:data:`Needs`): per original-named parameter (``blocks.0.self_attn.q.weight``,
``blocks.0.norm3.bias``) either a LoRA's ``(out, in)`` (ComfyUI reshapes ``up @ down`` to the weight: ``out`` must
be its rows and ``in`` the rest of it) or the exact shape of a full-weight difference (``.diff`` / ``.diff_b``). The
model is described by its parameters' shapes: :func:`wan_weight_shapes` of a ``WanTransformer3DModel`` config (this
pack's experts, before any weight loads) or a ComfyUI MODEL's own state dict (Apply Wan22 LoRA Pair). ComfyUI's
loader only logs a patch that does not fit and renders the base model; here it is refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from ..config import DEFAULT_LORA_TARGETS
from ..errors import LoraFileError

#: Original parameter name -> ``("lora", (out, in))`` or ``("diff", shape)``: what a file patches.
Needs = dict[str, tuple[str, tuple[int, ...]]]

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: Layers only image-to-video Wan models have (Wan 2.1 I2V's image cross-attention, in both namings).
_I2V_MARKERS = ("k_img", "v_img", "img_emb", "add_k_proj", "add_v_proj")
#: Transformer widths of the published Wan models, for naming the model a LoRA was made for.
_WIDTHS = {1536: "Wan 2.1 T2V 1.3B", 3072: "Wan 2.2 TI2V 5B", 5120: "a 14B Wan model (Wan 2.1 14B, Wan 2.2 A14B)"}
_MAX_LISTED = 3
#: A full-weight difference's tensor part (``<module>.diff`` / ``.diff_b``) -> the parameter of its module it patches.
DIFF_PARTS = {"diff": "weight", "diff_b": "bias"}


def listed(items: list[str]) -> str:
    """The first few ``items`` and how many more, for a one-line message."""
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def is_lora_target(module: str) -> bool:
    """Whether ``module`` is a LoRA target inside a transformer block (``blocks.N.self_attn.q`` ...): the layers a
    LoRA adapter of this pack holds."""
    return bool((b := _BLOCK.match(module)) and b.group(2) in DEFAULT_LORA_TARGETS)


def wan_weight_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    """Original-named weight and bias shapes (ComfyUI's WanModel names, ``blocks.0.self_attn.q.weight``) of the Wan
    text-to-video transformer whose ``WanTransformer3DModel`` config is ``arch``; modulation tables left out (no
    LoRA patches them)."""
    dim, ffn, patch = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"], arch["patch_size"]

    def linear(out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {"weight": (out, inp), "bias": (out,)}

    modules = {
        "patch_embedding": {"weight": (dim, arch["in_channels"], *patch), "bias": (dim,)},
        "text_embedding.0": linear(dim, arch["text_dim"]), "text_embedding.2": linear(dim, dim),
        "time_embedding.0": linear(dim, arch["freq_dim"]), "time_embedding.2": linear(dim, dim),
        "time_projection.1": linear(6 * dim, dim), "head.head": linear(arch["out_channels"] * math.prod(patch), dim),
    }
    block = {f"{attn}.{p}": linear(dim, dim) for attn in ("self_attn", "cross_attn") for p in "qkvo"}
    block |= {"ffn.0": linear(ffn, dim), "ffn.2": linear(dim, ffn)}
    norms = ("norm_q", "norm_k") if arch.get("qk_norm") else ()
    block |= {f"{attn}.{n}": {"weight": (dim,)} for attn in ("self_attn", "cross_attn") for n in norms}
    if arch.get("cross_attn_norm"):
        block["norm3"] = {"weight": (dim,), "bias": (dim,)}
    for i in range(arch["num_layers"]):
        modules |= {f"blocks.{i}.{name}": params for name, params in block.items()}
    return {f"{module}.{p}": shape for module, params in modules.items() for p, shape in params.items()}


#: Every parameter name a Wan text-to-video transformer may have, with block 0 standing for every block.
_ANY_WAN = frozenset(wan_weight_shapes({
    "num_attention_heads": 1, "attention_head_dim": 1, "ffn_dim": 1, "patch_size": (1, 1, 1), "in_channels": 1,
    "out_channels": 1, "text_dim": 1, "freq_dim": 1, "num_layers": 1, "qk_norm": True, "cross_attn_norm": True,
}))


def _is_wan_param(name: str) -> bool:
    return _BLOCK.sub(r"blocks.0.\2", name) in _ANY_WAN


def _module(param: str) -> str:
    return param.rsplit(".", 1)[0]


def check_layers(params: Iterable[str], where: str) -> None:
    """Refuse patches (original parameter names) of image-to-video layers and names no Wan text-to-video transformer
    has (ComfyUI's loader skips those keys and renders the base model there); ``where`` starts every message."""
    params = list(params)
    modules = sorted({_module(p) for p in params})
    i2v = [m for m in modules if any(x in m for x in _I2V_MARKERS)]
    if i2v:
        raise LoraFileError(f"{where} was made for an image-to-video Wan model: it adapts {listed(i2v)} (image "
                            "cross-attention), which the text-to-video experts do not have - use a T2V LoRA")
    unknown = sorted({_module(p) for p in params if not _is_wan_param(p)})
    if unknown and len(unknown) == len(modules):
        raise LoraFileError(f"{where} holds no Wan 2.2 LoRA: none of its modules ({listed(unknown)}) is a layer of a "
                            "Wan transformer - pick a LoRA trained for Wan 2.2 T2V A14B")
    if unknown:
        raise LoraFileError(f"{where} adapts {listed(unknown)}, which a Wan text-to-video transformer does not have "
                            "(ComfyUI's loader skips those keys) - use a LoRA made for Wan 2.2 T2V A14B")


def _fits(need: tuple[str, tuple[int, ...]], shape: tuple[int, ...]) -> bool:
    kind, wanted = need
    if kind == "diff":
        return wanted == shape
    return len(shape) >= 2 and wanted == (shape[0], math.prod(shape[1:]))


def _file_width(param: str, need: tuple[str, tuple[int, ...]]) -> int | None:
    """The transformer width a patch of a block layer was made for (None where its shape does not tell)."""
    kind, shape = need
    module = _module(param)
    if kind == "lora" and is_lora_target(module):
        return shape[0] if module.endswith("ffn.2") else shape[1]
    if kind == "diff" and _BLOCK.match(param) and len(shape) == 1 and not module.endswith("ffn.0"):
        return shape[0]
    return None


def _refuse_size(param: str, need: tuple[str, tuple[int, ...]], shapes: dict, where: str, target: str) -> None:
    """Refuse a patch of another shape than ``target``'s parameter, naming the model size it was made for."""
    have, wanted = shapes[param], "x".join(map(str, need[1]))
    here = "x".join(map(str, have if need[0] == "diff" else (have[0], math.prod(have[1:]))))
    width, file_width = shapes["patch_embedding.weight"][0], _file_width(param, need)
    if file_width not in (None, width):
        made_for = f"{_WIDTHS[file_width]}, " if file_width in _WIDTHS else ""
        raise LoraFileError(
            f"{where} was made for a model of another size ({made_for}width {file_width}; {target}: {width}): "
            f"{_module(param)} is {wanted} in the file but {here} here - use a LoRA trained for Wan 2.2 T2V A14B "
            "(or Wan 2.1 T2V 14B)"
        )
    raise LoraFileError(f"{where} does not fit {target}: {param} is {wanted} in the file but {here} here - use a LoRA "
                        "made for this model")


def check_fit(needs: Needs, shapes: dict[str, tuple[int, ...]], where: str, target: str = "these experts") -> None:
    """Refuse a file made for another model than the one whose parameters have ``shapes`` (original names): input
    channels (image-to-video), width (1.3B, 5B), block count, or any patch another shape than its parameter.
    ``target`` names that model in messages."""
    patch, embedding = needs.get("patch_embedding.weight"), shapes.get("patch_embedding.weight")
    blocks = 1 + max((int(b.group(1)) for p in shapes if (b := _BLOCK.match(p))), default=-1)
    if embedding is None or blocks == 0:
        raise LoraFileError(f"{where}: {target} is not a Wan transformer (no patch_embedding or blocks) - use a Wan "
                            "2.2 T2V expert")
    per_channel = math.prod(embedding[2:])
    if patch is not None and patch[0] == "lora" and patch[1][1] != embedding[1] * per_channel:
        raise LoraFileError(
            f"{where} was made for a model taking {patch[1][1] // per_channel} latent channels (Wan image-to-video: "
            f"36; {target}: {embedding[1]}) - use a LoRA trained for Wan 2.2 T2V"
        )
    wrong = [p for p, need in needs.items() if p in shapes and not _fits(need, shapes[p])]
    if wrong:  # first: a width names the model the file was made for
        sized = [p for p in wrong if _file_width(p, needs[p]) is not None]
        param = (sized or wrong)[0]
        _refuse_size(param, needs[param], shapes, where, target)
    beyond = sorted({int(b.group(1)) for p in needs if (b := _BLOCK.match(p)) and int(b.group(1)) >= blocks})
    if beyond:
        raise LoraFileError(f"{where} adapts block {beyond[-1]}, beyond the {blocks} blocks of {target} (Wan 14B: "
                            "40, 1.3B: 30) - use a LoRA made for this model")
    missing = sorted(p for p in needs if p not in shapes)
    if missing:
        raise LoraFileError(f"{where} patches {listed(missing)}, missing from {target} - use a LoRA made for this "
                            "model")

