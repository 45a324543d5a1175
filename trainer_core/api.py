"""The core's public surface for hosts: what a front end (the ComfyUI nodes, a script) needs to check a job, train
it, read its result back and keep models loaded between runs. Hosts import from here; the names live in the modules
listed, which hold their documentation."""

from .bundle import AS_LOADED, ComponentStore, ExpertsBundle, LoraPair, final_pair, has_quantized_layers
from .bundle import lora_attached, placed, release_expert, shared_store
from .config import job_warnings
from .train.loop import StepInfo, TrainResult, finished_result, job_dataset, preflight, run_training
from .train.placement import resolve_device

__all__ = [
    "AS_LOADED",
    "ComponentStore",
    "ExpertsBundle",
    "LoraPair",
    "StepInfo",
    "TrainResult",
    "final_pair",
    "finished_result",
    "has_quantized_layers",
    "job_dataset",
    "job_warnings",
    "lora_attached",
    "placed",
    "preflight",
    "release_expert",
    "resolve_device",
    "run_training",
    "shared_store",
]
