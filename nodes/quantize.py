"""Quantize ARA (QUANTIZATION panel): how the frozen base weights are stored while training and previewing."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from trainer_core.config import QuantConfig, format_validation_error
from trainer_core.errors import ConfigError

from . import host
from .bundle import CATEGORY, EXPERTS
from .widgets import inputs, partial_config

if TYPE_CHECKING:
    from trainer_core.api import ExpertsBundle

COMPUTE = "compute"
_T = "tooltip"


def _adapter_files() -> list[str]:
    return [COMPUTE, *(n for n in host.model_files("loras") if n.lower().endswith(".safetensors"))]


class QuantizeARA:
    """Quantization settings on the experts bundle; Train LoRA quantizes the experts before attaching the LoRA."""

    #: The widgets that are QuantConfig settings (defaults, limits and tooltips are the config's).
    FIELDS = {
        "transformer": "quant.transformer",
        "quantizer": "quant.quantizer",
        "ara_rank": "quant.ara_rank",
        "calibration_samples": "quant.ara_calibration_samples",
        "text_encoder": "quant.text_encoder",
        "adapter_cache_dir": "quant.ara_cache_dir",
        "fp8_backward": "quant.fp8_backward",
    }
    # A Quantize ARA node is there to quantize: auto (float8 on cards with fp8 matmuls, else 4bit_ara) and a float8
    # text encoder (the 24 GB recipe) rather than the job file's 'none' / 'bf16'; computed adapters go under
    # ComfyUI's models folder, where no loader lists them.
    UI = {
        "transformer": {"default": "auto"},
        "text_encoder": {"default": "float8"},
        "adapter_cache_dir": {"default": "wan22_ara_cache"},
    }

    #: What QuantConfig's errors call the adapter setting -> its widgets (:mod:`.messages`).
    WORDS = {"set ara_source: compute": "set adapter to compute", "'ara_source': ara_source": "adapter / adapter_path",
             "'ara_source'": "adapter / adapter_path", "ara_source": "adapter / adapter_path"}  # fmt: skip

    @classmethod
    def INPUT_TYPES(cls):
        settings = inputs(cls.FIELDS, cls.UI)
        return {
            "required": {
                "experts": (EXPERTS, {_T: "Base model from Load Wan22 Experts"}),
                "transformer": settings.pop("transformer"),
                "quantizer": settings.pop("quantizer"),
                # the adapter's source as ComfyUI offers files: a list of models/loras, or a path
                "adapter": (_adapter_files(), {"default": COMPUTE, _T: (
                    "compute: build the adapters from the weights, tuned on your clips and cached; or an adapter "
                    ".safetensors from models/loras")}),
                "adapter_path": ("STRING", {"default": "", _T: (
                    "Absolute path of an adapter .safetensors; overrides the adapter list when set")}),
                **settings,
            }
        }

    RETURN_TYPES = (EXPERTS,)
    RETURN_NAMES = ("experts",)
    OUTPUT_TOOLTIPS = ("The same base model, quantized for Train LoRA and Preview Sample.",)
    FUNCTION = "quantize"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Store the frozen experts in float8 or in 4 bits with accuracy recovery adapters while training (auto: "
        "float8 on cards with fp8 matmuls, RTX 40xx/50xx and newer, else 4 bits); the LoRA "
        "itself stays full precision and works on the unquantized model. Train LoRA quantizes the experts before "
        "attaching the LoRA; Preview Sample renders with the quantized experts."
    )

    def quantize(self, experts: ExpertsBundle, adapter: str, adapter_path: str, **values: Any) -> tuple[ExpertsBundle]:
        """Validate the settings into a :class:`QuantConfig` (an adapter file is checked now) on a new bundle."""
        source = adapter_path.strip() or (adapter if adapter == COMPUTE else host.model_file_path("loras", adapter))
        if adapter_path.strip() and not Path(source).expanduser().is_absolute():
            raise ConfigError(
                f"Quantize ARA: adapter_path {source!r} must be an absolute path - or put the file in models/loras "
                "and pick it from the adapter list"
            )
        cache_dir = values["adapter_cache_dir"].strip()
        if not cache_dir:
            raise ConfigError("Quantize ARA: adapter_cache_dir is empty - give a folder such as wan22_ara_cache")
        values = {**values, "adapter_cache_dir": str(host.models_path(cache_dir, "Quantize ARA: adapter_cache_dir"))}
        try:
            cfg = QuantConfig(ara_source=source, **partial_config(self.FIELDS, values)["quant"])
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "Quantize ARA")) from None
        from trainer_core.quant import check_ara_source  # bitsandbytes: on first use, not at ComfyUI's start

        check_ara_source(cfg)
        return (experts.with_quant(cfg),)
