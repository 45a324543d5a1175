"""Prompt encoding with UMT5, exactly as diffusers' WanPipeline does it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

#: Wan is trained with 512 text tokens.
MAX_TEXT_TOKENS = 512
log = logging.getLogger(__name__)
#: ComfyUI's tokenizer (comfy/sd1_clip.py) loads a textual-inversion embedding for a word starting with this.
_COMFY_EMBEDDING = re.compile(r"(^| )embedding:")


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


def comfy_escape(text: str) -> str:
    r"""``text`` as ComfyUI's CLIPTextEncode must be given it to read it literally: its tokenizer reads ``(words)``
    and ``(words:1.3)`` as weights and takes ``\(`` / ``\)`` for the literal brackets (comfy/sd1_clip.py:
    ``escape_important``, ``token_weights``, ``unescape_important``); nothing else is special to it, a backslash
    included, so each bracket gets one backslash."""
    return text.replace("(", "\\(").replace(")", "\\)")


@dataclass(frozen=True)
class ComfyPrompt:
    """What to type into ComfyUI's CLIPTextEncode (Wan's UMT5) to encode a prompt as :func:`encode_prompts` does."""

    text: str  #: the cleaned prompt (``prompt_clean``), cut to the tokens encoded, brackets escaped
    tokens: int  #: tokens of the cleaned prompt, ``</s>`` included
    kept: int  #: of them encoded (the pipeline cuts at 512; ComfyUI does not cut)
    caveat: str = ""  #: why ComfyUI still encodes ``text`` differently, if it does


def comfy_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int = MAX_TEXT_TOKENS) -> ComfyPrompt:
    """The CLIPTextEncode text of ``prompt``: WanPipeline cleans it (HTML entities, whitespace) and keeps its first
    ``max_length - 1`` tokens and ``</s>``; ComfyUI does neither and appends ``</s>`` itself, so the text is the
    cleaned prompt up to the last kept token, with ComfyUI's weight brackets escaped."""
    cleaned = prompt_clean(prompt)
    enc = tokenizer(cleaned, add_special_tokens=True, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    text, kept, caveat = cleaned, min(len(ids), max_length), ""
    if len(ids) > max_length:
        text = cleaned[: enc["offset_mapping"][max_length - 2][1]]  # up to the end of the last text token kept
        if list(tokenizer(text)["input_ids"]) != ids[: max_length - 1] + ids[-1:]:
            caveat = "the cut falls inside a word, which tokenizes differently on its own - end the prompt before it"
    if _COMFY_EMBEDDING.search(text):
        caveat = "ComfyUI loads a textual-inversion file for a word starting with 'embedding:' - reword it"
    return ComfyPrompt(comfy_escape(text), len(ids), kept, caveat)
