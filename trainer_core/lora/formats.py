"""Wan LoRA files of the common trainers, read as ComfyUI's ``LoraLoaderModelOnly`` reads them.

One reader for every format, returning ComfyUI-native tensors (``diffusion_model.<module>.lora_down.weight`` /
``lora_up.weight`` / ``alpha``, and ``.diff`` / ``.diff_b``, modules in original Wan naming). Formats (key naming
from :func:`trainer_core.keys.parse_lora_key`):

* ComfyUI / original Wan: ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` / ``lora_up.weight`` with an
  optional scalar ``.alpha`` (this trainer's files);
* ComfyUI's own trainer (comfy_extras/nodes_train.py): the same block LoRAs plus LoRAs on the layers outside the
  blocks (patch_embedding, text and time embeddings, head) and full-weight differences of every norm weight
  (``.diff``) and bias (``.diff_b``); renders apply them (:mod:`.patches`), training cannot continue from them;
* ``lora_A`` / ``lora_B`` under the same names (ai-toolkit's Wan 2.2 output; ``.lora_A.default.weight`` is peft's
  own state dict), or under diffusers' names ``transformer.blocks.N.attn1.to_q.lora_A.weight`` (diffusers / peft;
  ComfyUI maps no Wan key of this naming, so these are read as diffusers reads them, with ``lora_alpha`` from
  diffusers' ``lora_adapter_metadata`` if present);
* kohya / musubi-tuner: ``lora_unet_blocks_N_self_attn_q.lora_down.weight`` with ``.alpha``.

Files ending in ``.safetensors`` / ``.sft`` are read as safetensors, any other as a PyTorch pickle through
``torch.load(weights_only=True)``, as ComfyUI's ``load_torch_file`` does.

ComfyUI's rules (comfy/lora.py ``load_lora``, comfy/weight_adapter/lora.py): per module, patched weight =
``W + strength · (alpha / rank) · up @ down`` with ``rank = down.shape[0]`` (so the rank may differ per module),
and scale 1 when the module has no alpha; ``W + strength · diff`` for a difference. The returned dict always
carries an alpha per LoRA module (``rank`` where the file has none: the same scale 1).

Every check that can be made from the safetensors header (key names, shapes, ranks) runs before any tensor is read:
a file for another model (Wan 2.1 1.3B or 5B widths, image-to-video layers or input channels, more blocks), with
layers this pack does not apply (LyCORIS, DoRA) or with names ComfyUI ignores is refused by name, saying what to do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..config import DEFAULT_LORA_TARGETS, LoraConfig, ModelConfig
from ..errors import LoraFileError
from ..keys import diffusers_module_to_original, parse_lora_key
from ..names import EXPERT_SUFFIX
from .fit import DIFF_PARTS, Needs, check_fit, check_layers, listed, wan_weight_shapes
from .io import PREFIX, native_modules

log = logging.getLogger(__name__)

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
#: Tensor-name endings of adapters ComfyUI applies but this pack does not, -> what they are.
_OTHER_ADAPTERS = {
    r"\.hada_\w+$": "LoHa", r"\.lokr_\w+$": "LoKr", r"\.dora_scale$": "DoRA",
    r"\.lora_mid\.weight$": "LoCon mid weights", r"\.set_weight$": "weight replacement (.set_weight)",
    r"\.w_norm$": "norm weights (.w_norm)", r"\.b_norm$": "norm biases (.b_norm)",
}
#: ComfyUI converts a Wan Fun file's ``lora_unet__`` keys only when this one is present (comfy/lora_convert.py).
_WAN_FUN_MARKER = "lora_unet__blocks_0_cross_attn_k.lora_down.weight"
#: Suffixes ComfyUI's ``load_torch_file`` reads as safetensors; every other file goes through ``torch.load``.
_SAFETENSORS = (".safetensors", ".sft")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module of a LoRA file, from the header: its rank, the weight shape it patches and its keys."""

    rank: int
    out_features: int
    in_features: int
    keys: dict[str, str]  # part ("down", "up", "alpha") -> tensor name in the file


