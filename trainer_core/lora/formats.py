"""Wan LoRA files of the common trainers, read as ComfyUI's ``LoraLoaderModelOnly`` reads them.

One reader for every format, returning ComfyUI-native tensors (``diffusion_model.<module>.lora_down.weight`` /
``lora_up.weight`` / ``alpha``, modules in original Wan naming). Formats (key naming from
:func:`trainer_core.keys.parse_lora_key`):

* ComfyUI / original Wan: ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` with an
  optional scalar ``.alpha`` (this trainer's and ComfyUI's own trainer's files);
* ``lora_A`` / ``lora_B`` under the same names (ai-toolkit's Wan 2.2 output), or under diffusers' names
  ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (diffusers / peft; ComfyUI maps no Wan key of this naming, so
  these are read as diffusers reads them, with ``lora_alpha`` from diffusers' ``lora_adapter_metadata`` if present);
* kohya / musubi-tuner: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` with ``.alpha``.

ComfyUI's rules (comfy/lora.py ``load_lora``, comfy/weight_adapter/lora.py): per module, patched weight =
``W + strength · (alpha / rank) · up @ down`` with ``rank = down.shape[0]`` (so the rank may differ per module),
and scale 1 when the module has no alpha. The returned dict always carries an alpha (``rank`` where the file has
none: the same scale 1).

Every check that can be made from the safetensors header (key names, shapes, ranks) runs before any tensor is read:
a file for another model (Wan 2.1 1.3B or 5B widths, image-to-video layers or input channels, more blocks) or with
layers this pack does not apply (LyCORIS, DoRA, ``.diff`` patches, modules outside the transformer blocks) is
refused by name, saying what to do.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import DEFAULT_LORA_TARGETS, LoraConfig, ModelConfig
from ..errors import LoraFileError
from ..keys import parse_lora_key
from ..names import EXPERT_SUFFIX
from .io import PREFIX, native_modules

#: The naming of each format, as error messages and logs describe it.
NAMINGS = {
    "comfyui": "ComfyUI (diffusion_model.<module>)",
    "kohya": "kohya/musubi (lora_unet_<module>)",
    "diffusers": "diffusers/peft (transformer.<module>)",
}
FORMATS_HELP = (
    "diffusion_model.blocks.N.<module>.lora_down/lora_up(.alpha) or .lora_A/lora_B, "
    "lora_unet_blocks_N_<module>.lora_down/lora_up/alpha, or transformer.blocks.N.<diffusers module>.lora_A/lora_B"
)
_BLOCK_MODULE = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: Layers only image-to-video Wan models have (Wan 2.1 I2V's image cross-attention, in both namings).
_I2V_MARKERS = ("k_img", "v_img", "img_emb", "add_k_proj", "add_v_proj")
#: Tensor-name endings of adapters ComfyUI applies but this pack does not, -> what they are.
_OTHER_ADAPTERS = {
    r"\.hada_\w+$": "LoHa", r"\.lokr_\w+$": "LoKr", r"\.dora_scale$": "DoRA",
    r"\.lora_mid\.weight$": "LoCon mid weights",
    r"\.diff(_b)?$": "full-weight difference (.diff/.diff_b)", r"\.set_weight$": "weight replacement (.set_weight)",
    r"\.w_norm$": "norm weights (.w_norm)", r"\.b_norm$": "norm biases (.b_norm)",
}
#: Transformer widths of the published Wan models, for naming the model a LoRA was made for.
_WIDTHS = {1536: "Wan 2.1 T2V 1.3B", 3072: "Wan 2.2 TI2V 5B", 5120: "a 14B Wan model (Wan 2.1 14B, Wan 2.2 A14B)"}
_MAX_LISTED = 3


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a LoRA file, from the header: its rank, the weight shape it patches and its keys."""

    rank: int
    out_features: int
    in_features: int
    keys: dict[str, str]  # part ("down", "up", "alpha") -> tensor name in the file


