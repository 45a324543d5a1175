"""Wan22 Split Step: the step where ComfyUI's native Wan 2.2 graph hands over from the high- to the low-noise expert."""

from __future__ import annotations

from trainer_core.errors import ConfigError
from trainer_core.sample import SCHEDULERS, comfy_sigmas, switch_step

from . import host
from .bundle import CATEGORY

_T = "tooltip"


class Wan22SplitStep:
    """Steps, shift, scheduler and boundary -> the end step of the high-noise KSamplerAdvanced and the start step of
    the low-noise one (the same number), plus steps and shift to drive both samplers and ModelSamplingSD3."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": 40, "min": 1, "max": 10000, _T: (
                    "Total steps of both KSamplerAdvanced nodes (connect the steps output to both)")}),
                "shift": ("FLOAT", {"default": 12.0, "min": 0.01, "max": 100.0, "step": 0.01, _T: (
                    "ModelSamplingSD3's shift (connect the shift output to both ModelSamplingSD3 nodes)")}),
                "scheduler": (list(SCHEDULERS), {"default": "normal", _T: (
                    "The scheduler set in both KSamplerAdvanced nodes (the split depends on it)")}),
                # every boundary Preview Sample and Configure MultiStage take: (0, 1) in their steps of 0.001
                "boundary": ("FLOAT", {"default": 0.875, "min": 0.001, "max": 0.999, "step": 0.001, _T: (
                    "Noise level where the low-noise expert takes over: 0.875 for Wan 2.2 T2V (as in Configure "
                    "MultiStage)")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("INT", "INT", "INT", "FLOAT")
    RETURN_NAMES = ("high_end_at_step", "low_start_at_step", "steps", "shift")
    OUTPUT_TOOLTIPS = (
        "end_at_step of the high-noise KSamplerAdvanced (add_noise enable, return_with_leftover_noise enable)",
        "start_at_step of the low-noise KSamplerAdvanced (add_noise disable, end_at_step 10000)",
        "steps of both KSamplerAdvanced nodes",
        "shift of both ModelSamplingSD3 nodes",
    )
    FUNCTION = "split"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "The expert switch step of a native Wan 2.2 graph: the high-noise expert runs the steps whose noise level is "
        "at least the boundary. It depends on steps, shift and scheduler, so it is computed rather than guessed."
    )

    def split(
        self, steps: int, shift: float, scheduler: str, boundary: float, unique_id: str | None = None
    ) -> tuple[int, int, int, float]:
        """The switch step for these settings, shown in the node text with the noise levels around it."""
        if scheduler not in SCHEDULERS or steps < 1 or shift <= 0 or not 0 < boundary < 1:
            raise ConfigError(
                f"Wan22 Split Step: need steps >= 1, shift > 0, scheduler in {SCHEDULERS} and 0 < boundary < 1; got "
                f"steps {steps}, shift {shift}, scheduler {scheduler!r}, boundary {boundary}"
            )
        sigmas = comfy_sigmas(scheduler, steps, shift)
        split = switch_step(sigmas, boundary)
        host.Progress(1, unique_id).text(
            f"high 0→{split}, low {split}→{steps} (σ at step {split - 1}: {sigmas[split - 1]:.4f} ≥ {boundary:g}"
            + (f" > σ at step {split}: {sigmas[split]:.4f})" if split < steps else ")")
        )
        return split, split, steps, shift
