"""Differential Output Preservation (DOP): keep the LoRA from changing what the base model does for the class.

For a caption such as ``"sks walks on a beach"`` (trigger ``sks``, class ``person``) the *preservation prompt* is
``"person walks on a beach"``. Each step, on the same noisy latents and timestep as the normal loss:

1. LoRA on, training caption, with grad: the normal flow-matching loss;
2. LoRA off, preservation prompt, no grad: the *prior*, what the base model predicts for the class;
3. LoRA on, preservation prompt, with grad: the LoRA's prediction for the class;

``loss = normal + multiplier * MSE(pass 3, prior)``. Passes 1 and 3 share ``x_t`` and ``σ`` and differ only in the
text, so they can run as one forward over the concatenated batch (``batched=True``): one pass over the weights
instead of two, which matters most when weights are streamed (block offloading) or the batch is small, at the price
of the two passes' activations being alive together. Pass 2 runs without grad, so it stores no activations.

Preservation prompts are ordinary captions: with cached text embeddings they are encoded up front together with
the training captions (see :func:`preservation_captions`), so DOP does not need a live text encoder.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ConfigError
from ..schedule import loss_weights
from ..train.losses import flow_matching_loss, noisy_latents, velocity_target
from ..train.step import predict_velocity
from .guidance import guided_target

#: ``(model, x_t, sigmas, text, autocast_dtype) -> prediction``, i.e. :func:`trainer_core.train.step.predict_velocity`.
PredictFn = Callable[..., torch.Tensor]


def preservation_caption(caption: str, trigger: str, class_word: str) -> str | None:
    """The preservation prompt of ``caption``: every whole-word occurrence of ``trigger`` (matched
    case-insensitively) replaced by ``class_word``; the rest of the caption is kept as it is.

    Edge cases:

    * the trigger directly followed by the class word (``"a photo of sks person"``) becomes the class word once
      (``"a photo of person"``), not ``"person person"``;
    * the trigger inside a longer word is not a match (``"sksfoo"`` stays);
    * a caption without the trigger (the empty caption of caption dropout included) returns ``None``: it has no
      class counterpart, and preserving the base model's output on the training caption itself would pull
      directly against what the sample teaches. DOP skips such samples.
    """
    trigger, class_word = trigger.strip(), class_word.strip()
    if not trigger or not class_word:
        raise ValueError("preservation_caption needs a non-empty trigger and class word")
    pattern = re.compile(
        rf"(?<!\w){re.escape(trigger)}(?:\s+{re.escape(class_word)})?(?!\w)", flags=re.IGNORECASE
    )
    replaced, count = pattern.subn(lambda _: class_word, caption)
    return replaced if count else None


def preservation_captions(captions: Iterable[str], trigger: str, class_word: str) -> dict[str, str]:
    """Training caption -> preservation prompt, for every caption that contains the trigger.

    Add the values to the captions whose embeddings are cached (or encoded) before training. Raises
    :class:`ConfigError` when no caption contains the trigger word, because DOP would then never act.
    """
    captions = set(captions)
    found = {c: p for c in captions if (p := preservation_caption(c, trigger, class_word)) is not None}
    if not found:
        raise ConfigError(
            f"advanced.dop is on but none of the {len(captions)} distinct captions contains trigger_word "
            f"{trigger!r} as a word, so DOP would never act - put [trigger] in the captions, set prepend_trigger "
            "on the datasets, or turn advanced.dop off"
        )
    return found


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the block with every peft adapter of ``model`` switched off (the base model alone).

    Uses diffusers' ``disable_adapters()`` / ``enable_adapters()``. On exit, also on an exception, the previous
    state comes back exactly: adapters that were already off stay off, and every adapter weight's
    ``requires_grad`` is restored (peft's ``enable_adapters`` would otherwise set it on its own).
    """
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model carries no LoRA adapter; attach one (trainer_core.lora.attach_lora) first")
    was_off = all(m.disable_adapters for m in layers)
    grads = [(p, p.requires_grad) for m in layers for p in m.parameters() if p.dtype.is_floating_point]
    model.disable_adapters()
    try:
        yield
    finally:
        if not was_off:
            model.enable_adapters()
        for p, flag in grads:
            p.requires_grad_(flag)


