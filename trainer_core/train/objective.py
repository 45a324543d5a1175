"""What one micro-batch optimizes, in one place: prediction -> target -> loss terms -> one backward.

* prediction: the expert with its LoRA on (:func:`trainer_core.flow.predict_velocity`); the base model with the LoRA
  off for a prior (:func:`trainer_core.regularizers.prior_prediction`, no grad);
* target: the flow-matching velocity ``noise - x0``; for regularization samples (datasets with ``is_regularization``)
  the base model's prediction on the same noisy input (:func:`with_prior`); with differential guidance pushed past
  the data (:func:`trainer_core.regularizers.guided_target`, inside :func:`normal_loss`);
* loss terms: the normal flow-matching loss (:func:`normal_loss`) and, with DOP, ``multiplier`` times the MSE of the
  LoRA's prediction for the preservation prompts against the prior (:func:`trainer_core.regularizers.dop_loss`);
* backward: :meth:`Objective.backward`, the only place the trainer calls ``backward()``.

The tensor functions are pure; :class:`MicroBatchLoss` runs the model passes and hands out each loss term as soon as
it is complete, so that the low-VRAM variant of DOP can backpropagate pass 1 before pass 3 builds its graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import JobConfig
from ..errors import ConfigError
from ..flow import flow_matching_loss, noisy_latents, predict_velocity, velocity_target
from ..regularizers import dop_loss, guided_target, preservation_caption, prior_prediction
from ..schedule import loss_weights
from .conditioning import Conditioner


def with_prior(target: torch.Tensor, prior: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``target`` with ``rows`` replaced by the base model's ``prior`` (float32): regularization samples pull the
    LoRA back towards the base model instead of towards the clip."""
    out = target.clone()
    out[list(rows)] = prior.float()
    return out


def normal_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None, guidance_scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the flow-matching loss to backpropagate, the detached unguided loss to log). With ``guidance_scale`` the
    target is guided (``pred + s·(target − pred)``): the loss is ``s²`` times the unguided one, its gradient ``s``
    times; the logged value stays comparable across settings."""
    if guidance_scale is None:
        loss = flow_matching_loss(pred, target, weights)
        return loss, loss.detach()
    loss = flow_matching_loss(pred, guided_target(pred, target, guidance_scale), weights)
    return loss, flow_matching_loss(pred.detach(), target, weights)


@dataclass(frozen=True)
class LossSettings:
    """How a micro-batch's loss is formed (from ``train``, ``advanced`` and ``memory``)."""

    timestep_type: str
    autocast_dtype: torch.dtype | None = None
    guidance_scale: float | None = None  # differential guidance; None: off
    dop_multiplier: float = 1.0
    #: DOP's passes 1 and 3 as one forward (fastest); False: one after the other, pass 1 backpropagated before
    #: pass 3 runs, so only one graph is alive at a time (``memory.low_vram``)
    dop_batched: bool = True


