"""The trainer's optimizer step: what the loop runs for each step and the benchmarks time.

A step draws each micro-batch's noise levels and noise for the whole global batch from a generator private to that
(step, micro-batch) and keeps this rank's rows (:func:`draw_micro_batch`), backpropagates each micro-batch through the
objective, sums the loss and the LoRA gradients over the ranks that split the batch and steps the optimizer
(:func:`train_step`). N ranks therefore compute exactly what one process would, and a resumed run what the
uninterrupted one did.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from ..config import JobConfig
from ..lora import lora_parameters
from ..lora.dropout import global_batch_rows
from ..schedule import sample_sigmas
from .experts import Expert
from .objective import LossInputs, LossSettings, MicroBatch, Objective, objective_loss
from .placement import Placement, RankBatch


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator private to one micro-batch of one step (makes resume exact by construction)."""
    derived = int(np.random.SeedSequence([seed, step, micro]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device="cpu").manual_seed(derived)


def draw_micro_batch(
    cfg: JobConfig,
    batch: RankBatch,
    x0: torch.Tensor,
    captions: Sequence[str],
    regularization: Sequence[bool],
    expert: str,
    step: int,
    micro: int,
) -> MicroBatch:
    """Micro-batch ``micro`` of 0-based optimizer ``step`` of ``expert``: noise levels and noise drawn for the global
    batch, then sliced to this rank's rows (``batch.rows``), on ``x0``'s device."""
    gen = step_generator(cfg.train.seed, step, micro)
    sigmas = sample_sigmas(
        batch.global_size,
        expert=expert,
        boundary=cfg.multistage.boundary,
        timestep_type=cfg.train.timestep_type,
        timestep_bias=cfg.train.timestep_bias,
        shift=cfg.train.timestep_shift,
        generator=gen,
    )
    noise = torch.randn((batch.global_size, *x0.shape[1:]), generator=gen, dtype=torch.float32)
    # LoRA dropout draws from the global generator: its seed comes from this micro-batch's generator too, so that a
    # resume (and data workers, which consume global draws in the parent) cannot shift its masks
    dropout_seed = int(torch.randint(2**62, (1,), generator=gen))
    rows = list(batch.rows)
    return MicroBatch(x0, noise[rows].to(x0.device), sigmas[rows].to(x0.device), captions, regularization,
                      batch.share, dropout_seed, batch.global_size, tuple(rows))  # fmt: skip


def train_step(
    expert: Expert,
    micro_batches: Iterable[MicroBatch | None],
    objective: Objective,
    placement: Placement,
    max_grad_norm: float | None,
) -> float:
    """One optimizer step of ``expert`` on this rank's micro-batches (``None``: a micro-batch this rank got no sample
    of, which still takes part in the loss sum); returns the step's loss, the mean over the global batch. A non-finite
    loss or gradient skips the update and returns a non-finite value (the caller stops training)."""
    accumulation = objective.cfg.train.gradient_accumulation
    step_loss = 0.0
    for micro in micro_batches:
        contribution = 0.0
        if micro is not None:
            if micro.dropout_seed is not None:
                torch.manual_seed(micro.dropout_seed)
            rows = micro.rows or range(micro.x0.shape[0])
            with global_batch_rows(micro.global_size or len(rows), rows):
                contribution = objective.backward(expert.model, micro) * micro.share
        step_loss += placement.loss_sum(contribution) / accumulation
    if not math.isfinite(step_loss):
        expert.optimizer.zero_grad(set_to_none=True)
        return step_loss
    placement.all_reduce_grads(lora_parameters(expert.model))
    return step_loss if expert.optimizer_step(max_grad_norm) else math.nan


def micro_batch_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: torch.Tensor,
    timestep_type: str,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """The plain flow-matching loss of ``model`` on clean latents ``x0`` noised with ``noise`` at ``sigmas`` (weighted
    if ``timestep_type`` asks), as one tensor to backpropagate: the objective without regularizers, for tools that
    time or probe a forward and backward alone."""
    loss, _ = objective_loss(model, LossInputs(x0, noise, sigmas, text), LossSettings(timestep_type, autocast_dtype))
    return loss