@dataclass
class LoraFileInfo:
    """What the header of a LoRA file says: the naming and, per module (original Wan name), its rank and shape."""

    path: Path
    where: str  # "<setting>: <path>", the start of every message about this file
    naming: str
    modules: dict[str, LoraModule]
    metadata_alpha: float | None = None  # diffusers' lora_adapter_metadata alpha (files without alpha keys)


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _header(path: Path, where: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a .safetensors file, from its header only."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LoraFileError(f"{where} {what} - give the path of a LoRA .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(
            f"{where} is not a readable .safetensors file ({exc}) - download or save it again"
        ) from None
    if not shapes:
        raise LoraFileError(f"{where} holds no tensors - pick a LoRA file")
    return shapes, metadata


def _refuse_unknown(unknown: list[str], where: str) -> None:
    kinds = sorted({kind for k in unknown for suffix, kind in _OTHER_ADAPTERS.items() if re.search(suffix, k)})
    if kinds:
        raise LoraFileError(
            f"{where} holds {', '.join(kinds)} tensors ({_listed(unknown)}), which this pack does not apply - "
            "render this file with ComfyUI's LoraLoaderModelOnly, or use a plain LoRA"
        )
    raise LoraFileError(
        f"{where} is not a Wan LoRA in a format ComfyUI reads: {len(unknown)} key(s) such as {_listed(unknown)} "
        f"match none of {FORMATS_HELP} - use a LoRA trained for Wan 2.2 T2V A14B (or Wan 2.1 T2V 14B)"
    )


def _is_target(module: str) -> bool:
    """Whether ``module`` is a LoRA target inside a transformer block (``blocks.N.self_attn.q`` ...)."""
    return bool((b := _BLOCK_MODULE.match(module)) and b.group(2) in DEFAULT_LORA_TARGETS)


def _modules(shapes: dict[str, tuple[int, ...]], where: str) -> tuple[str, dict[str, LoraModule]]:
    """Group the file's keys per module and check each module's down/up/alpha shapes against one another."""
    parsed = {k: parse_lora_key(k) for k in shapes}
    unknown = sorted(k for k, p in parsed.items() if p is None)
    if unknown:
        _refuse_unknown(unknown, where)
    namings = sorted({p[2] for p in parsed.values()})
    if len(namings) > 1:
        raise LoraFileError(f"{where} mixes key namings ({', '.join(NAMINGS[n] for n in namings)}) - use a file "
                            "saved by one tool")
    grouped: dict[str, dict[str, str]] = {}
    for key, (module, part, _) in parsed.items():
        if part in grouped.setdefault(module, {}):
            raise LoraFileError(f"{where} has two {part} tensors for {module} ({grouped[module][part]}, {key}) - "
                                "use a file saved by one tool")
        grouped[module][part] = key
    if not any(_is_target(m) for m in grouped):
        raise LoraFileError(
            f"{where} holds no Wan 2.2 LoRA: none of its modules ({_listed(sorted(grouped))}) is an attention or "
            "feed-forward layer of a Wan transformer block - pick a LoRA trained for Wan 2.2 T2V A14B"
        )
    modules = {}
    for module, keys in sorted(grouped.items()):
        if "down" not in keys or "up" not in keys:
            raise LoraFileError(f"{where} has no {'up' if 'down' in keys else 'down'} weight for {module} "
                                f"(only {_listed(sorted(keys.values()))}); the file is incomplete - save it again")
        down, up = shapes[keys["down"]], shapes[keys["up"]]
        if len(down) < 2 or len(up) < 2 or math.prod(up[1:]) != down[0] or down[0] < 1:
            raise LoraFileError(f"{where} has down {list(down)} and up {list(up)} for {module}, which do not form a "
                                "LoRA (down [rank, in], up [out, rank]); the file is damaged")
        if "alpha" in keys and math.prod(shapes[keys["alpha"]]) != 1:
            raise LoraFileError(f"{where} has a non-scalar alpha {keys['alpha']} {list(shapes[keys['alpha']])}; "
                                "the file is damaged - save it again")
        modules[module] = LoraModule(down[0], up[0], math.prod(down[1:]), keys)
    return namings[0], modules


def lora_target_shapes(arch: dict) -> dict[str, tuple[int, int]]:
    """``blocks.N.<target>`` -> ``(out_features, in_features)`` of every LoRA target of a Wan transformer whose
    ``WanTransformer3DModel`` config is ``arch``."""
    dim, ffn = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"]
    per_target = {t: (dim, dim) for t in DEFAULT_LORA_TARGETS} | {"ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    return {f"blocks.{i}.{t}": s for i in range(arch["num_layers"]) for t, s in per_target.items()}


def _model_width(module: str, m: LoraModule) -> int:
    return m.out_features if module.endswith("ffn.2") else m.in_features


def _check_wan_layers(modules: dict[str, LoraModule], where: str) -> None:
    """Refuse image-to-video layers and modules outside the blocks' attention and feed-forward layers."""
    i2v = [m for m in modules if any(x in m for x in _I2V_MARKERS)]
    if i2v:
        raise LoraFileError(f"{where} was made for an image-to-video Wan model: it adapts {_listed(i2v)} (image "
                            "cross-attention), which the text-to-video experts do not have - use a T2V LoRA")
    outside = [m for m in modules if not _is_target(m)]
    if outside:
        raise LoraFileError(
            f"{where} adapts {_listed(outside)}, outside the attention and feed-forward layers of the transformer "
            "blocks (the only layers this pack applies LoRAs to) - render this file with ComfyUI's "
            "LoraLoaderModelOnly"
        )


def _check_model_fit(modules: dict[str, LoraModule], arch: dict, where: str) -> None:
    """Refuse a file made for another model: input channels (I2V), width (1.3B, 5B) or block count."""
    patch = modules.get("patch_embedding")
    per_channel = math.prod(arch["patch_size"])
    if patch is not None and patch.in_features != arch["in_channels"] * per_channel:
        raise LoraFileError(
            f"{where} was made for a model taking {patch.in_features // per_channel} latent channels (Wan "
            f"image-to-video: 36) but these experts take {arch['in_channels']} - use a LoRA trained for Wan 2.2 T2V"
        )
    expected = lora_target_shapes(arch)
    width = arch["num_attention_heads"] * arch["attention_head_dim"]
    wrong = [m for m, mod in modules.items() if m in expected and (mod.out_features, mod.in_features) != expected[m]]
    if wrong:
        m, mod = wrong[0], modules[wrong[0]]
        file_width = _model_width(m, mod)
        made_for = f"{_WIDTHS[file_width]}, " if file_width in _WIDTHS else ""
        raise LoraFileError(
            f"{where} was made for a model of another size ({made_for}width {file_width}; these experts: {width}): "
            f"{m} is {mod.out_features}x{mod.in_features} in the file but {expected[m][0]}x{expected[m][1]} here - "
            "use a LoRA trained for Wan 2.2 T2V A14B (or Wan 2.1 T2V 14B)"
        )
    blocks = {int(b.group(1)) for m in modules if (b := _BLOCK_MODULE.match(m))}
    beyond = sorted(blocks - set(range(arch["num_layers"])))
    if beyond:
        raise LoraFileError(f"{where} adapts block {beyond[-1]} but these experts have {arch['num_layers']} blocks "
                            "(Wan 14B: 40, 1.3B: 30) - use a LoRA made for this model")


def _metadata_alpha(metadata: dict[str, str], naming: str, where: str) -> float | None:
    """diffusers' ``lora_alpha`` for a diffusers-named file without alpha keys (peft's scale lora_alpha / r)."""
    raw = metadata.get("lora_adapter_metadata")
    if naming != "diffusers" or not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise LoraFileError(f"{where} has unreadable lora_adapter_metadata - save the file again") from None
    if meta.get("transformer.use_rslora") or meta.get("transformer.alpha_pattern"):
        raise LoraFileError(f"{where} uses rsLoRA or per-module alphas (lora_adapter_metadata), which this pack "
                            "does not read - render it with diffusers, or save it with one alpha")
    alpha = meta.get("transformer.lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else None


def inspect_lora_file(
    path: str | os.PathLike, setting: str, *, arch: dict | None = None, expert: str | None = None
) -> LoraFileInfo:
    """Check a LoRA file from its header alone (no tensor is read) and describe it.

    ``arch`` (the experts' ``WanTransformer3DModel`` config) also checks it fits those experts; ``expert``
    (``high`` / ``low``) refuses a file whose ``expert`` metadata (this trainer's) names the other one. ``setting``
    names the input in every message. Raises :class:`LoraFileError`.
    """
    path = Path(path).expanduser()
    where = f"{setting}: {path}"
    shapes, metadata = _header(path, where)
    if "state_skeleton" in metadata:
        raise LoraFileError(f"{where} is a training state of this trainer, not a LoRA - pick the "
                            "<name>_<step>_high_noise / _low_noise.safetensors files beside it")
    made_for = metadata.get("expert", "").removesuffix("_noise")
    if expert is not None and made_for in EXPERT_SUFFIX and made_for != expert:
        raise LoraFileError(f"{where} was trained for the {made_for}-noise expert, not the {expert}-noise one - swap "
                            "the high and low LoRA files")
    naming, modules = _modules(shapes, where)
    if arch is not None:
        _check_model_fit(modules, arch, where)
    _check_wan_layers(modules, where)
    return LoraFileInfo(path, where, naming, modules, _metadata_alpha(metadata, naming, where))


def read_lora_file(
    path: str | os.PathLike, setting: str, *, arch: dict | None = None, expert: str | None = None
) -> dict[str, torch.Tensor]:
    """A LoRA file of any format read (see the module notes) as ComfyUI-native tensors: per module
    ``diffusion_model.<module>.lora_down.weight`` / ``lora_up.weight`` (the file's dtype) and ``alpha`` (float32
    scalar; the rank where the file has none). :func:`inspect_lora_file`'s checks run first."""
    info = inspect_lora_file(path, setting, arch=arch, expert=expert)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(info.path), framework="pt") as fh:
        for module, m in info.modules.items():
            down, up = (fh.get_tensor(m.keys[p]) for p in ("down", "up"))
            if not (torch.isfinite(down.float()).all() and torch.isfinite(up.float()).all()):
                raise LoraFileError(f"{info.where} holds NaN/Inf values in {module} - use another file")
            # ComfyUI reads alpha with .item() and computes alpha / rank; no alpha is scale 1 (alpha = rank)
            alpha = fh.get_tensor(m.keys["alpha"]).float().reshape(()) if "alpha" in m.keys else None
            if alpha is None:
                scale_1 = float(m.rank) if info.metadata_alpha is None else info.metadata_alpha
                alpha = torch.tensor(scale_1, dtype=torch.float32)
            if not torch.isfinite(alpha):
                raise LoraFileError(f"{info.where} has a NaN/Inf alpha for {module} - use another file")
            out[f"{PREFIX}{module}.lora_down.weight"] = _matrix(down)
            out[f"{PREFIX}{module}.lora_up.weight"] = _matrix(up)
            out[f"{PREFIX}{module}.alpha"] = alpha
    return out


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D LoRA weight in a dtype matmuls take (ComfyUI casts everything to float32 to patch)."""
    t = t.reshape(t.shape[0], -1)
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()


def adapter_config(*tensor_sets: dict[str, torch.Tensor]) -> LoraConfig:
    """The peft adapter that holds every given set of ComfyUI-native tensors (one per expert) exactly: their
    rank and alpha when all modules share them (this trainer's files: the weights load unchanged), else the
    largest rank with scale 1 (each module's alpha / rank is folded into its up weight, lower ranks padded)."""
    modules = [m for tensors in tensor_sets for m in native_modules(tensors).items()]
    if not modules:
        raise LoraFileError("no LoRA tensors to attach - pick at least one LoRA file")
    ranks = {down.shape[0] for _, (down, _, _) in modules}
    alphas = {alpha for _, (_, _, alpha) in modules}
    targets = {_BLOCK_MODULE.match(name).group(2) for name, _ in modules if _BLOCK_MODULE.match(name)}
    rank = max(ranks)
    alpha = alphas.pop() if len(ranks) == 1 and len(alphas) == 1 else float(rank)
    if alpha <= 0:  # peft's scale must stay positive: fold a negative alpha into the weights instead
        alpha = float(rank)
    return LoraConfig(rank=rank, alpha=alpha, target_modules=[t for t in DEFAULT_LORA_TARGETS if t in targets])


def check_fits_config(ranks: dict[str, int], cfg: LoraConfig, where: str) -> None:
    """Refuse continuing training of ``cfg``'s adapter from a LoRA with these per-module ``ranks``: a larger rank
    than ``lora.rank`` or a target ``lora.target_modules`` leaves out (both would drop part of the file)."""
    too_big = {m: r for m, r in ranks.items() if r > cfg.rank}
    if too_big:
        top = max(too_big.values())
        example = next(m for m, r in too_big.items() if r == top)
        raise LoraFileError(f"{where} has rank {top} (e.g. {example}) but lora.rank is {cfg.rank} - set lora.rank to "
                            f"{top} or more to continue training from it")
    targets = {b.group(2) for m in ranks if (b := _BLOCK_MODULE.match(m))}
    left_out = [t for t in DEFAULT_LORA_TARGETS if t in targets and t not in cfg.target_modules]
    if left_out:
        raise LoraFileError(f"{where} adapts {', '.join(left_out)}, which lora.target_modules leaves out - add "
                            f"{'it' if len(left_out) == 1 else 'them'} to lora.target_modules")


def expert_arch(model: ModelConfig, expert: str) -> dict:
    """The ``WanTransformer3DModel`` config of one expert without loading a weight: inferred from its ComfyUI
    file's header when the job names one, else the planner's (tiny preset, diffusers folder, Wan 2.2 A14B)."""
    from ..memory.planner import model_arch
    from ..models.single_file import transformer_file_config

    file = model.high_noise if expert == "high" else model.low_noise
    if file and (config := transformer_file_config(file, f"model.{EXPERT_SUFFIX[expert]}")) is not None:
        return config
    return model_arch(model)