@dataclass
class LoraFileInfo:
    """What the header of a LoRA file says: the naming, per LoRA module (original Wan name) its rank and shape, and
    the full-weight differences (original parameter name -> tensor name)."""

    path: Path
    where: str  # "<setting>: <path>", the start of every message about this file
    naming: str
    modules: dict[str, LoraModule]
    diffs: dict[str, str] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)  # every tensor's, by key
    metadata_alpha: float | None = None  # diffusers' lora_adapter_metadata alpha (files without alpha keys)
    warnings: list[str] = field(default_factory=list)  # the file is applied, but not as its name or ComfyUI suggest
    loaded: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # a pickle's tensors (read whole)

    @property
    def needs(self) -> Needs:
        """What the file patches, per original parameter name (:data:`trainer_core.lora.fit.Needs`)."""
        loras = {f"{m}.weight": ("lora", (mod.out_features, mod.in_features)) for m, mod in self.modules.items()}
        return loras | {param: ("diff", self.shapes[key]) for param, key in self.diffs.items()}


def _read_pickle(path: Path, where: str) -> dict:
    """A pickled state dict, loaded and unwrapped as ComfyUI's ``load_torch_file`` does (``weights_only``)."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if (unsafe := re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))) is not None:
            raise LoraFileError(f"{where} is a pickle that torch.load refuses to read safely (weights_only: it holds "
                                f"a {unsafe.group(1)}, not only tensors) - download a .safetensors version") from None
        raise LoraFileError(f"{where} is neither a .safetensors nor a PyTorch file - pick a LoRA file, or name a "
                            "safetensors file *.safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LoraFileError(f"{where} is not a readable PyTorch file ({exc}) - download or save it again") from None
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise LoraFileError(f"{where} holds a {type(obj).__name__}, not a state dict of tensors - pick a LoRA file")
    other = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if other:
        raise LoraFileError(f"{where} holds entries that are not tensors ({listed(other)}), so it is no LoRA state "
                            "dict - pick a LoRA file")
    return obj


def _contents(
    path: Path, where: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, torch.Tensor] | None]:
    """Tensor shapes and metadata of a LoRA file: a safetensors file's header alone, or a pickle read whole (its
    tensors returned too)."""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise LoraFileError(f"{where} {what} - give the path of a LoRA .safetensors file")
    loaded = None
    if path.suffix.lower() in _SAFETENSORS:
        try:
            with safe_open(str(path), framework="pt") as fh:
                shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
                metadata = fh.metadata() or {}
        except (SafetensorError, OSError) as exc:
            raise LoraFileError(
                f"{where} is not a readable .safetensors file ({exc}) - download or save it again"
            ) from None
    else:
        loaded = _read_pickle(path, where)
        shapes, metadata = {k: tuple(v.shape) for k, v in loaded.items()}, {}
    if not shapes:
        raise LoraFileError(f"{where} holds no tensors - pick a LoRA file")
    return shapes, metadata, loaded


def _refuse_unknown(unknown: list[str], where: str) -> None:
    kinds = sorted({kind for k in unknown for suffix, kind in _OTHER_ADAPTERS.items() if re.search(suffix, k)})
    if kinds:
        raise LoraFileError(
            f"{where} holds {', '.join(kinds)} tensors ({listed(unknown)}), which this pack does not apply - "
            "render this file with ComfyUI's LoraLoaderModelOnly, or use a plain LoRA"
        )
    raise LoraFileError(
        f"{where} is not a Wan LoRA in a format ComfyUI reads: {len(unknown)} key(s) such as {listed(unknown)} "
        f"match none of {FORMATS_HELP} - use a LoRA trained for Wan 2.2 T2V A14B (or Wan 2.1 T2V 14B)"
    )


def _diffusers_spelled(module: str) -> bool:
    """Whether ``module`` is a diffusers module name (``blocks.0.attn1.to_q``) rather than an original one."""
    try:
        return diffusers_module_to_original(module) != module
    except KeyError:
        return False


def _refuse_diffusers_spelling(parsed: dict[str, tuple[str, str, str]], where: str) -> None:
    """Refuse diffusers module names behind ``diffusion_model.`` (ComfyUI skips them: 'lora key not loaded')."""
    modules = {m for m, _, _ in parsed.values()}
    spelled = sorted({m for m, _, naming in parsed.values() if naming == "comfyui" and _diffusers_spelled(m)})
    if not spelled:
        return
    every = len(spelled) == len(modules)
    fix = ("rename the prefix diffusion_model. to transformer. (diffusers' own naming, which this pack reads)" if every
           else "rename those modules to original Wan names (attn1 -> self_attn, attn2 -> cross_attn, to_q/to_k/to_v/"
           "to_out.0 -> q/k/v/o, ffn.net.0.proj -> ffn.0, ffn.net.2 -> ffn.2)")
    raise LoraFileError(
        f"{where} names {'its' if every else f'{len(spelled)} of its {len(modules)}'} modules in diffusers' spelling "
        f"behind ComfyUI's diffusion_model. prefix ({listed(spelled)}), which ComfyUI's loader skips too ('lora key "
        f"not loaded') - {fix}"
    )


def _grouped(parsed: dict[str, tuple[str, str, str]], where: str) -> dict[str, dict[str, str]]:
    """The file's keys per module and part, refusing a part given twice and a LoRA and a ``.diff`` on one weight."""
    grouped: dict[str, dict[str, str]] = {}
    for key, (module, part, _) in parsed.items():
        if part in grouped.setdefault(module, {}):
            raise LoraFileError(f"{where} has two {part} tensors for {module} ({grouped[module][part]}, {key}) - "
                                "use a file saved by one tool")
        grouped[module][part] = key
    both = sorted(m for m, keys in grouped.items() if "diff" in keys and {"down", "up"} & set(keys))
    if both:
        raise LoraFileError(f"{where} has both a LoRA and a .diff for {listed(both)} (ComfyUI applies only the .diff) "
                            "- use a file saved by one tool")
    return grouped