def prior_prediction(
    model: nn.Module,
    x_t: torch.Tensor,
    sigmas: torch.Tensor,
    text_preservation: torch.Tensor,
    predict_fn: PredictFn = predict_velocity,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The base model's (LoRA off) prediction for the preservation prompts, without grad: the DOP prior."""
    with torch.no_grad(), lora_disabled(model):
        return predict_fn(model, x_t, sigmas, text_preservation, autocast_dtype).detach()


def dop_loss(pred_lora_on_preservation: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """MSE between the LoRA's prediction for the preservation prompts and the prior, in float32."""
    if pred_lora_on_preservation.shape != prior.shape:
        raise ValueError(
            f"shapes differ: prediction {tuple(pred_lora_on_preservation.shape)}, prior {tuple(prior.shape)}"
        )
    return flow_matching_loss(pred_lora_on_preservation, prior.detach())


def _normal_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    timestep_type: str,
    guidance_scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, detached unguided loss) of pass 1, as ``micro_batch_loss`` computes it."""
    target = velocity_target(x0, noise)
    weights = loss_weights(sigmas, timestep_type)
    if guidance_scale is None:
        loss = flow_matching_loss(pred, target, weights)
        return loss, loss.detach()
    loss = flow_matching_loss(pred, guided_target(pred, target, guidance_scale), weights)
    return loss, flow_matching_loss(pred.detach(), target, weights)


def dop_step_loss(
    model: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    text: torch.Tensor,
    text_preservation: torch.Tensor | None,
    timestep_type: str,
    autocast_dtype: torch.dtype | None,
    multiplier: float,
    batched: bool,
    preserve: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    backward_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss with DOP: ``normal + multiplier * MSE(LoRA on, prior)`` on the preservation prompts.

    ``preserve`` lists the batch indices whose caption has a preservation prompt (``text_preservation`` holds their
    embeddings, in that order); ``None`` means every sample. Samples without one (see :func:`preservation_caption`)
    get only the normal loss; with none at all (or ``text_preservation`` None) this is the plain loss and only pass 1
    runs. The DOP term is the mean over the preserved samples. ``guidance_scale`` applies differential guidance
    (:func:`trainer_core.regularizers.guidance.guided_target`) to the normal loss only, which scales its gradient
    by that factor and so lowers the DOP term's relative weight by the same factor.

    Memory: ``batched`` runs passes 1 and 3 as one forward over ``B + K`` samples (fastest; both passes'
    activations alive together). Unbatched, the two graphs are still alive together until the caller's backward,
    unless ``backward_scale`` is given: then this function backpropagates ``backward_scale * loss`` itself (use
    ``1 / gradient_accumulation``), pass 1 before pass 3 even runs, so only one pass's graph exists at a time,
    and the returned loss is detached (do not call backward on it).

    Returns ``(loss, parts)``; ``parts`` holds detached scalars: ``normal`` (the backpropagated normal loss),
    ``normal_mse`` (the unguided flow-matching loss, comparable across settings, for logging) and ``dop`` (the
    unscaled preservation MSE, 0 when no sample was preserved).
    """
    batch = x0.shape[0]
    index = list(range(batch)) if preserve is None else list(preserve)
    if text_preservation is None:
        index = []
    elif text_preservation.shape[0] != len(index):
        raise ValueError(f"text_preservation has {text_preservation.shape[0]} rows for {len(index)} preserved samples")
    if any(not 0 <= i < batch for i in index):
        raise ValueError(f"preserve indices {index} fall outside the batch of {batch}")

    x_t = noisy_latents(x0, noise, sigmas)
    sel = torch.as_tensor(index, dtype=torch.long, device=x_t.device)
    if not index:
        pred = predict_velocity(model, x_t, sigmas, text, autocast_dtype)
        total, normal_mse = _normal_loss(pred, x0, noise, sigmas, timestep_type, guidance_scale)
        normal, dop = total, torch.zeros((), device=total.device)
    else:
        # The prior first: no grad, so nothing of it is alive while the graphs of passes 1 and 3 are built.
        prior = prior_prediction(model, x_t[sel], sigmas[sel], text_preservation, predict_velocity, autocast_dtype)
        if batched:
            both = predict_velocity(
                model,
                torch.cat([x_t, x_t[sel]]),
                torch.cat([sigmas, sigmas[sel]]),
                torch.cat([text, text_preservation.to(text.dtype)]),
                autocast_dtype,
            )
            normal, normal_mse = _normal_loss(both[:batch], x0, noise, sigmas, timestep_type, guidance_scale)
            dop = dop_loss(both[batch:], prior)
            total = normal + multiplier * dop
        else:
            pred = predict_velocity(model, x_t, sigmas, text, autocast_dtype)
            normal, normal_mse = _normal_loss(pred, x0, noise, sigmas, timestep_type, guidance_scale)
            if backward_scale is not None:
                (normal * backward_scale).backward()
                normal, pred = normal.detach(), None  # frees pass 1's graph before pass 3 builds its own
            dop = dop_loss(predict_velocity(model, x_t[sel], sigmas[sel], text_preservation, autocast_dtype), prior)
            if backward_scale is not None:
                (multiplier * dop * backward_scale).backward()
                dop = dop.detach()
            total = normal + multiplier * dop
    if backward_scale is not None:
        if total.requires_grad:  # one graph left to backpropagate (batched, or nothing preserved)
            (total * backward_scale).backward()
        total = total.detach()
    return total, {"normal": normal.detach(), "normal_mse": normal_mse, "dop": dop.detach()}
