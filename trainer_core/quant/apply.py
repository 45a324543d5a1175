"""Quantize a Wan 2.2 expert's block Linears in place (and the text encoder's), layer by layer on the target device.

Only the Linear layers LoRA targets are quantized: self- and cross-attention q/k/v/o and the two FFN projections of
every block. Embeddings, norms, modulation tables and the head keep their dtype. Blocks are moved to the device one at
a time and quantized there, so a bf16 expert larger than the GPU can be quantized onto it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..config import DEFAULT_LORA_TARGETS, QuantConfig
from ..errors import LoraFileError
from ..fileio import ArtifactWriteError
from ..keys import lora_target_regex
from .ara import low_rank_adapter, relative_output_errors
from .ara_files import (
    AdapterSet,
    cache_holds,
    cache_metadata,
    cache_path,
    check_adapters_fit,
    read_adapter_file,
    read_cache,
    write_adapter_file,
)
from .calibration import CovarianceRecorder, capture_block_inputs, move_except_blocks, run_block
from .choice import resolved_quant
from .float8 import Float8Linear, supports_fp8_matmul
from .nf4 import NF4Linear
from .uint4 import UInt4Linear

log = logging.getLogger(__name__)

#: Forward keyword arguments of the transformer (as the training loop passes them), or a callable producing them
#: (called only when activations are actually needed, e.g. not on a cache hit).
Calibration = Callable[[], Iterable[dict[str, Any]]] | Iterable[dict[str, Any]]

_TARGETS = re.compile(lora_target_regex(DEFAULT_LORA_TARGETS))
_EXPERT_LABEL = {"high": "high-noise expert", "low": "low-noise expert"}


@dataclass
class QuantReport:
    """What quantization did to one model, and how far the quantized layers' outputs moved.

    ``errors`` maps each quantized layer to ``(relative error without adapter, with adapter)`` (``None`` without an
    adapter): ``||ΔW X|| / ||W X||`` over the calibration inputs when ``error_metric == 'activations'``, or over
    the weights themselves (``'weights'``) when no calibration inputs were used.
    """

    mode: str
    label: str = ""
    quantizer: str | None = None
    layers: int = 0
    ara_rank: int | None = None
    ara_source: str | None = None
    ara_method: str | None = None
    calibration_samples: int = 0
    error_metric: str | None = None
    errors: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    cache_path: Path | None = None
    seconds: float = 0.0

    @property
    def mean_error(self) -> float | None:
        """Mean relative error of the quantized layers without adapter."""
        vals = [e[0] for e in self.errors.values()]
        return sum(vals) / len(vals) if vals else None

    @property
    def mean_error_with_adapter(self) -> float | None:
        """Mean relative error of the quantized layers with their adapters (``None`` without adapters)."""
        vals = [e[1] for e in self.errors.values() if e[1] is not None]
        return sum(vals) / len(vals) if vals else None

    def summary(self) -> str:
        """One line for logs and UIs."""
        if self.mode == "none":
            return f"{self.label}: not quantized"
        what = f"{self.layers} layers {self.quantizer}"
        if self.ara_rank is not None:
            how = self.ara_method
            if how == "calibrated":
                how = f"calibrated on {self.calibration_samples} samples"
            what += f" + accuracy recovery adapter r{self.ara_rank} ({self.ara_source}, {how})"
        line = f"{self.label}: {what} in {self.seconds:.1f} s"
        if self.mean_error is not None:
            line += f"; mean relative output error ({self.error_metric}) {self.mean_error:.4f}"
            with_ara = self.mean_error_with_adapter
            if with_ara is not None and self.mean_error > 0:
                line += f" -> {with_ara:.4f} with adapter ({100 * (1 - with_ara / self.mean_error):.0f}% recovered)"
        return line


def quant_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The block Linears that get quantized (diffusers module path -> module), in model order."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not _TARGETS.match(name):
            continue
        if isinstance(module, BaseTunerLayer):
            raise ValueError(f"{name} already carries a LoRA: quantize the expert before attaching the LoRA")
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is already quantized ({type(module).__name__}); quantize an expert only once")
        found[name] = module
    if not found:
        raise ValueError("no transformer-block Linear layers found: quantize_expert expects a WanTransformer3DModel")
    return found


def _compute_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return weight_dtype if weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _take(calibration: Calibration | None, n: int) -> list[dict[str, Any]]:
    if calibration is None:
        raise ValueError(
            "quant.ara_calibration_samples > 0 needs calibration inputs: pass calibration= (forward kwargs of "
            "training batches), or set ara_calibration_samples: 0 for adapters from the weights alone"
        )
    source = calibration() if callable(calibration) else calibration
    batches = list(islice(source, n))
    if not batches:
        raise ValueError("the calibration source yielded no batches")
    return batches


def _cache_identity(
    cfg: QuantConfig, cache_key: str, cache_dir: str | Path | None
) -> tuple[dict[str, str], str | Path | None]:
    """The identity of the adapters ``cfg`` computes for ``cache_key``, and the folder they are cached in."""
    method = "calibrated" if cfg.ara_calibration_samples > 0 else "residual_svd"
    identity = cache_metadata(cache_key, cfg.quantizer, cfg.ara_rank, method, cfg.ara_calibration_samples)
    return identity, cfg.ara_cache_dir or cache_dir


def adapters_cached(cfg: QuantConfig, cache_key: str, cache_dir: str | Path | None) -> bool:
    """Whether :func:`quantize_expert` finds the adapters it would compute for ``cfg`` (``4bit_ara``, ``ara_source:
    compute``) and ``cache_key`` in the cache (checked from the file's header), so it needs no calibration inputs."""
    identity, folder = _cache_identity(cfg, cache_key, cache_dir)
    return folder is not None and cache_holds(cache_path(folder, identity), identity)


def _plan_adapters(
    cfg: QuantConfig, report: QuantReport, expert: str, cache_key: str, cache_dir: str | Path | None, shapes: dict
) -> tuple[AdapterSet | None, dict[str, str] | None]:
    """Adapters to install (from a file or the cache; ``None`` = compute them) and the cache identity."""
    report.ara_rank = cfg.ara_rank
    if cfg.ara_source != "compute":
        adapters = read_adapter_file(cfg.ara_source, expert, cfg)
        check_adapters_fit(adapters, shapes, f"quant.ara_source: {cfg.ara_source}")
        report.ara_source, report.ara_method = "file", "file"
        return adapters, None
    identity, folder = _cache_identity(cfg, cache_key, cache_dir)
    report.ara_method, report.ara_source = identity["ara_method"], "computed"
    if folder is None:
        return None, identity
    report.cache_path = cache_path(folder, identity)
    cached = read_cache(report.cache_path, identity)
    if cached is not None:
        try:
            check_adapters_fit(cached, shapes, f"adapter cache {report.cache_path}")
        except LoraFileError as exc:
            log.warning("ignoring stale adapter cache: %s", exc)
            return None, identity
        report.ara_source = "cache"
        report.error_metric = cached.metadata.get("ara_error_metric")
        report.errors = {k: tuple(v) for k, v in json.loads(cached.metadata.get("ara_errors", "{}")).items()}
        report.calibration_samples = int(cached.metadata.get("ara_calibration_samples_used", 0))
    return cached, identity


def _make_layer(linear: nn.Linear, cfg: QuantConfig, fp8: bool) -> nn.Module:
    dtype = _compute_dtype(linear.weight.dtype)
    if cfg.transformer == "float8":
        return Float8Linear(linear, dtype, fp8_matmul=fp8, fp8_backward=cfg.fp8_backward)
    return NF4Linear(linear, dtype) if cfg.quantizer == "nf4" else UInt4Linear(linear, dtype)


def _quantized_layer(
    name: str,
    linear: nn.Linear,
    cfg: QuantConfig,
    fp8: bool,
    report: QuantReport,
    adapters: AdapterSet | None,
    recorder: CovarianceRecorder | None,
    computed: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> nn.Module:
    """``linear`` quantized, with its accuracy recovery adapter (from the cache, a file, or computed now and added to
    ``computed``) and its relative output error recorded in ``report``."""
    layer = _make_layer(linear, cfg, fp8)
    if report.ara_source == "cache":  # adapters and their errors were stored with the cache
        layer.set_ara(*adapters.adapters[name], layer.compute_dtype)
        return layer
    cov = recorder.covariance(name) if recorder is not None else None
    weight = linear.weight.float()
    residual = weight - layer.dequantize()
    if cfg.transformer == "4bit_ara":
        given = adapters.adapters[name] if adapters is not None else None
        down, up = given or low_rank_adapter(residual, cfg.ara_rank, cov)
        layer.set_ara(down, up, layer.compute_dtype)
        if report.ara_source == "computed":
            computed[name] = (layer.ara_down.cpu(), layer.ara_up.cpu())
    report.errors[name] = relative_output_errors(weight, residual, layer.ara_down, layer.ara_up, cov)
    return layer


def quantize_expert(
    model: nn.Module,
    cfg: QuantConfig,
    *,
    expert: str,
    cache_key: str,
    device: torch.device | str,
    calibration: Calibration | None = None,
    cache_dir: str | Path | None = None,
) -> QuantReport:
    """Quantize ``model``'s (a ``WanTransformer3DModel``, unquantized, no LoRA yet) block Linears in place.

    The whole model ends on ``device``. ``expert`` ('high' / 'low') selects the adapters of a two-expert file.
    ``cfg.transformer == 'none'`` changes nothing; ``auto`` is resolved for ``device``. For ``4bit_ara`` with
    ``ara_source: compute``, adapters are read from the cache (``cfg.ara_cache_dir``, else ``cache_dir``; ``None``
    for both = no caching) when a file for (``cache_key``, quantizer, rank, method, samples) exists, else computed
    and cached. Activations are needed, and
    ``calibration`` consumed (first ``cfg.ara_calibration_samples`` batches), only when computing calibrated
    adapters, or to measure a file's adapters. Returns the per-layer relative output errors.
    """
    start = time.perf_counter()
    if expert not in _EXPERT_LABEL:
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    cfg = resolved_quant(cfg, torch.device(device))
    report = QuantReport(mode=cfg.transformer, label=_EXPERT_LABEL[expert])
    if cfg.transformer == "none":
        return report
    device = torch.device(device)
    layers = quant_targets(model)
    report.layers = len(layers)
    report.quantizer = "float8 e4m3 rowwise" if cfg.transformer == "float8" else cfg.quantizer
    use_ara = cfg.transformer == "4bit_ara"
    adapters, identity = None, None
    if use_ara:
        shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
        adapters, identity = _plan_adapters(cfg, report, expert, cache_key, cache_dir, shapes)
    wants_activations = (
        use_ara
        and cfg.ara_calibration_samples > 0
        and (report.ara_source == "computed" or (report.ara_source == "file" and calibration is not None))
    )
    batches = _take(calibration, cfg.ara_calibration_samples) if wants_activations else None
    if batches is not None:
        report.calibration_samples = len(batches)
    if report.ara_source != "cache":
        report.error_metric = "activations" if batches else "weights"
    fp8 = cfg.transformer == "float8" and supports_fp8_matmul(device)
    computed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    with torch.no_grad():
        move_except_blocks(model, device)
        inputs = capture_block_inputs(model, batches, device) if batches else None
        for index, block in enumerate(model.blocks):
            block.to(device)
            names = [n for n in layers if n.startswith(f"blocks.{index}.")]
            recorder = None
            if inputs is not None:
                recorder = CovarianceRecorder({n: layers[n] for n in names})
                inputs = run_block(block, inputs, recorder)
            for name in names:
                layer = _quantized_layer(name, layers.pop(name), cfg, fp8, report, adapters, recorder, computed)
                _replace(model, name, layer)
            if recorder is not None:
                recorder.close()
    if use_ara and cfg.quantizer == "nf4":
        # peft wraps bnb Linear4bit with its 4-bit LoRA layer only on models that declare 4-bit loading.
        model.is_loaded_in_4bit = True
    if computed and report.cache_path is not None:
        _write_cache(report, computed, identity)
    report.seconds = time.perf_counter() - start
    return report


def _write_cache(report: QuantReport, computed: dict, identity: dict[str, str]) -> None:
    metadata = {
        **identity,
        "ara_error_metric": report.error_metric or "",
        "ara_errors": json.dumps(report.errors),
        "ara_calibration_samples_used": str(report.calibration_samples),
    }
    try:
        write_adapter_file(report.cache_path, computed, metadata)
    except (OSError, ArtifactWriteError) as exc:  # a read-only model folder must not stop training; the adapters
        # are already installed
        log.warning("could not write the adapter cache %s (%s); set quant.ara_cache_dir", report.cache_path, exc)
        report.cache_path = None


def quantize_text_encoder(model: nn.Module, cfg: QuantConfig, device: torch.device | str) -> QuantReport:
    """``cfg.text_encoder == 'float8'``: store every Linear of the text encoder as float8 e4m3 with per-row scales,
    dequantized on the fly (no fp8 matmul: the encoder's activations have outliers that per-row activation
    scaling handles badly, and it only runs to encode captions). Embeddings and norms keep their dtype; the
    model ends on ``device``. ``'bf16'`` changes nothing."""
    start = time.perf_counter()
    report = QuantReport(mode=cfg.text_encoder, label="text encoder")
    if cfg.text_encoder == "bf16":
        report.mode = "none"
        return report
    device = torch.device(device)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    report.layers, report.quantizer, report.error_metric = len(linears), "float8 e4m3 rowwise", "weights"
    with torch.no_grad():
        for name in list(linears):
            linear = linears.pop(name).to(device)
            layer = Float8Linear(linear, _compute_dtype(linear.weight.dtype), fp8_matmul=False)
            weight = linear.weight.float()
            report.errors[name] = relative_output_errors(weight, weight - layer.dequantize(), None, None)
            _replace(model, name, layer)
            del linear, weight
        model.to(device)
    report.seconds = time.perf_counter() - start
    return report