def _lora_module(module: str, keys: dict[str, str], shapes: dict[str, tuple[int, ...]], where: str) -> LoraModule:
    """One LoRA module from its keys, its down/up/alpha shapes checked against one another."""
    if "down" not in keys or "up" not in keys:
        raise LoraFileError(f"{where} has no {'up' if 'down' in keys else 'down'} weight for {module} "
                            f"(only {listed(sorted(keys.values()))}); the file is incomplete - save it again")
    down, up = shapes[keys["down"]], shapes[keys["up"]]
    if len(down) < 2 or len(up) < 2 or math.prod(up[1:]) != down[0] or down[0] < 1:
        raise LoraFileError(f"{where} has down {list(down)} and up {list(up)} for {module}, which do not form a "
                            "LoRA (down [rank, in], up [out, rank]); the file is damaged")
    if "alpha" in keys and math.prod(shapes[keys["alpha"]]) != 1:
        raise LoraFileError(f"{where} has a non-scalar alpha {keys['alpha']} {list(shapes[keys['alpha']])}; "
                            "the file is damaged - save it again")
    lora_keys = {p: k for p, k in keys.items() if p in ("down", "up", "alpha")}
    return LoraModule(down[0], up[0], math.prod(down[1:]), lora_keys)


def _describe(shapes: dict[str, tuple[int, ...]], path: Path, where: str) -> LoraFileInfo:
    """The file's naming, LoRA modules and differences, from its tensor names and shapes."""
    parsed = {k: parse_lora_key(k) for k in shapes}
    unknown = sorted(k for k, p in parsed.items() if p is None)
    if unknown:
        _refuse_unknown(unknown, where)
    _refuse_diffusers_spelling(parsed, where)
    namings = sorted({p[2] for p in parsed.values()})
    if len(namings) > 1:
        raise LoraFileError(f"{where} mixes key namings ({', '.join(NAMINGS[n] for n in namings)}) - use a file "
                            "saved by one tool")
    grouped = _grouped(parsed, where)
    diffs = {f"{m}.{DIFF_PARTS[p]}": k for m, keys in grouped.items() for p, k in keys.items() if p in DIFF_PARTS}
    loras = sorted(m for m, keys in grouped.items() if set(keys) - set(DIFF_PARTS))
    check_layers([*(f"{m}.weight" for m in loras), *diffs], where)  # names first: a file for another model says so
    modules = {m: _lora_module(m, grouped[m], shapes, where) for m in loras}
    return LoraFileInfo(path, where, namings[0], modules, diffs, shapes)


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
    """Check a LoRA file from its header alone (no tensor of a safetensors file is read) and describe it.

    ``arch`` (the experts' ``WanTransformer3DModel`` config) also checks it fits those experts; ``expert``
    (``high`` / ``low``) refuses a file whose ``expert`` metadata (this trainer's) names the other one. ``setting``
    names the input in every message. Raises :class:`LoraFileError`.
    """
    path = Path(path).expanduser()
    where = f"{setting}: {path}"
    shapes, metadata, loaded = _contents(path, where)
    if "state_skeleton" in metadata:
        raise LoraFileError(f"{where} is a training state of this trainer, not a LoRA - pick the "
                            "<name>_<step>_high_noise / _low_noise.safetensors files beside it")
    made_for = metadata.get("expert", "").removesuffix("_noise")
    if expert is not None and made_for in EXPERT_SUFFIX and made_for != expert:
        raise LoraFileError(f"{where} was trained for the {made_for}-noise expert, not the {expert}-noise one - swap "
                            "the high and low LoRA files")
    info = _describe(shapes, path, where)
    if arch is not None:
        check_fit(info.needs, wan_weight_shapes(arch), where)
    info.metadata_alpha, info.loaded = _metadata_alpha(metadata, info.naming, where), loaded
    if any(k.startswith("lora_unet__") for k in shapes) and _WAN_FUN_MARKER not in shapes:
        info.warnings.append(
            f"{where} is a Wan Fun LoRA that ComfyUI's own LoRA loaders skip (they convert its lora_unet__ keys only "
            f"when {_WAN_FUN_MARKER} is present): this pack applies it, a native LoraLoaderModelOnly renders the base "
            "model - in native graphs use Apply Wan22 LoRA Pair, or rename the keys' prefix lora_unet__ to lora_unet_"
        )
    return info


