"""Prompt encoding and video <-> latent coding agree with diffusers' WanPipeline and float64 math."""

from __future__ import annotations

import copy

import pytest
import sentencepiece as spm
import torch

from tests.model_fixtures import make_pipeline, tiny_components
from trainer_core.config import ModelConfig
from trainer_core.errors import DatasetError
from trainer_core.models import decode_latents, encode_prompts, encode_video, load_components
from trainer_core.models.tiny import tiny_spiece_model

PROMPTS = [
    "A cat walks across a sunny garden",
    "  A woman &amp; her dog\n\n dance   in the  rain &lt;night&gt; ",
    "",
    "Aerial drone shot of snowy mountains, clouds drifting below the peaks at sunrise, " * 8,
]


@pytest.fixture(scope="module")
def src():
    return tiny_components()


@pytest.fixture(scope="module")
def video():
    return torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1


@pytest.mark.parametrize("max_length", [16, 512])
def test_encode_prompts_equals_wan_pipeline(src, max_length):
    got = encode_prompts(src.text_encoder, src.tokenizer, PROMPTS, max_length=max_length)
    want = make_pipeline(src)._get_t5_prompt_embeds(PROMPTS, max_sequence_length=max_length, device=torch.device("cpu"))
    assert got.shape == (len(PROMPTS), max_length, src.text_encoder.config.d_model)
    assert torch.equal(got, want)


def test_encode_prompts_default_length_and_bf16(src):
    c = load_components(ModelConfig(source="tiny"), high=False, low=False, vae=False)  # bf16 text encoder
    got = encode_prompts(c.text_encoder, c.tokenizer, PROMPTS[:2])
    assert got.shape[1] == 512 and got.dtype == torch.bfloat16
    want = make_pipeline(c)._get_t5_prompt_embeds(PROMPTS[:2], max_sequence_length=512, device=torch.device("cpu"))
    assert torch.equal(got, want)


def test_a_prompt_longer_than_the_token_limit_is_cut_as_the_pipeline_cuts_it_and_named(src, caplog):
    long = "a cat walks across a sunny garden " * 20  # well past 32 tokens
    with caplog.at_level("WARNING"):
        got = encode_prompts(src.text_encoder, src.tokenizer, [long, "a dog"], max_length=32)
    want = make_pipeline(src)._get_t5_prompt_embeds([long, "a dog"], max_sequence_length=32, device=torch.device("cpu"))
    assert torch.equal(got, want)
    assert "1 prompt(s)/caption(s) longer than 32 tokens are cut at 32" in caplog.text and "'a cat walks" in caplog.text
    caplog.clear()
    encode_prompts(src.text_encoder, src.tokenizer, ["a dog"], max_length=32)
    assert "longer than" not in caplog.text


def test_positions_past_the_prompt_are_zero(src):
    sp = spm.SentencePieceProcessor(model_proto=tiny_spiece_model())
    prompt = "A cat walks across a sunny garden"
    real = len(sp.encode(prompt)) + 1  # + </s>
    emb = encode_prompts(src.text_encoder, src.tokenizer, [prompt], max_length=32)[0]
    assert (emb[real:] == 0).all()
    assert (emb[:real].abs().sum(dim=-1) > 0).all()


def test_encode_prompts_refuses_a_bare_string(src):
    with pytest.raises(TypeError):
        encode_prompts(src.text_encoder, src.tokenizer, "A cat")


def test_encode_video_normalizes_the_posterior_mode(src, video):
    got = encode_video(src.vae, video)
    with torch.no_grad():
        mode = src.vae.encode(video).latent_dist.mode().double()
    mean = torch.tensor(src.vae.config.latents_mean, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(src.vae.config.latents_std, dtype=torch.float64).view(1, 16, 1, 1, 1)
    assert got.shape == (2, 16, 2, 2, 2) and got.dtype == torch.float32
    assert torch.allclose(got.double(), (mode - mean) / std, rtol=1e-6, atol=1e-6)
    assert torch.equal(got, encode_video(src.vae, video))  # deterministic


def test_decode_latents_equals_wan_pipeline_decoding(src, video):
    latents = encode_video(src.vae, video[:1])
    # A transformer that predicts zero velocity leaves the given latents untouched through every Euler step, so the
    # pipeline's output is its own de-normalization + vae.decode of exactly these latents.
    frozen = copy.deepcopy(src.high)
    torch.nn.init.zeros_(frozen.proj_out.weight)
    torch.nn.init.zeros_(frozen.proj_out.bias)
    pipe = make_pipeline(src)
    pipe.transformer, pipe.transformer_2 = frozen, frozen
    frames = pipe(
        prompt="A cat",
        num_frames=5,
        height=16,
        width=16,
        num_inference_steps=2,
        guidance_scale=1.0,
        latents=latents,
        output_type="pt",
    ).frames  # [B, F, C, H, W] in [0, 1]
    got = decode_latents(src.vae, latents)
    assert got.shape == (1, 3, 5, 16, 16) and got.min() >= -1 and got.max() <= 1
    assert torch.allclose((got.permute(0, 2, 1, 3, 4) / 2 + 0.5).clamp(0, 1), frames, atol=1e-6)


def test_decode_inverts_the_normalization(src, video):
    with torch.no_grad():
        want = src.vae.decode(src.vae.encode(video[:1]).latent_dist.mode()).sample
    assert torch.allclose(decode_latents(src.vae, encode_video(src.vae, video[:1])), want, atol=1e-5)


@pytest.mark.parametrize(
    "shape, scale, message",
    [
        ((1, 5, 16, 16), 1.0, r"\[B, 3, F, H, W\]"),
        ((1, 4, 5, 16, 16), 1.0, r"\[B, 3, F, H, W\]"),
        ((1, 3, 4, 16, 16), 1.0, "4n\\+1"),
        ((1, 3, 5, 12, 16), 1.0, "multiples of 8"),
        ((1, 3, 5, 16, 16), 255.0, r"\[-1, 1\]"),
    ],
)
def test_encode_video_refuses_bad_input(src, shape, scale, message):
    with pytest.raises(DatasetError, match=message):
        encode_video(src.vae, torch.rand(*shape) * scale)
