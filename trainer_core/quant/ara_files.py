"""Accuracy recovery adapter files: reading ai-toolkit's published adapters and this trainer's own, and the cache.

Layout (this trainer writes it; ai-toolkit's adapters use it too): for every adapted layer ``X`` in original Wan
naming (``blocks.0.self_attn.q``)::

    diffusion_model.X.lora_A.weight   [rank, in]    A (down)
    diffusion_model.X.lora_B.weight   [out, rank]   B (up)        y = W_q x + B A x  (scale 1)

ai-toolkit trains one adapter for both Wan 2.2 experts and saves it from its two-expert wrapper, so its keys carry
the expert: ``diffusion_model.transformer_1.blocks...`` (high noise) and ``transformer_2`` (low noise). Also read:
diffusers module names (``blocks.0.attn1.to_q``), the prefixes ``transformer.`` / ``model.diffusion_model.`` / none,
``lora_down`` / ``lora_up`` suffixes and optional ``.alpha`` tensors (scale = alpha / rank, folded into B).

Which quantizer an adapter was made for: this trainer's files say so in their metadata (``ara_quantizer``); ai-toolkit
names its files after it (``..._torchao_uint4.safetensors`` = uint4 asymmetric, groups of 64, torchao 0.10).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import QuantConfig
from ..errors import ConfigError, LoraFileError
from ..fileio import save_safetensors_atomic
from ..keys import LORA_TARGET_TO_DIFFUSERS, diffusers_module_to_original

FORMAT = "trainer_core.ara.v1"
#: What each ``quant.quantizer`` value means, written into files for humans.
QUANTIZER_DETAILS = {
    "nf4": "bitsandbytes NF4, blocks of 64, double-quantized absmax",
    "uint4": "uint4 asymmetric, groups of 64 along in_features, torchao 0.10 UIntXWeightOnlyConfig scheme",
}
_EXPERT_OF_GROUP = {"transformer_1": "high", "transformer_2": "low"}
_ORIGINAL_TO_DIFFUSERS = {**LORA_TARGET_TO_DIFFUSERS, **{v: v for v in LORA_TARGET_TO_DIFFUSERS.values()}}
_KEY = re.compile(
    r"^(?:diffusion_model\.|transformer\.|model\.diffusion_model\.)?(?:(?P<group>transformer_[12])\.)?"
    r"blocks\.(?P<block>\d+)\.(?P<module>.+?)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_down\.weight"
    r"|lora_up\.weight|alpha)$"
)
_AITOOLKIT_NAME = re.compile(r"torchao_uint(\d)")
_MAX_LISTED = 5


@dataclass
class AdapterSet:
    """Adapters keyed by diffusers module path (``blocks.0.attn1.to_q``): ``(down [r, in], up [out, r])``."""

    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    quantizer: str
    metadata: dict[str, str] = field(default_factory=dict)


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise LoraFileError(f"quant.ara_source: adapter file {path} does not exist - check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"quant.ara_source: {path} is not a readable .safetensors file: {exc}") from None


def file_quantizer(path: Path, metadata: dict[str, str]) -> str:
    """``'nf4'`` or ``'uint4'``: the quantizer the adapter in ``path`` was made for (see module docstring)."""
    declared = metadata.get("ara_quantizer")
    if declared is not None:
        if declared not in QUANTIZER_DETAILS:
            raise LoraFileError(
                f"quant.ara_source: {path} was made for quantizer {declared!r}, which this trainer does not "
                f"implement (known: {', '.join(QUANTIZER_DETAILS)})"
            )
        return declared
    match = _AITOOLKIT_NAME.search(path.name)
    if match is None:
        raise LoraFileError(
            f"quant.ara_source: cannot tell which quantizer {path.name} was made for - adapters written by this "
            "trainer say so in their metadata, ai-toolkit's are named *_torchao_uint4.safetensors; an adapter only "
            "recovers the quantizer it was trained against"
        )
    if match.group(1) != "4":
        raise LoraFileError(
            f"quant.ara_source: {path.name} was made for torchao uint{match.group(1)}; only the uint4 quantizer "
            "is implemented - use ai-toolkit's *_torchao_uint4 adapter or ara_source: compute"
        )
    return "uint4"


def _check_quantizer(path: Path, made_for: str, cfg: QuantConfig) -> None:
    if made_for != cfg.quantizer:
        raise ConfigError(
            f"quant.ara_source: {path.name} was made for the {made_for} quantizer ({QUANTIZER_DETAILS[made_for]}) "
            f"but quant.quantizer is {cfg.quantizer!r}; an adapter only recovers the quantizer it was trained "
            f"against - set quant.quantizer: {made_for}"
        )


def adapter_file_rank(path: str | os.PathLike, setting: str = "quant.ara_source") -> int:
    """The rank of the adapters in ``path``, from the tensor shapes in its header (no weights are read), as
    ai-toolkit takes it from the file. Raises :class:`LoraFileError` naming ``setting`` for a file that holds no
    adapter or mixes ranks."""
    path = Path(path).expanduser()
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"{setting}: {path} is not a readable .safetensors file: {exc}") from None
    ranks: set[int] = set()
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if m is None or len(shape) != 2 or m.group("kind") == "alpha":
            continue
        down = m.group("kind").startswith(("lora_A", "lora_down"))
        ranks.add(int(shape[0] if down else shape[1]))
    if not ranks:
        raise LoraFileError(f"{setting}: {path} holds no accuracy recovery adapter (no lora_A/lora_B matrices of "
                            "Wan's block layers) - give an adapter file such as ai-toolkit's *_torchao_uint4")
    if len(ranks) > 1:
        raise LoraFileError(f"{setting}: {path} mixes adapter ranks {sorted(ranks)}; expected one rank for every "
                            "layer")
    return ranks.pop()


def check_ara_source(cfg: QuantConfig) -> None:
    """Cheap early check (header only) that ``cfg.ara_source`` exists, fits ``cfg.quantizer`` and has the rank
    ``cfg.ara_rank`` (refused before any model loads rather than when the adapters are applied)."""
    if cfg.transformer != "4bit_ara" or cfg.ara_source == "compute":
        return
    path = Path(cfg.ara_source).expanduser()
    _check_quantizer(path, file_quantizer(path, _read_metadata(path)), cfg)
    rank = adapter_file_rank(path)
    if rank != cfg.ara_rank:
        raise ConfigError(_rank_mismatch(path, rank, cfg.ara_rank))


def _rank_mismatch(path: Path, rank: int, ara_rank: int) -> str:
    return (f"quant.ara_source: {path.name} has rank {rank} but quant.ara_rank is {ara_rank} - set quant.ara_rank: "
            f"{rank} to use this file (Quantize ARA node: ara_rank {rank})")


def _parse(
    path: Path, tensors: dict[str, torch.Tensor], expert: str
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str | None]]:
    """Group tensors by diffusers module path, keeping only this expert's group (or the ungrouped ones); also
    return the expert groups present in the file (``None`` = keys without a group)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    groups: set[str | None] = set()
    for key, value in tensors.items():
        m = _KEY.match(key)
        module = _ORIGINAL_TO_DIFFUSERS.get(m.group("module")) if m else None
        if module is None:
            unknown.append(key)
            continue
        group = m.group("group")
        groups.add(group)
        if group is not None and _EXPERT_OF_GROUP[group] != expert:
            continue
        kind = m.group("kind").split(".")[0].replace("lora_down", "lora_A").replace("lora_up", "lora_B")
        parts.setdefault(f"blocks.{m.group('block')}.{module}", {})[kind] = value
    if unknown:
        raise LoraFileError(
            f"quant.ara_source: {path} has {len(unknown)} key(s) that name no quantized block Linear of Wan 2.2: "
            f"{_listed(sorted(unknown))}"
        )
    if None in groups and len(groups) > 1:
        raise LoraFileError(f"quant.ara_source: {path} mixes per-expert (transformer_1/2) and shared keys")
    return parts, groups


