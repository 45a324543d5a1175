"""Optional training regularizers: Differential Output Preservation, differential guidance, EMA of the LoRA."""

from .checks import check_regularizers
from .dop import dop_loss, lora_disabled, preservation_caption, preservation_captions, prior_prediction
from .ema import LoraEMA, ema_lora_file_name, ema_lora_state_dict, save_ema_lora
from .guidance import guided_target

__all__ = [
    "LoraEMA",
    "check_regularizers",
    "dop_loss",
    "ema_lora_file_name",
    "ema_lora_state_dict",
    "guided_target",
    "lora_disabled",
    "preservation_caption",
    "preservation_captions",
    "prior_prediction",
    "save_ema_lora",
]
