"""``quant.transformer: auto``: the experts' quantization for the card the job runs on."""

from __future__ import annotations

import logging

import torch

from ..config import JobConfig, QuantConfig
from .float8 import supports_fp8_matmul

log = logging.getLogger(__name__)


def auto_transformer_quant(device_type: str, fp8_matmul: bool) -> str:
    """What ``auto`` means on a device: float8 where the card multiplies in fp8 (faster than 4-bit there and closer
    to bf16: ``benchmarks/results/tier24_bench_h200.json``), 4bit_ara on other GPUs (float8 would be dequantized
    for every matmul), and no quantization on the CPU (tiny models only)."""
    if device_type != "cuda":
        return "none"
    return "float8" if fp8_matmul else "4bit_ara"


def resolved_quant(quant: QuantConfig, device: torch.device) -> QuantConfig:
    """``quant`` with ``transformer: auto`` replaced by its value on ``device`` (logged), else ``quant`` itself."""
    if quant.transformer != "auto":
        return quant
    device = torch.device(device)
    choice = auto_transformer_quant(device.type, supports_fp8_matmul(device))
    log.info("quant.transformer: auto -> %s on %s", choice, device)
    return quant.model_copy(update={"transformer": choice})


def resolve_transformer_quant(cfg: JobConfig, device: torch.device) -> JobConfig:
    """``cfg`` with ``quant.transformer: auto`` resolved for ``device``, else ``cfg`` itself."""
    if cfg.quant.transformer != "auto":
        return cfg
    return cfg.model_copy(update={"quant": resolved_quant(cfg.quant, device)})
