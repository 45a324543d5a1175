"""Quantized base weights: float8, 4-bit (NF4 / uint4) with accuracy recovery adapters, and the text encoder."""

from .apply import Calibration, QuantReport, adapters_cached, quant_targets, quantize_expert, quantize_text_encoder
from .ara import low_rank_adapter, relative_output_errors
from .ara_files import check_ara_source, model_file_identity, read_adapter_file, write_adapter_file
from .float8 import Float8Linear, supports_fp8_matmul
from .nf4 import NF4Linear
from .uint4 import UInt4Linear

__all__ = [
    "Calibration",
    "Float8Linear",
    "NF4Linear",
    "QuantReport",
    "UInt4Linear",
    "adapters_cached",
    "check_ara_source",
    "low_rank_adapter",
    "model_file_identity",
    "quant_targets",
    "quantize_expert",
    "quantize_text_encoder",
    "read_adapter_file",
    "relative_output_errors",
    "supports_fp8_matmul",
    "write_adapter_file",
]