@dataclass
class LossInputs:
    """One micro-batch's tensors: clean latents, noise and noise levels (``[B]``), text embeddings; the rows whose
    target is the base model's prediction (``prior_rows``), and the rows DOP preserves with their preservation
    prompts' embeddings (``preserve`` / ``text_preservation``, in that order)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    text: torch.Tensor
    prior_rows: Sequence[int] = ()
    preserve: Sequence[int] = ()
    text_preservation: torch.Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.x0.shape[0]
        if self.preserve and (self.text_preservation is None or self.text_preservation.shape[0] != len(self.preserve)):
            rows = None if self.text_preservation is None else self.text_preservation.shape[0]
            raise ValueError(f"text_preservation has {rows} rows for {len(self.preserve)} preserved samples")
        if any(not 0 <= i < batch for i in [*self.preserve, *self.prior_rows]):
            raise ValueError(f"rows {list(self.preserve) + list(self.prior_rows)} fall outside the batch of {batch}")


@dataclass
class LossParts:
    """Detached scalars of a computed loss: ``total`` (what was backpropagated, over all terms), ``normal`` (the
    normal loss, guided if asked), ``normal_mse`` (the unguided flow-matching loss: the value logged) and ``dop``
    (the unscaled preservation MSE, 0 when nothing was preserved)."""

    total: torch.Tensor
    normal: torch.Tensor
    normal_mse: torch.Tensor
    dop: torch.Tensor


class MicroBatchLoss:
    """The loss terms of one micro-batch, computed pass by pass while iterated; :attr:`parts` holds the detached
    figures once the iteration ends. Iterate once, backpropagating each term before asking for the next (or sum
    them, see :func:`objective_loss`)."""

    def __init__(self, model: nn.Module, inputs: LossInputs, settings: LossSettings) -> None:
        self.model, self.inputs, self.settings = model, inputs, settings
        self.parts: LossParts | None = None

    def _predict(self, x_t: torch.Tensor, sigmas: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return predict_velocity(self.model, x_t, sigmas, text, self.settings.autocast_dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        inp, s = self.inputs, self.settings
        x_t = noisy_latents(inp.x0, inp.noise, inp.sigmas)
        weights = loss_weights(inp.sigmas, s.timestep_type)
        target = velocity_target(inp.x0, inp.noise)
        if inp.prior_rows:
            rows = list(inp.prior_rows)
            prior = prior_prediction(self.model, x_t[rows], inp.sigmas[rows], inp.text[rows],
                                     autocast_dtype=s.autocast_dtype)  # fmt: skip
            target = with_prior(target, prior, rows)
        if not inp.preserve:
            normal, logged = normal_loss(self._predict(x_t, inp.sigmas, inp.text), target, weights, s.guidance_scale)
            yield normal
            self.parts = LossParts(normal.detach(), normal.detach(), logged, torch.zeros((), device=normal.device))
            return
        sel = torch.as_tensor(list(inp.preserve), dtype=torch.long, device=x_t.device)
        # The prior first: no grad, so nothing of it is alive while the graphs of passes 1 and 3 are built.
        prior = prior_prediction(self.model, x_t[sel], inp.sigmas[sel], inp.text_preservation, predict_velocity,
                                 s.autocast_dtype)  # fmt: skip
        if s.dop_batched:
            batch = x_t.shape[0]
            both = self._predict(torch.cat([x_t, x_t[sel]]), torch.cat([inp.sigmas, inp.sigmas[sel]]),
                                 torch.cat([inp.text, inp.text_preservation.to(inp.text.dtype)]))  # fmt: skip
            normal, logged = normal_loss(both[:batch], target, weights, s.guidance_scale)
            dop = dop_loss(both[batch:], prior)
            total = normal + s.dop_multiplier * dop
            yield total
        else:
            normal, logged = normal_loss(self._predict(x_t, inp.sigmas, inp.text), target, weights, s.guidance_scale)
            yield normal
            normal = normal.detach()  # backpropagated: pass 1's graph is gone before pass 3 builds its own
            dop = dop_loss(self._predict(x_t[sel], inp.sigmas[sel], inp.text_preservation), prior)
            yield s.dop_multiplier * dop
            total = normal + s.dop_multiplier * dop.detach()
        self.parts = LossParts(total.detach(), normal.detach(), logged, dop.detach())


def objective_loss(
    model: nn.Module, inputs: LossInputs, settings: LossSettings
) -> tuple[torch.Tensor, LossParts]:
    """The whole loss of one micro-batch as one tensor (every term's graph alive until the caller's backward), and
    its parts: for benchmarks and tests; training backpropagates term by term (:meth:`Objective.backward`)."""
    terms = MicroBatchLoss(model, inputs, settings)
    total = None
    for term in terms:
        total = term if total is None else total + term
    return total, terms.parts


def dop_captions(cfg: JobConfig, captions: set[str]) -> set[str]:
    """Captions that must be encoded besides the dataset's own: DOP's preservation prompts."""
    adv = cfg.advanced
    if not adv.dop:
        return set()
    pres = (preservation_caption(c, cfg.trigger_word, adv.dop_class) for c in captions)
    return {p for p in pres if p is not None}


def check_objective(cfg: JobConfig) -> None:
    """Refuse objectives that contradict each other, before any model loads."""
    if cfg.advanced.dop and any(d.is_regularization for d in cfg.datasets):
        raise ConfigError(
            "advanced.dop is on and a dataset has is_regularization: both hold the LoRA to the base model's "
            "predictions - use DOP, or regularization datasets, not both"
        )


@dataclass
class MicroBatch:
    """One micro-batch as this rank trains it: clean latents, this rank's rows of the noise and noise levels drawn for
    the global batch, the captions and regularization flags, the share of the global batch it stands for, the
    seed of its LoRA dropout masks and which rows of a global batch of ``global_size`` it holds (``rows``: the
    masks are drawn for the global batch, see :mod:`trainer_core.lora.dropout`; empty = all of its rows)."""

    x0: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    captions: Sequence[str]
    regularization: Sequence[bool] = ()
    share: float = 1.0
    dropout_seed: int | None = None
    global_size: int = 0
    rows: tuple[int, ...] = ()


@dataclass
class Objective:
    """The job's objective: turns a :class:`MicroBatch` into :class:`LossInputs` (text conditioning, preservation
    prompts, regularization rows) and backpropagates its loss terms."""

    cfg: JobConfig
    autocast_dtype: torch.dtype | None
    condition: Conditioner
    #: Every rank must run every backward (sharded weights are gathered there): a non-finite loss is backpropagated
    #: too; the loop stops before the optimizer step either way.
    collective: bool = False
    settings: LossSettings = field(init=False)

    def __post_init__(self) -> None:
        check_objective(self.cfg)
        adv = self.cfg.advanced
        self.settings = LossSettings(
            timestep_type=self.cfg.train.timestep_type,
            autocast_dtype=self.autocast_dtype,
            guidance_scale=adv.diff_guidance_scale if adv.diff_guidance else None,
            dop_multiplier=adv.dop_multiplier,
            dop_batched=not self.cfg.memory.low_vram,
        )

    def inputs(self, micro: MicroBatch) -> LossInputs:
        """The loss's tensors for ``micro``: its captions' embeddings, and DOP's or regularization's rows."""
        device = micro.x0.device
        text = self.condition(micro.captions).to(device)
        if not self.cfg.advanced.dop:
            rows = [i for i, r in enumerate(micro.regularization) if r]
            return LossInputs(micro.x0, micro.noise, micro.sigmas, text, prior_rows=rows)
        adv = self.cfg.advanced
        pres = [preservation_caption(c, self.cfg.trigger_word, adv.dop_class) for c in micro.captions]
        keep = [i for i, p in enumerate(pres) if p is not None]
        text_pres = self.condition([pres[i] for i in keep]).to(device) if keep else None
        return LossInputs(micro.x0, micro.noise, micro.sigmas, text, preserve=keep, text_preservation=text_pres)

    def backward(self, model: nn.Module, micro: MicroBatch) -> float:
        """Backpropagate ``micro``'s loss, scaled by its share of the global batch over the gradient accumulation;
        return the unguided flow-matching loss to log."""
        scale = micro.share / self.cfg.train.gradient_accumulation
        terms = MicroBatchLoss(model, self.inputs(micro), self.settings)
        for term in terms:
            # A non-finite loss is not backpropagated (unless ranks must take part); the loop stops before any step.
            if self.collective or torch.isfinite(term):
                (term * scale).backward()
        return float(terms.parts.normal_mse)