def read_adapter_file(path: str | os.PathLike, expert: str, cfg: QuantConfig) -> AdapterSet:
    """Read the adapters for ``expert`` ('high' / 'low') from ``path``, refusing files that do not fit ``cfg``.

    Checks made here: readable file, known key layout, quantizer (metadata / ai-toolkit name) equal to
    ``cfg.quantizer``, one rank for every layer equal to ``cfg.ara_rank``, finite values. The shapes and the
    coverage of the model's layers are checked by :func:`check_adapters_fit`.
    """
    path = Path(path).expanduser()
    metadata = _read_metadata(path)
    made_for = file_quantizer(path, metadata)
    _check_quantizer(path, made_for, cfg)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"quant.ara_source: {path} is not a readable .safetensors file: {exc}") from None
    parts, groups = _parse(path, tensors, expert)
    if not parts:
        other = {_EXPERT_OF_GROUP[g] for g in groups if g is not None}
        raise LoraFileError(
            f"quant.ara_source: {path} holds no adapters for the {expert}-noise expert"
            + (f" (only for: {', '.join(sorted(other))})" if other else "")
        )
    incomplete = sorted(n for n, p in parts.items() if not {"lora_A", "lora_B"} <= set(p))
    if incomplete:
        raise LoraFileError(f"quant.ara_source: {path} lacks lora_A or lora_B for {_listed(incomplete)}")
    bad_ndim = sorted(n for n, p in parts.items() if p["lora_A"].ndim != 2 or p["lora_B"].ndim != 2)
    if bad_ndim:
        raise LoraFileError(f"quant.ara_source: {path} has non-matrix adapter weights at {_listed(bad_ndim)}")
    ranks = sorted({int(s) for p in parts.values() for s in (p["lora_A"].shape[0], p["lora_B"].shape[1])})
    if len(ranks) != 1:
        raise LoraFileError(f"quant.ara_source: {path} mixes adapter ranks {ranks}; expected one rank for every layer")
    rank = ranks[0]
    if rank != cfg.ara_rank:
        raise ConfigError(_rank_mismatch(path, rank, cfg.ara_rank))
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    nonfinite: list[str] = []
    for name, p in parts.items():
        down, up = p["lora_A"].float(), p["lora_B"].float()
        if "alpha" in p:
            up = up * (float(p["alpha"].float().reshape(-1)[0]) / rank)
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            nonfinite.append(name)
        adapters[name] = (down, up)
    if nonfinite:
        raise LoraFileError(f"quant.ara_source: {path} holds NaN/Inf values in {_listed(sorted(nonfinite))}")
    return AdapterSet(adapters=adapters, rank=rank, quantizer=made_for, metadata=metadata)


