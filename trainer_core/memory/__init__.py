"""GPU memory: low-VRAM expert swapping, transformer-block offloading and the VRAM planner."""

from .offload import OffloadedExpert, streamed_blocks
from .planner import Plan, PlanItem, WAN22_A14B_ARCH, check_plan, estimate_peak_vram, model_arch, plan_job
from .swap import ExpertMemory, SwitchRecord

__all__ = [
    "WAN22_A14B_ARCH",
    "ExpertMemory",
    "OffloadedExpert",
    "Plan",
    "PlanItem",
    "SwitchRecord",
    "check_plan",
    "estimate_peak_vram",
    "model_arch",
    "plan_job",
    "streamed_blocks",
]
