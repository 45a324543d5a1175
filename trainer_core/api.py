"""The core's public surface for hosts: what a front end (the ComfyUI nodes, a script) needs to check a job, train
it, read its result back and keep models loaded between runs. Hosts import from here; the names live in the modules
listed, which hold their documentation."""

from .bundle import (
    AS_LOADED,
    ComponentStore,
    ExpertsBundle,
    LoraPair,
    check_pair_fits,
    final_pair,
    has_quantized_layers,
    lora_attached,
    placed,
    release_expert,
    shared_store,
)
from .config import job_warnings
from .memory import plan_job
from .memory.planner import Plan, estimate_host_memory, host_memory_warning
from .train.loop import (
    StepInfo,
    TrainResult,
    finished_result,
    job_dataset,
    preflight,
    run_training,
)
from .quant.choice import resolve_transformer_quant
from .train.placement import resolve_device
from .train.previews import preview_quantization, previews_enabled
from .train.runs import Manifest, RunFolder, read_losses, read_validation

__all__ = [
    "AS_LOADED",
    "ComponentStore",
    "ExpertsBundle",
    "LoraPair",
    "Manifest",
    "Plan",
    "RunFolder",
    "StepInfo",
    "TrainResult",
    "check_pair_fits",
    "estimate_host_memory",
    "final_pair",
    "finished_result",
    "has_quantized_layers",
    "host_memory_warning",
    "job_dataset",
    "job_warnings",
    "lora_attached",
    "placed",
    "plan_job",
    "preflight",
    "preview_quantization",
    "previews_enabled",
    "read_losses",
    "read_validation",
    "release_expert",
    "resolve_device",
    "resolve_transformer_quant",
    "run_training",
    "shared_store",
]
