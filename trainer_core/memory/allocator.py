"""CUDA caching-allocator settings for training."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

#: The share of a training peak the CUDA allocator reserves beyond it. With expandable segments (set for PyTorch's
#: native allocator by :func:`use_expandable_segments`) training runs measured 3%.
FRAGMENTATION = 0.03
#: Without them (ComfyUI's default ``cudaMallocAsync`` backend, or a platform without expandable segments): workflow
#: 2 in ComfyUI on an H100 ran out of memory with 65.5 GiB allocated of 79.2 GiB, 21% of the allocation lost
#: (benchmarks/results/e2e_h100_2026-12-05/comfy_cudamallocasync_oom.log), and with this margin ran reserving 22%
#: beyond its allocation; the native allocator without them held 27 GiB reserved-but-unusable beside 110 GiB
#: allocated on an H200 (25%).
FRAGMENTATION_UNEXPANDABLE = 0.25


def use_expandable_segments() -> bool:
    """Let PyTorch's native CUDA allocator grow segments instead of caching many fixed-size ones.

    At 1024x1024x81 a training step allocates and frees activations of several GiB each; with fixed segments the
    allocator was measured holding 27 GiB reserved-but-unusable on an H200 and running out of memory with 110 GiB
    allocated. Expandable segments remove that fragmentation. Applies to allocations made from now on; does nothing
    under another allocator backend (e.g. ComfyUI's ``cudaMallocAsync``), which manages fragmentation itself.
    Returns whether the setting is in effect.
    """
    if not torch.cuda.is_available() or torch.cuda.memory.get_allocator_backend() != "native":
        return False
    # torch 2.11 moved the setter (the old name still works but warns)
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    try:
        setter("expandable_segments:True")
    except RuntimeError as exc:  # e.g. a platform without virtual memory management
        log.warning("could not enable expandable CUDA memory segments: %s", exc)
        return False
    return True


def fragmentation_share(device: torch.device, warn: bool = True) -> float:
    """The share of the peak the VRAM planner keeps spare for the allocator on ``device``: :data:`FRAGMENTATION`
    with expandable segments (switched on here for the native allocator), else :data:`FRAGMENTATION_UNEXPANDABLE`.
    With ``warn``, one line says how to get the smaller share (ComfyUI's ``--disable-cuda-malloc``)."""
    if device.type != "cuda":
        return FRAGMENTATION
    if use_expandable_segments():
        return FRAGMENTATION
    if warn:
        backend = torch.cuda.memory.get_allocator_backend()
        fix = ("start ComfyUI with --disable-cuda-malloc (or set PYTORCH_CUDA_ALLOC_CONF=backend:native) to use "
               "that memory" if backend == "cudaMallocAsync" else "")
        log.warning("PyTorch's %s CUDA allocator runs without expandable segments: the VRAM plan keeps %.0f%% of "
                    "the peak spare for its fragmentation instead of %.0f%%%s", backend,
                    FRAGMENTATION_UNEXPANDABLE * 100, FRAGMENTATION * 100, f" - {fix}" if fix else "")
    return FRAGMENTATION_UNEXPANDABLE
