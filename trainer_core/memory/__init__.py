"""GPU memory: low-VRAM expert swapping, transformer-block offloading, activation checkpointing policies and the
VRAM planner."""

from .blocks import BlockPlan, choose_block_plan, install_block_plan
from .offload import OffloadedExpert, streamed_blocks
from .planner import (
    WAN22_A14B_ARCH,
    HostMemory,
    Plan,
    PlanItem,
    check_plan,
    estimate_host_memory,
    estimate_peak_vram,
    model_arch,
    plan_job,
)
from .swap import ExpertMemory, SwitchRecord

__all__ = [
    "BlockPlan",
    "WAN22_A14B_ARCH",
    "ExpertMemory",
    "HostMemory",
    "OffloadedExpert",
    "Plan",
    "PlanItem",
    "SwitchRecord",
    "check_plan",
    "choose_block_plan",
    "estimate_host_memory",
    "estimate_peak_vram",
    "install_block_plan",
    "model_arch",
    "plan_job",
    "streamed_blocks",
]
