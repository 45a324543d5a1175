"""The built-in "tiny" preset: Wan 2.2 T2V components with the real architectures at toy sizes.

Every function returns the same weights on every call (seeded init, own RNG state, the caller's global RNG is left
untouched), so tests and smoke runs are reproducible and need no download. The sizes keep what the real model's
loaders rely on: 128-channel attention heads (ComfyUI and our single-file loader infer heads = dim // 128), 16
latent channels (so the VAE's latents_mean/std keep their 16 entries) and the Wan 2.1 VAE block layout (so
diffusers' single-file VAE converter applies). Everything is built in float32; :func:`load_components` casts.
"""

from __future__ import annotations

import io

import sentencepiece as spm
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import PreTrainedTokenizerBase, UMT5Config, UMT5EncoderModel

from ..names import EXPERTS, HIGH, LOW
from .single_file import tokenizer_from_sentencepiece

TINY_TEXT_DIM = 64

#: WanTransformer3DModel config of each tiny expert (the real A14B: 40 heads, ffn 13824, 40 layers, text_dim 4096).
TINY_TRANSFORMER_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": TINY_TEXT_DIM,
    "freq_dim": 256,
    "ffn_dim": 512,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}

#: AutoencoderKLWan config: Wan 2.1 structure (dim_mult, res blocks, temporal downsampling, latents_mean/std defaults).
TINY_VAE_CONFIG: dict = {"base_dim": 8, "z_dim": 16}

#: UMT5 encoder config; vocab_size exceeds the tokenizer's length, as in the real model (256384 vs 256300).
TINY_TEXT_ENCODER_CONFIG: dict = {
    "vocab_size": 128,
    "d_model": TINY_TEXT_DIM,
    "d_kv": 32,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 2,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "use_cache": False,
}

TINY_SPIECE_VOCAB = 96
_SEEDS = {HIGH: 1001, LOW: 1002, "vae": 1003, "text_encoder": 1004}

# Fixed training text for the tiny sentencepiece model (caption-like, so test prompts tokenize into real pieces).
_SPIECE_TEXT = (
    "A cat walks across a sunny garden while the camera pans slowly to the left.",
    "A woman in a red dress dances in the rain at night, neon lights reflecting on the wet street.",
    "Aerial drone shot of snowy mountains, clouds drifting below the peaks at sunrise.",
    "Close-up of a dog running on the beach, waves crashing, golden hour light.",
    "A man rides a bicycle through a busy city street, cars passing by, people walking.",
    "Slow motion water drops falling into a glass, soft bokeh background, studio lighting.",
    "An old train crosses a stone bridge over a green valley, smoke rising into the blue sky.",
    "Two children build a sand castle, the tide slowly washing over their feet.",
)


def _perturb_all(model: torch.nn.Module, scale: float = 0.02) -> None:
    # Default inits leave norms at exactly 1/0, values that survive any dtype and any dropped tensor unnoticed;
    # small noise on every parameter makes each one matter in equality tests.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        _perturb_all(model)
    return model.eval()


def tiny_transformer(expert: str) -> WanTransformer3DModel:
    """The tiny high-noise (``expert="high"``) or low-noise (``"low"``) expert, float32, eval mode."""
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")
    return _seeded(_SEEDS[expert], lambda: WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG))


def tiny_vae() -> AutoencoderKLWan:
    """The tiny Wan 2.1-structured VAE, float32, eval mode."""
    return _seeded(_SEEDS["vae"], lambda: AutoencoderKLWan(**TINY_VAE_CONFIG))


def tiny_text_encoder() -> UMT5EncoderModel:
    """The tiny UMT5 encoder (d_model = the tiny transformer's text_dim), float32, eval mode."""
    return _seeded(_SEEDS["text_encoder"], lambda: UMT5EncoderModel(UMT5Config(**TINY_TEXT_ENCODER_CONFIG)))


def tiny_spiece_model() -> bytes:
    """Bytes of a small unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos).

    Trained in-process on a fixed built-in text with one thread, so the bytes are identical on every call. These
    are the same kind of bytes ComfyUI stores as the ``spiece_model`` tensor inside its UMT5 files.
    """
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SPIECE_TEXT),
        model_writer=buf,
        vocab_size=TINY_SPIECE_VOCAB,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The T5 tokenizer built from :func:`tiny_spiece_model`."""
    return tokenizer_from_sentencepiece(tiny_spiece_model())
