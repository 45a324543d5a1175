"""The validation loss: each trained expert's flow-matching loss on the held-out clips, at fixed noise.

What is measured. Every held-out clip (``dataset.validation``, see :mod:`trainer_core.data.holdout`) is noised at a
fixed grid of noise levels inside the expert's range (:func:`validation_sigmas`) with noise drawn from (seed,
expert, clip, grid point); the expert (its live LoRA on, not the EMA; eval mode: no LoRA dropout; no gradients)
predicts its velocity, and the loss is the training loss's own unguided flow-matching MSE
(:func:`~.objective.objective_loss`, weighted as ``train.timestep_type`` weights it), with the same cached caption
embeddings and latents, averaged over clips and grid points. Only the LoRA changes between validation points, so the
curve is free of the sampling noise that makes the training loss jump from step to step: a rise is overfitting, not
bad luck.

When (:meth:`Validator.due`): before the first step (the starting point), every ``train.validate_every`` steps
(unset: at every checkpoint save) and at the last step; ``validate_every: 0`` turns it off.

Where. The placement slices each clip's grid rows like a global batch (:meth:`~.placement.Placement.slice`): data
parallel ranks each compute a slice and sum it (``loss_sum``), sharded ranks all take part in every forward, an
expert group computes its own expert; :meth:`~.placement.Placement.exchange` then gives every rank both experts'
figures, as it does a round's losses.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..config import JobConfig
from ..data import BatchRef, VideoDataset
from ..names import EXPERTS
from ..sample.sampler import eval_modes
from ..schedule import expert_sigma_range
from .conditioning import Conditioner
from .objective import LossInputs, LossSettings, objective_loss
from .placement import Placement

log = logging.getLogger(__name__)

#: Noise levels per expert and clip, each one forward pass (no backward) per validation point: four evenly spaced
#: levels cover an expert's range (the high-noise expert's [0.875, 1) at 0.891, 0.922, 0.953, 0.984) and keep a
#: validation point at four forwards per clip.
GRID_POINTS = 4
_NOISE_STREAM = 0x56414C  # "VAL": the validation noise's seeds never meet a training step's


def validation_sigmas(expert: str, boundary: float, points: int = GRID_POINTS) -> torch.Tensor:
    """``points`` noise levels evenly spread over ``expert``'s range: the midpoints of equal slices of [lo, hi), so
    every one routes to ``expert`` (float32, and t = 1000·σ too)."""
    lo, hi = expert_sigma_range(expert, boundary)
    return torch.tensor([lo + (k + 0.5) * (hi - lo) / points for k in range(points)], dtype=torch.float32)


def validation_noise(seed: int, expert: str, clip: int, point: int, shape: torch.Size) -> torch.Tensor:
    """The fixed noise of one clip at one grid point of ``expert`` (float32, CPU): the same at every validation
    point, on every device and in every placement."""
    entropy = [seed, _NOISE_STREAM, EXPERTS.index(expert), clip, point]
    derived = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(derived), dtype=torch.float32)


def validation_set(cfg: JobConfig, dataset: VideoDataset) -> VideoDataset | None:
    """The held-out clips the run validates on, or ``None`` (none held out, or ``train.validate_every: 0``)."""
    return dataset.validation if cfg.train.validate_every != 0 else None


def validation_captions(held: VideoDataset | None) -> set[str]:
    """The held-out clips' captions (to encode with the training captions)."""
    return {held.plan(i, 0).caption for i in range(len(held))} if held is not None else set()


class Validator:
    """The validation loss of a run (see the module docstring). ``latent(i)`` is held-out clip ``i``'s latent
    ``[1, C, F, H, W]``; each is read (or encoded) once, here, and kept in host memory for the run."""

    def __init__(
        self,
        cfg: JobConfig,
        held: VideoDataset,
        latent: Callable[[int], torch.Tensor],
        condition: Conditioner,
        settings: LossSettings,
        placement: Placement,
    ) -> None:
        self.cfg, self.condition, self.settings, self.placement = cfg, condition, settings, placement
        self.latents = [latent(i).float() for i in range(len(held))]
        self.captions = [held.plan(i, 0).caption for i in range(len(held))]

    def due(self, first: int, step: int) -> bool:
        """Whether a validation point falls in the round that took the run from ``first`` to ``step`` completed
        steps: every ``train.validate_every`` (unset: ``save.save_every``) steps, and at the last step."""
        every = self.cfg.train.validate_every
        every = self.cfg.save.save_every if every is None else every
        return step == self.cfg.train.steps or (every > 0 and step // every > first // every)

    def evaluate(self, step: int, models: dict[str, nn.Module], activate: Callable[[str], object]) -> dict[str, float]:
        """The validation loss of every trained expert after ``step`` steps, as every rank learns it. ``models``:
        this rank's experts, in the order to visit them (``activate(name)`` brings one onto the device)."""
        stages = self.placement.stages
        mine = {name: self._expert_loss(name, model, activate) for name, model in models.items()}
        held = [n in mine for n in stages]
        values, _, _ = self.placement.exchange(held, [mine.get(n, 0.0) for n in stages], [0.0] * len(stages), False)
        result = dict(zip(stages, values))
        if self.placement.ctx.is_main:
            log.info("validation loss at step %d: %s", step, ", ".join(f"{n} {v:.4f}" for n, v in result.items()))
        return result

    def _expert_loss(self, name: str, model: nn.Module, activate: Callable[[str], object]) -> float:
        """The mean loss of ``name`` over every clip and grid point; each clip's grid is cut into batches of
        ``train.batch_size`` rows (the memory plan's batch), which the placement slices."""
        activate(name)
        sigmas = validation_sigmas(name, self.cfg.multistage.boundary)
        size, total = self.cfg.train.batch_size, 0.0
        with torch.no_grad(), eval_modes(model):
            for clip in range(len(self.latents)):
                for start in range(0, len(sigmas), size):
                    ref = BatchRef(0, clip, tuple(range(start, min(start + size, len(sigmas)))))
                    part = self.placement.slice(ref, True)
                    mean = self._rows_loss(model, name, clip, list(part.sample_ids), sigmas) if part.sample_ids else 0.0
                    total += self.placement.loss_sum(mean * part.share) * len(ref.sample_ids)
        return total / (len(self.latents) * len(sigmas))

    def _rows_loss(self, model: nn.Module, name: str, clip: int, rows: list[int], sigmas: torch.Tensor) -> float:
        """The mean loss of clip ``clip`` at grid points ``rows``."""
        device, n = self.placement.device, len(rows)
        x0 = self.latents[clip].to(device)
        noise = torch.stack([validation_noise(self.cfg.train.seed, name, clip, k, x0.shape[1:]) for k in rows])
        text = self.condition([self.captions[clip]]).to(device)
        inputs = LossInputs(x0.expand(n, *x0.shape[1:]), noise.to(device), sigmas[rows].to(device),
                            text.expand(n, *text.shape[1:]))  # fmt: skip
        return float(objective_loss(model, inputs, self.settings)[1].normal_mse)
