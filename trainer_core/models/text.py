"""Prompt encoding with UMT5, exactly as diffusers' WanPipeline does it."""

from __future__ import annotations

import logging

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

#: Wan is trained with 512 text tokens.
MAX_TEXT_TOKENS = 512
log = logging.getLogger(__name__)


@torch.no_grad()
def encode_prompts(
    text_encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_length: int = MAX_TEXT_TOKENS,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Text embeddings ``[B, max_length, dim]`` in the encoder's dtype, on ``device`` (default: the encoder's).

    Prompts are cleaned (``prompt_clean``), tokenized with ``</s>`` and padded/truncated to ``max_length``; the
    positions past each prompt's real length are zeroed, as in ``WanPipeline._get_t5_prompt_embeds``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    model_device = next(text_encoder.parameters()).device
    cleaned = [prompt_clean(p) for p in prompts]
    inputs = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    _warn_cut(tokenizer, cleaned, inputs.attention_mask, max_length)
    mask = inputs.attention_mask.to(model_device)
    hidden = text_encoder(inputs.input_ids.to(model_device), mask).last_hidden_state
    real = torch.arange(max_length, device=model_device)[None, :] < mask.gt(0).sum(dim=1)[:, None]
    hidden = torch.where(real[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=model_device))
    return hidden.to(device or model_device)


def _warn_cut(tokenizer: PreTrainedTokenizerBase, prompts: list[str], mask: torch.Tensor, max_length: int) -> None:
    """Name the prompts the tokenizer cut at ``max_length`` (the pipeline cuts them too; only the user can decide
    what to keep). Only prompts that fill the whole window are tokenized again, untruncated, to tell."""
    full = [p for p, n in zip(prompts, mask.sum(dim=1).tolist()) if n == max_length]
    cut = [(p, len(ids)) for p, ids in zip(full, tokenizer(full)["input_ids"] if full else []) if len(ids) > max_length]
    if cut:
        log.warning("%d prompt(s)/caption(s) longer than %d tokens are cut at %d, as Wan's pipeline cuts them "
                    "(e.g. %r..., %d tokens) - shorten them to keep their end", len(cut), max_length, max_length,
                    cut[0][0][:60], cut[0][1])  # fmt: skip
