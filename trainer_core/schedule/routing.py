"""Which expert handles a timestep, and which expert trains at a given optimizer step.

Routing follows Wan 2.2 (and diffusers' ``WanPipeline``): ``t ≥ boundary·1000`` goes to the high-noise expert,
everything below to the low-noise expert, compared in float32 as ``WanPipeline`` compares them. Training alternates
experts in blocks of ``switch_every`` optimizer steps, high first, so with both experts on each gets an equal share
(up to one partial block).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..names import EXPERTS


def expert_for_timestep(t: float | torch.Tensor, boundary: float) -> str:
    """``"high"`` if ``t ≥ boundary·1000`` else ``"low"`` (t on the 0-1000 scale), as :func:`high_noise_mask`."""
    return "high" if bool(high_noise_mask(torch.as_tensor(t), boundary)) else "low"


def high_noise_mask(t: torch.Tensor, boundary: float) -> torch.Tensor:
    """True where the high-noise expert handles the timesteps ``t``: ``t ≥ boundary·1000`` in float32.

    WanPipeline compares its float32 timesteps with the Python float ``boundary_ratio·1000``, which torch casts to
    float32: at 38 steps, shift 2, boundary 0.46 the timestep is exactly 460 there, while 1000·σ in float64 is
    459.99999999999994. Comparing the same way keeps every split on WanPipeline's side of such a tie.
    """
    return t.to(torch.float32) >= boundary * 1000.0


def _check_stages(stages: list[str], switch_every: int) -> None:
    if not stages or len(set(stages)) != len(stages) or any(s not in EXPERTS for s in stages):
        raise ConfigError(f"stages must be a non-empty list of distinct 'high'/'low', got {stages!r}")
    if switch_every < 1:
        raise ConfigError(f"multistage.switch_every must be >= 1 (1 alternates every step), got {switch_every}")


def active_expert(step: int, stages: list[str], switch_every: int) -> str:
    """Expert trained at 0-based optimizer step ``step``: ``stages[(step // switch_every) % len(stages)]``."""
    _check_stages(stages, switch_every)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return stages[(step // switch_every) % len(stages)]


def expert_step_counts(total_steps: int, stages: list[str], switch_every: int) -> dict[str, int]:
    """How many of the optimizer steps ``0 .. total_steps-1`` each stage gets (every stage listed, maybe 0)."""
    _check_stages(stages, switch_every)
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    blocks, rest = divmod(total_steps, switch_every)
    full_rounds, extra_blocks = divmod(blocks, len(stages))
    return {
        stage: switch_every * (full_rounds + (i < extra_blocks)) + (rest if i == extra_blocks else 0)
        for i, stage in enumerate(stages)
    }


def round_steps(step: int, total_steps: int, stages: list[str], switch_every: int, grouped: bool) -> list[int]:
    """The optimizer steps run together from ``step``: just ``[step]``, or with expert groups (``grouped``, each
    expert on its own GPUs) the following steps until an expert would come twice, so every group runs at most one
    step of the round and the groups run theirs at once."""
    _check_stages(stages, switch_every)
    if not grouped:
        return [step] if step < total_steps else []
    steps: list[int] = []
    seen: set[str] = set()
    while step < total_steps and (expert := active_expert(step, stages, switch_every)) not in seen:
        seen.add(expert)
        steps.append(step)
        step += 1
    return steps
