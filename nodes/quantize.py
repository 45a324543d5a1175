"""Quantize ARA (QUANTIZATION panel): how the frozen base weights are stored while training and previewing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from trainer_core.config import QuantConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, EXPERTS

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle

COMPUTE = "compute"
_T = "tooltip"


def _adapter_files() -> list[str]:
    return [COMPUTE, *(n for n in host.model_files("loras") if n.lower().endswith(".safetensors"))]


class QuantizeARA:
    """Quantization settings on the experts bundle; Train LoRA quantizes the experts before attaching the LoRA."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "experts": (EXPERTS, {_T: "Base model from Load Wan22 Experts"}),
                "transformer": (("4bit_ara", "float8", "none"), {"default": "4bit_ara", _T: (
                    "24 GB: 4bit_ara (~7 GiB per expert); H100/H200: 4bit_ara or float8 (13 GiB, fp8 matmuls); "
                    "none keeps the experts as loaded")}),
                "quantizer": (("nf4", "uint4"), {"default": "nf4", _T: (
                    "4-bit format: nf4 for computed adapters; uint4 for ai-toolkit's *_torchao_uint4 adapter files")}),
                "adapter": (_adapter_files(), {"default": COMPUTE, _T: (
                    "compute: build the adapters from the weights, tuned on your clips and cached; or an adapter "
                    ".safetensors from models/loras")}),
                "adapter_path": ("STRING", {"default": "", _T: (
                    "Absolute path of an adapter .safetensors; overrides the adapter list when set")}),
                "ara_rank": ("INT", {"default": 16, "min": 1, "max": 1024, _T: (
                    "Adapter rank: 16 recovers most of the 4-bit error; an adapter file's rank must match")}),
                "calibration_samples": ("INT", {"default": 8, "min": 0, "max": 256, _T: (
                    "Training clips whose activations tune computed adapters: 8; 0 = from the weights alone "
                    "(faster)")}),
                "text_encoder": (("float8", "bf16"), {"default": "float8", _T: (
                    "UMT5 weights: float8 halves its memory (fine on every card); bf16 keeps it as loaded")}),
                "adapter_cache_dir": ("STRING", {"default": "wan22_ara_cache", _T: (
                    "Folder that keeps computed adapters for the next run; relative to ComfyUI's models folder, "
                    "where no loader lists them")}),
                "fp8_backward": ("BOOLEAN", {"default": True, _T: (
                    "float8 on Ada/Hopper GPUs (RTX 40xx, L40, H100/H200): also compute the backward pass through "
                    "the frozen layers in fp8 (faster, slightly less exact); off uses the bf16 weight there")}),
            }
        }

    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The same base model, quantized for Train LoRA and Preview Sample.",)
    FUNCTION = "quantize"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Store the frozen experts in 4 bits with accuracy recovery adapters (or float8) while training; the LoRA "
        "itself stays full precision and works on the unquantized model. Train LoRA quantizes the experts before "
        "attaching the LoRA; Preview Sample renders with the quantized experts."
    )

    def quantize(
        self,
        experts: ExpertsBundle,
        transformer: str,
        quantizer: str,
        adapter: str,
        adapter_path: str,
        ara_rank: int,
        calibration_samples: int,
        text_encoder: str,
        adapter_cache_dir: str,
        fp8_backward: bool,
    ) -> tuple[ExpertsBundle]:
        """Validate the settings into a :class:`QuantConfig` (an adapter file is checked now) on a new bundle."""
        source = adapter_path.strip() or (adapter if adapter == COMPUTE else host.model_file_path("loras", adapter))
        if adapter_path.strip() and not Path(source).expanduser().is_absolute():
            raise ConfigError(
                f"Quantize ARA: adapter_path {source!r} must be an absolute path - or put the file in models/loras "
                "and pick it from the adapter list"
            )
        if not adapter_cache_dir.strip():
            raise ConfigError("Quantize ARA: adapter_cache_dir is empty - give a folder such as wan22_ara_cache")
        try:
            cfg = QuantConfig(
                transformer=transformer,
                quantizer=quantizer,
                ara_source=source,
                ara_rank=ara_rank,
                ara_calibration_samples=calibration_samples,
                # Not the core's default (beside the model files): there ComfyUI would list them as diffusion models.
                ara_cache_dir=str(host.models_path(adapter_cache_dir.strip())),
                text_encoder=text_encoder,
                fp8_backward=fp8_backward,
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Quantize ARA")) from None
        from trainer_core.quant import check_ara_source  # bitsandbytes: on first use, not at ComfyUI's start

        check_ara_source(cfg)
        return (experts.with_quant(cfg),)
