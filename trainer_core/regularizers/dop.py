"""Differential Output Preservation (DOP): keep the LoRA from changing what the base model does for the class.

For a caption such as ``"sks walks on a beach"`` (trigger ``sks``, class ``person``) the *preservation prompt* is
``"person walks on a beach"``. Each step, on the same noisy latents and timestep as the normal loss:

1. LoRA on, training caption, with grad: the normal flow-matching loss;
2. LoRA off, preservation prompt, no grad: the *prior*, what the base model predicts for the class;
3. LoRA on, preservation prompt, with grad: the LoRA's prediction for the class;

``loss = normal + multiplier * MSE(pass 3, prior)``. Passes 1 and 3 share ``x_t`` and ``σ`` and differ only in the
text, so they can run as one forward over the concatenated batch: one pass over the weights
instead of two, which matters most when weights are streamed (block offloading) or the batch is small, at the price
of the two passes' activations being alive together. Pass 2 runs without grad, so it stores no activations. The
passes run in :class:`trainer_core.train.objective.MicroBatchLoss`; this module holds the DOP-specific pieces.

Preservation prompts are ordinary captions: with cached text embeddings they are encoded up front together with
the training captions (see :func:`preservation_captions`), so DOP does not need a live text encoder.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import ConfigError
from ..flow import flow_matching_loss, predict_velocity

#: ``(model, x_t, sigmas, text, autocast_dtype) -> prediction``, i.e. :func:`trainer_core.flow.predict_velocity`.
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
