"""The trainer's shared vocabulary: the two experts' ids and the dtype names settings use.

Every module that names an expert or maps a dtype setting reads it from here, so the ids cannot drift apart.
"""

from __future__ import annotations

import torch

#: The Wan 2.2 experts in the order the schedule alternates them: high noise (t >= boundary) first, then low noise.
HIGH, LOW = "high", "low"
EXPERTS: tuple[str, str] = (HIGH, LOW)

#: How file names, ComfyUI and ai-toolkit spell each expert (``<name>_<step>_high_noise.safetensors``).
EXPERT_SUFFIX: dict[str, str] = {HIGH: "high_noise", LOW: "low_noise"}

#: The ``trainer`` metadata of every LoRA file this trainer writes begins with this name (then its version).
TRAINER = "wan22-lora-trainer"

#: The dtype names of ``model.dtype``, ``train.compute_dtype`` and ``save.dtype``.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