#: Expert words in LoRA file names: ai-toolkit's ``_high_noise`` / ``_low_noise``, ``HighNoise``, ``high-noise``
#: (any case), and lightx2v's upper-case ``_HIGH_`` / ``_LOW_`` as a whole word; a bare ``H`` / ``L`` says nothing.
_NAMED_EXPERT = (re.compile(r"(?<![a-z])(high|low)[ _.-]?noise(?![a-z])", re.IGNORECASE),
                 re.compile(r"(?<![A-Za-z])(HIGH|LOW)(?![A-Za-z])"))


def named_expert(path: str | os.PathLike) -> str | None:
    """The expert (``high`` / ``low``) a LoRA file's name says it was made for, if it says one and only one."""
    for pattern in _NAMED_EXPERT:
        said = {m.group(1).lower() for m in pattern.finditer(Path(path).name)}
        if said:
            return said.pop() if len(said) == 1 else None
    return None


def pair_warnings(files: dict[str, Path], settings: dict[str, str]) -> list[str]:
    """One line when a pair's file names say a file fills the other expert's slot, or one file fills both;
    ``files`` and ``settings`` (the inputs' names, e.g. ``lora_high``) are keyed by expert."""
    if len(files) == 2 and Path(files["high"]).resolve() == Path(files["low"]).resolve():
        return [f"{settings['high']} and {settings['low']} are the same file {Path(files['high']).name}: a Wan 2.2 "
                "LoRA pair has one file per expert (..._high_noise / ..._low_noise) - pick each expert's own file, "
                "unless this LoRA was made for both"]
    misplaced = [e for e, path in files.items() if named_expert(path) not in (None, e)]
    if len(misplaced) == 2:
        return [f"{settings['high']} is {files['high'].name} and {settings['low']} is {files['low'].name}: their "
                "names say they are swapped - swap the two files"]
    if misplaced:
        expert = misplaced[0]
        other = "low" if expert == "high" else "high"
        now = f" (now {files[other].name})" if other in files else ""
        return [f"{settings[expert]} is {files[expert].name}, whose name says it is for the {other}-noise expert - "
                f"put it in {settings[other]}{now}, unless the name is wrong"]
    return []


