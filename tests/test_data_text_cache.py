"""Text-embedding cache and text-encoder modes: exact round trip through the tiny UMT5, encode counts, invalidation,
unload (trigger-only) captions and the one conditioning function the loop calls."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from trainer_core.config import DatasetConfig, JobConfig, TextEncoderConfig, job_from_dict
from trainer_core.data import TextEmbeddingCache, build_dataset, prepare_text_conditioning, unload_caption
from trainer_core.data.media import write_video
from trainer_core.errors import ConfigError

DIM = 6


class FakeTextEncoder:
    """Deterministic stand-in for UMT5: caption with n words -> n+1 real rows, zeros after (like the encoder)."""

    def __init__(self, max_length: int = 512) -> None:
        self.max_length = max_length
        self.calls: list[list[str]] = []

    def row_count(self, caption: str) -> int:
        return len(caption.split()) + 1  # the words plus </s>

    def reference(self, caption: str) -> torch.Tensor:
        out = torch.zeros(self.max_length, DIM, dtype=torch.bfloat16)
        n = self.row_count(caption)
        seed = sum(map(ord, caption)) + 1
        out[:n] = torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        return out

    def __call__(self, captions: list[str]) -> torch.Tensor:
        assert isinstance(captions, list)
        self.calls.append(list(captions))
        return torch.stack([self.reference(c) for c in captions])

    @property
    def encoded(self) -> int:
        return sum(map(len, self.calls))


def test_round_trip_through_the_tiny_umt5_is_exact(tmp_path):
    from trainer_core.models.text import encode_prompts
    from trainer_core.models.tiny import tiny_text_encoder, tiny_tokenizer

    te, tok = tiny_text_encoder(), tiny_tokenizer()
    prompts = ["a red square moving right", "", "sks, a cat walking on a long wooden bridge at dusk"]
    reference = encode_prompts(te, tok, prompts)  # [3, 512, dim], zero past each prompt's real length
    assert reference.shape[1] == 512
    cache = TextEmbeddingCache(tmp_path, "tiny-umt5|fp32")
    cache.ensure(prompts, lambda caps: encode_prompts(te, tok, caps))
    for prompt, ref in zip(prompts, reference):
        assert torch.equal(cache.get(prompt), ref)
        # stored trimmed to the real token length, as the tokenizer counts it
        real = int(tok([prompt], return_tensors="pt").attention_mask.sum())
        stored = load_file(str(cache.path_for(prompt)))["embedding"]
        assert stored.shape == (real, ref.shape[-1]) and real < 512
    assert torch.equal(cache.stack([prompts[2], prompts[0]]), reference[[2, 0]])
    # a fresh cache (new process) reads the same tensors from disk
    assert torch.equal(TextEmbeddingCache(tmp_path, "tiny-umt5|fp32").stack(prompts), reference)


def test_each_caption_encoded_once_in_chunks(tmp_path):
    enc = FakeTextEncoder()
    captions = [f"caption number {i}" for i in range(11)] + ["caption number 3", ""]
    cache = TextEmbeddingCache(tmp_path, "te")
    cache.ensure(captions, enc, chunk_size=4)
    assert enc.encoded == cache.encoded == 12  # 11 distinct + ""
    assert len(enc.calls) == math.ceil(12 / 4) and max(map(len, enc.calls)) == 4
    for c in set(captions):
        assert torch.equal(cache.get(c), enc.reference(c))
        assert load_file(str(cache.path_for(c)))["embedding"].shape == (enc.row_count(c), DIM)
    cache.ensure(captions, enc)
    assert enc.encoded == 12
    again, enc2 = TextEmbeddingCache(tmp_path, "te"), FakeTextEncoder()
    again.ensure(captions, enc2)
    assert enc2.encoded == 0 and torch.equal(again.get("caption number 7"), enc.reference("caption number 7"))


def test_changed_caption_or_encoder_re_encodes_only_what_changed(tmp_path):
    old = ["a dog running", "a cat sleeping", "a bird flying"]
    TextEmbeddingCache(tmp_path, "te").ensure(old, FakeTextEncoder())
    enc = FakeTextEncoder()
    new = ["a dog running", "a cat sleeping on a sofa", "a bird flying"]
    TextEmbeddingCache(tmp_path, "te").ensure(new, enc)
    assert enc.calls == [["a cat sleeping on a sofa"]]
    for cache, enc in [
        (TextEmbeddingCache(tmp_path, "other-te"), FakeTextEncoder()),
        (TextEmbeddingCache(tmp_path, "te", max_length=64), FakeTextEncoder(64)),
    ]:
        cache.ensure(new, enc)
        assert enc.encoded == 3
        assert cache.get("a dog running").shape == (cache.max_length, DIM)


def test_cache_errors(tmp_path, caplog):
    cache = TextEmbeddingCache(tmp_path, "te")
    with pytest.raises(KeyError, match="call ensure"):
        cache.get("never encoded")
    with pytest.raises(ValueError, match=r"\[2, 512, dim\]"):
        cache.ensure(["a", "b"], lambda caps: torch.zeros(2, 77, DIM))
    with pytest.raises(ValueError, match=r"\[1, 512, dim\]"):
        cache.ensure(["a"], lambda caps: torch.zeros(512, DIM))
    cache.ensure(["a", "b"], FakeTextEncoder())
    cache.path_for("a").write_bytes(b"truncated")
    enc = FakeTextEncoder()
    with caplog.at_level(logging.WARNING):
        TextEmbeddingCache(tmp_path, "te").ensure(["a", "b"], enc)
    assert enc.calls == [["a"]] and cache.path_for("a").name in caplog.text


def test_config_defaults_and_modes():
    job = JobConfig(model={"source": "tiny"})
    assert job.text_encoder == TextEncoderConfig(mode="cache", cache_dir=None)
    with pytest.raises(ConfigError, match="unknown setting 'text_encoder.foo'"):
        job_from_dict({"model": {"source": "tiny"}, "text_encoder": {"foo": 1}})
    assert unload_caption("cache", "sks") is None and unload_caption("live", None) is None
    assert unload_caption("unload", " sks ") == "sks"
    for trigger in (None, "  "):
        with pytest.raises(ConfigError, match="trigger_word is not set.*mode 'cache'"):
            unload_caption("unload", trigger)


def clips(folder: Path, captions: dict[str, str | bytes | None]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, caption in captions.items():
        write_video(folder / f"{stem}.mp4", np.full((6, 32, 32, 3), 120, np.uint8), 16)
        if isinstance(caption, bytes):
            (folder / f"{stem}.txt").write_bytes(caption)
        elif caption is not None:
            (folder / f"{stem}.txt").write_text(caption)
    return folder


def cfg(folder: Path, **kw) -> DatasetConfig:
    return DatasetConfig(**({"folder": str(folder), "resolutions": [32], "num_frames": 5} | kw))


def test_caption_override_makes_every_caption_the_trigger(tmp_path):
    # the override reads no caption file: a non-UTF-8 one and a missing one are no problem
    folder = clips(tmp_path / "d", {"a": "a long caption", "b": "caf\u00e9".encode("latin-1"), "c": None})
    ds = build_dataset([cfg(folder, caption_dropout=0.25)], "sks", 0, caption_override=unload_caption("unload", "sks"))
    assert len(ds) == 3 and ds.skipped == ()
    assert {it.caption for it in ds.items} == {"sks"}
    assert ds.captions() == {"sks", ""}
    seen = {ds.plan(s, e).caption for e in range(40) for s in range(3)}
    assert seen == {"sks", ""}
    assert "every sample uses the fixed caption 'sks'" in ds.report()
    with pytest.raises(ConfigError, match="caption_override is empty"):
        build_dataset([cfg(folder)], "sks", 0, caption_override=" ")


def test_prepare_cache_mode_encodes_each_caption_once_then_never(tmp_path):
    folder = clips(tmp_path / "d", {"a": "a red square", "b": "a blue square", "c": "a red square"})
    ds = build_dataset([cfg(folder, caption_dropout=0.3)], None, 0)
    enc = FakeTextEncoder()
    text = prepare_text_conditioning("cache", ds, enc, TextEmbeddingCache(tmp_path / "tc", "te"))
    assert sorted(c for call in enc.calls for c in call) == ["", "a blue square", "a red square"]
    for epoch in range(5):
        for ids in ds.batches(epoch, 2):
            captions = [ds.plan(s, epoch).caption for s in ids]
            assert torch.equal(text(captions), torch.stack([enc.reference(c) for c in captions]))
    assert enc.encoded == 3  # nothing encoded during "training": the encoder can be freed


def test_prepare_unload_mode_encodes_trigger_and_blank_only(tmp_path):
    folder = clips(tmp_path / "d", {f"c{i}": f"caption {i}" for i in range(4)})
    ds = build_dataset([cfg(folder, caption_dropout=0.1)], "sks", 0, caption_override=unload_caption("unload", "sks"))
    enc = FakeTextEncoder()
    text = prepare_text_conditioning("unload", ds, enc, TextEmbeddingCache(tmp_path / "tc", "te"))
    assert sorted(enc.calls[0]) == ["", "sks"] and enc.encoded == 2
    assert torch.equal(text(["sks", ""]), torch.stack([enc.reference("sks"), enc.reference("")]))
    plain = build_dataset([cfg(folder)], "sks", 0)
    with pytest.raises(ConfigError, match="caption_override=unload_caption"):
        prepare_text_conditioning("unload", plain, FakeTextEncoder(), TextEmbeddingCache(tmp_path / "tc", "te"))


def test_prepare_live_mode_encodes_every_batch(tmp_path):
    folder = clips(tmp_path / "d", {"a": "one", "b": "two"})
    ds = build_dataset([cfg(folder)], None, 0)
    enc = FakeTextEncoder()
    text = prepare_text_conditioning("live", ds, enc, None)
    assert enc.calls == []
    out = text(["one", "two", "one"])
    assert enc.calls == [["one", "two", "one"]] and out.shape == (3, 512, DIM)
    text(["two"])
    assert len(enc.calls) == 2
    with pytest.raises(ValueError, match="needs a TextEmbeddingCache"):
        prepare_text_conditioning("cache", ds, enc, None)
