"""Wan 2.2 T2V A14B LoRA trainer core: config, model loading, data, schedules, LoRA I/O, training, sampling.

Never imports ComfyUI; the pack's ``nodes/`` are thin adapters over this package.
"""

__version__ = "0.1.0"