def check_adapters_fit(adapters: AdapterSet, layers: dict[str, tuple[int, int]], source: str) -> None:
    """Refuse ``adapters`` unless they cover exactly ``layers`` (name -> (out, in)) with matching shapes."""
    missing = sorted(n for n in layers if n not in adapters.adapters)
    extra = sorted(n for n in adapters.adapters if n not in layers)
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"no adapter for {len(missing)} quantized layer(s): {_listed(missing)}")
        if extra:
            detail.append(f"adapters for {len(extra)} layer(s) this model lacks: {_listed(extra)}")
        raise LoraFileError(
            f"{source} does not fit this model ({'; '.join(detail)}) - it was made for a model with other blocks"
        )
    wrong = [
        f"{n}: A {tuple(down.shape)}, B {tuple(up.shape)} vs layer {layers[n][1]}->{layers[n][0]}"
        for n, (down, up) in adapters.adapters.items()
        if down.shape[1] != layers[n][1] or up.shape[0] != layers[n][0]
    ]
    if wrong:
        raise LoraFileError(
            f"{source} was made for a model of another size (the Wan 2.2 14B experts have dim 5120, ffn 13824): "
            f"shape mismatch at {_listed(sorted(wrong))}"
        )


def model_file_identity(path: str | os.PathLike) -> str:
    """A cheap identity of a model file or folder (path, sizes, modification times) for cache keys.

    Reading 28 GB to hash it would cost more than computing the adapters; a changed file changes size or mtime.
    """
    p = Path(path).expanduser().resolve()
    if p.is_file():
        st = p.stat()
        return f"{p}|{st.st_size}|{st.st_mtime_ns}"
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".json"))
        return f"{p}|" + ";".join(f"{f.relative_to(p)}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    raise FileNotFoundError(f"model path {p} does not exist")


def cache_metadata(cache_key: str, quantizer: str, rank: int, method: str, samples: int) -> dict[str, str]:
    """The fields that identify a computed adapter set (all must match for a cache hit)."""
    return {
        "format": FORMAT,
        "cache_key": cache_key,
        "ara_quantizer": quantizer,
        "ara_quantizer_detail": QUANTIZER_DETAILS[quantizer],
        "ara_rank": str(rank),
        "ara_method": method,
        "ara_calibration_samples": str(samples),
    }


def cache_path(cache_dir: str | os.PathLike, identity: dict[str, str]) -> Path:
    """``<cache_dir>/ara_<quantizer>_r<rank>_<method>_<digest>.safetensors``; the digest covers every field."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    name = f"ara_{identity['ara_quantizer']}_r{identity['ara_rank']}_{identity['ara_method']}_{digest}.safetensors"
    return Path(cache_dir).expanduser() / name


def write_adapter_file(
    path: Path, adapters: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: dict[str, str]
) -> Path:
    """Write ``adapters`` (diffusers module names) in the layout above, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (down, up) in adapters.items():
        key = f"diffusion_model.{diffusers_module_to_original(name)}"
        tensors[f"{key}.lora_A.weight"] = down
        tensors[f"{key}.lora_B.weight"] = up
    return save_safetensors_atomic(tensors, path, metadata=metadata)


def cache_holds(path: Path, identity: dict[str, str]) -> bool:
    """Whether ``path`` is a cache file whose metadata matches ``identity`` exactly (its header alone is read)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return False
    return all(metadata.get(k) == v for k, v in identity.items())


def read_cache(path: Path, identity: dict[str, str]) -> AdapterSet | None:
    """The cached adapters if ``path`` exists and its metadata matches ``identity`` exactly, else ``None``."""
    if not cache_holds(path, identity):
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError):
        return None
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group("module") not in LORA_TARGET_TO_DIFFUSERS:
            return None
        name = f"blocks.{m.group('block')}.{LORA_TARGET_TO_DIFFUSERS[m.group('module')]}"
        down, up = adapters.get(name, (None, None))
        adapters[name] = (value, up) if m.group("kind") == "lora_A.weight" else (down, value)
    if any(d is None or u is None for d, u in adapters.values()):
        return None
    return AdapterSet(
        adapters=adapters, rank=int(identity["ara_rank"]), quantizer=identity["ara_quantizer"], metadata=metadata
    )