def check_lora_fits(
    tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: str, target: str = "these experts"
) -> None:
    """Refuse ComfyUI-native LoRA ``tensors`` (as :func:`read_lora_file` returns them) that would not all load into
    the model whose parameters (original names) have ``shapes``: ``where`` names the file, ``target`` the model."""
    check_fit(_describe({k: tuple(v.shape) for k, v in tensors.items()}, Path(), where).needs, shapes, where, target)


@contextlib.contextmanager
def _tensor_reader(info: LoraFileInfo) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function reading one tensor of the file by name."""
    if info.loaded is not None:
        yield info.loaded.__getitem__
        return
    with safe_open(str(info.path), framework="pt") as fh:
        yield fh.get_tensor


def _finite(t: torch.Tensor, what: str, info: LoraFileInfo) -> torch.Tensor:
    if not torch.isfinite(t.float()).all():
        raise LoraFileError(f"{info.where} holds NaN/Inf values in {what} - use another file")
    return t


def read_lora_file(
    path: str | os.PathLike, setting: str, *, arch: dict | None = None, expert: str | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """A LoRA file of any format read (see the module notes) as ComfyUI-native tensors: per LoRA module
    ``diffusion_model.<module>.lora_down.weight`` / ``lora_up.weight`` (the file's dtype) and ``alpha`` (float32
    scalar; the rank where the file has none), per difference ``diffusion_model.<module>.diff`` / ``.diff_b``.
    :func:`inspect_lora_file`'s checks run first; its warnings go to ``on_warning`` (default: logged)."""
    info = inspect_lora_file(path, setting, arch=arch, expert=expert)
    for warning in info.warnings:
        (on_warning or _log_warning)(warning)
    out: dict[str, torch.Tensor] = {}
    with _tensor_reader(info) as get:
        for module, m in info.modules.items():
            down, up = (_finite(get(m.keys[p]), module, info) for p in ("down", "up"))
            # ComfyUI reads alpha with .item() and computes alpha / rank; no alpha is scale 1 (alpha = rank)
            alpha = get(m.keys["alpha"]).float().reshape(()) if "alpha" in m.keys else None
            if alpha is None:
                scale_1 = float(m.rank) if info.metadata_alpha is None else info.metadata_alpha
                alpha = torch.tensor(scale_1, dtype=torch.float32)
            if not torch.isfinite(alpha):
                raise LoraFileError(f"{info.where} has a NaN/Inf alpha for {module} - use another file")
            out[f"{PREFIX}{module}.lora_down.weight"] = _matrix(down)
            out[f"{PREFIX}{module}.lora_up.weight"] = _matrix(up)
            out[f"{PREFIX}{module}.alpha"] = alpha
        part_of = {param: part for part, param in DIFF_PARTS.items()}
        for param, key in info.diffs.items():
            module, kind = param.rsplit(".", 1)
            name = f"{module}.{part_of[kind]}"
            out[f"{PREFIX}{name}"] = _computable(_finite(get(key), name, info))
    return out


def _log_warning(message: str) -> None:
    log.warning("warning: %s", message)


def _computable(t: torch.Tensor) -> torch.Tensor:
    """``t`` in a dtype matmuls and additions take (ComfyUI casts everything to float32 to patch)."""
    return t if t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t.float()


def _matrix(t: torch.Tensor) -> torch.Tensor:
    """A 2-D LoRA weight in a dtype matmuls take."""
    return _computable(t.reshape(t.shape[0], -1))


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
