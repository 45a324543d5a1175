"""The pack's ComfyUI nodes (classic V1 API): thin adapters from widgets to ``trainer_core``.

Only relative imports inside this package: ComfyUI has a top-level module called ``nodes`` of its own.
"""

from .apply_lora import ApplyWan22LoraPair
from .dataset import BuildVideoDataset
from .experts import FILE_INPUTS, LoadWan22Experts
from .lora_pair import LoadWan22LoraPair
from .messages import LABELS, speaking_widgets, widget_labels
from .multistage import ConfigureMultiStage
from .quantize import QuantizeARA
from .sample import ConfigureTrainingPreviews, PreviewSample
from .save import SaveCheckpoint
from .settings import PLACEMENTS, ConfigureHardware, ConfigureOptimizer, ConfigureRegularizers
from .split_step import Wan22SplitStep
from .train import TrainWan22LoRA

NODE_CLASS_MAPPINGS = {
    "Wan22LoadExperts": LoadWan22Experts,
    "Wan22QuantizeARA": QuantizeARA,
    "Wan22BuildVideoDataset": BuildVideoDataset,
    "Wan22ConfigureMultiStage": ConfigureMultiStage,
    "Wan22SaveCheckpoint": SaveCheckpoint,
    "Wan22TrainLoRA": TrainWan22LoRA,
    "Wan22ConfigureOptimizer": ConfigureOptimizer,
    "Wan22ConfigureRegularizers": ConfigureRegularizers,
    "Wan22ConfigureHardware": ConfigureHardware,
    "Wan22ConfigureTrainingPreviews": ConfigureTrainingPreviews,
    "Wan22PreviewSample": PreviewSample,
    "Wan22ApplyLoraPair": ApplyWan22LoraPair,
    "Wan22LoadLoraPair": LoadWan22LoraPair,
    "Wan22SplitStep": Wan22SplitStep,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "Wan22LoadExperts": "Load Wan22 Experts",
    "Wan22QuantizeARA": "Quantize ARA",
    "Wan22BuildVideoDataset": "Build Video Dataset",
    "Wan22ConfigureMultiStage": "Configure MultiStage",
    "Wan22SaveCheckpoint": "Save Checkpoint",
    "Wan22TrainLoRA": "Train LoRA",
    "Wan22ConfigureOptimizer": "Configure Optimizer",
    "Wan22ConfigureRegularizers": "Configure Regularizers",
    "Wan22ConfigureHardware": "Configure Hardware",
    "Wan22ConfigureTrainingPreviews": "Configure Training Previews",
    "Wan22PreviewSample": "Preview Sample",
    "Wan22ApplyLoraPair": "Apply Wan22 LoRA Pair",
    "Wan22LoadLoraPair": "Load Wan22 LoRA Pair",
    "Wan22SplitStep": "Wan22 Split Step",
}


def _speak_widgets() -> None:
    """Wrap every node's function so the settings its errors name read as widgets (:mod:`.messages`)."""
    # the nodes that feed Train LoRA first: their widget is the one to set for a job's setting
    order = [*(k for k in NODE_CLASS_MAPPINGS if k != "Wan22PreviewSample"), "Wan22PreviewSample"]
    fields = {NODE_DISPLAY_NAME_MAPPINGS[k]: (k, getattr(NODE_CLASS_MAPPINGS[k], "FIELDS", {})) for k in order}
    load = NODE_DISPLAY_NAME_MAPPINGS["Wan22LoadExperts"]
    files = {widget: f"model.{key}" for widget, (key, _) in FILE_INPUTS.items()}
    fields[load] = (fields[load][0], {**fields[load][1], **files, "source": "model.source"})
    quantize = NODE_DISPLAY_NAME_MAPPINGS["Wan22QuantizeARA"]
    fields[quantize] = (fields[quantize][0], {**fields[quantize][1], "adapter": "quant.ara_source"})
    labels = widget_labels(fields)
    # the distributed flags are gpu_placement's choices (distributed.placement: the choice itself)
    hardware = NODE_DISPLAY_NAME_MAPPINGS["Wan22ConfigureHardware"]
    labels["distributed.placement"] = ("gpu_placement", hardware)
    for choice, flags in PLACEMENTS.items():
        labels.update({f"distributed.{flag}": (f"gpu_placement '{choice}'", hardware) for flag in flags})
    LABELS.update(labels)
    for node_id, cls in NODE_CLASS_MAPPINGS.items():
        title = NODE_DISPLAY_NAME_MAPPINGS[node_id]
        wrapped = speaking_widgets(getattr(cls, cls.FUNCTION), labels, title, fields[title][1],
                                   getattr(cls, "WORDS", None))
        setattr(cls, cls.FUNCTION, wrapped)


_speak_widgets()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
