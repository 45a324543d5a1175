"""``python -m trainer_core sample`` holds the experts as the job's quant and memory sections say, as training's
previews hold them (same quantized layers, same adapters, one expert on the device at a time with low_vram, the same
frames); it refuses an output it cannot write before any model loads, says so in one line when the disk fills, warns
about older videos of the same name and shows its progress."""

from __future__ import annotations

import errno
import itertools
import logging
import re
import sys
from pathlib import Path

import av
import pytest
import torch
import yaml

from trainer_core.cli import main
from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.errors import ConfigError
from trainer_core.models import load_components
from trainer_core.quant import Float8Linear, NF4Linear, UInt4Linear
from trainer_core.sample import read_video_metadata, render
from trainer_core.train.loop import run_training
from trainer_core.train.quantization import render_quant

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402

SAMPLE = {"prompts": ["a red square moving right"], "width": 32, "height": 32, "num_frames": 5, "steps": 4}
#: The 24 GB recipe's memory and quantization on the tiny model: 4-bit experts with calibrated adapters, a float8
#: text encoder, one expert on the device at a time (uint4: the 4-bit quantizer that is quick on the CPU).
TIER24 = {"quant": {"transformer": "4bit_ara", "quantizer": "uint4", "ara_rank": 4, "ara_calibration_samples": 1,
                    "text_encoder": "float8"},
          "memory": {"low_vram": True}}  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=2, num_frames=5, size=(32, 32), seed=3)


def _job(out: Path, clips: Path, **over) -> dict:
    return tiny_job(out, clips, 2, name="r", seed=4, switch_every=1, saving={"save_every": 2, "dtype": "fp32"},
                    **over)


def _write_job(tmp_path: Path, job: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _quantized_layers(model: torch.nn.Module) -> dict[str, str]:
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (Float8Linear, NF4Linear,
                                                                                     UInt4Linear))}


def _resident_bytes(model: torch.nn.Module) -> int:
    """Bytes the expert's frozen block weights hold where they live (0 once released from the device)."""
    frozen = (t for t in itertools.chain(model.blocks.parameters(), model.blocks.buffers()) if not t.requires_grad)
    return sum(t.untyped_storage().nbytes() for t in frozen)


def test_sample_renders_the_24gb_recipe_as_training_previews_do(tmp_path, clips, monkeypatch):
    job = _job(tmp_path / "out", clips, sample={**SAMPLE, "sample_every": 2}, **TIER24)
    cfg = job_from_dict(job)
    trained, previews = load_components(cfg.model), {}
    result = run_training(cfg, components=trained, on_sample=lambda step, v: previews.update({step: v}),
                          progress_bar=False)  # fmt: skip
    seen = {"layers": {}, "calls": [], "resident": []}
    real_sample = render.sample_videos

    def probed(high, low, *args, **kwargs):
        experts = {"high": high, "low": low}
        seen["layers"] = {n: _quantized_layers(m) for n, m in experts.items()}

        def probe(name):
            def hook(*_):
                seen["calls"].append(name)
                seen["resident"].append({n: _resident_bytes(m) for n, m in experts.items()})
            return hook

        hooks = [m.register_forward_pre_hook(probe(n)) for n, m in experts.items()]
        try:
            return real_sample(high, low, *args, **kwargs)
        finally:
            for h in hooks:
                h.remove()

    written = {}
    real_write = render.write_video
    monkeypatch.setattr(render, "sample_videos", probed)
    monkeypatch.setattr(render, "write_video", lambda frames, path, *a, **k: (
        written.update({Path(path).name: frames}), real_write(frames, path, *a, **k))[1])
    out = tmp_path / "v.mp4"
    assert main(["sample", str(_write_job(tmp_path, job)), "--lora-high", str(result.lora_files["high"]),
                 "--lora-low", str(result.lora_files["low"]), "--out", str(out)]) == 0
    # the layers training quantized, quantized the same way; the adapters from training's cache: the same frames
    assert seen["layers"] == {n: _quantized_layers(getattr(trained, n)) for n in ("high", "low")}
    assert all(seen["layers"].values()) and {t for d in seen["layers"].values() for t in d.values()} == {"UInt4Linear"}
    torch.testing.assert_close(written["v.mp4"], previews[2][0], rtol=0, atol=0)
    # low_vram: the high-noise expert for its steps, then the low-noise one, never both on the device
    switch = seen["calls"].index("low")
    assert switch > 0 and seen["calls"] == ["high"] * switch + ["low"] * (len(seen["calls"]) - switch)
    for name, resident in zip(seen["calls"], seen["resident"]):
        other = "low" if name == "high" else "high"
        assert resident[name] > 0 and resident[other] == 0, (name, resident)
    assert "rendered on 4bit_ara experts (native graph: weights as loaded)" in read_video_metadata(out)[
        "native_recipe"]


def test_calibrated_adapters_missing_from_the_cache_are_computed_from_the_weights_with_a_warning(tmp_path, caplog):
    cfg = job_from_dict({"model": {"source": "tiny"}, "save": {"output_dir": str(tmp_path)}, **TIER24})
    with caplog.at_level(logging.WARNING):
        quant = render_quant(cfg, "high")
    assert quant.ara_calibration_samples == 0 and quant.transformer == "4bit_ara"
    assert re.search(r"warning: no accuracy recovery adapters for the high-noise expert calibrated on the training "
                     r"clips in .*ara_cache .*computed from the weights alone", caplog.text)


def _tiny_sample_job(tmp_path: Path) -> Path:
    """A job for rendering only: no dataset (so none for the planner to resolve offload_blocks: auto with)."""
    model = {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"}
    memory = {"low_vram": True, "offload_blocks": "auto"}
    return _write_job(tmp_path, {"name": "s", "model": model, "train": {"device": "cpu"}, "memory": memory,
                                 "sample": {**SAMPLE, "steps": 2}})


def _no_models(monkeypatch):
    monkeypatch.setattr(render, "load_components", lambda *a, **k: pytest.fail("a model loaded"))


@pytest.mark.parametrize("prompts, folder", [(["a"], "v.mp4"), (["a", "b"], "v_01.mp4")])
def test_an_out_that_names_a_folder_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys, prompts, folder):
    (tmp_path / folder).mkdir()
    _no_models(monkeypatch)
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["sample", str(_tiny_sample_job(tmp_path)), *args, "--out", str(tmp_path / "v.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {tmp_path / 'v.mp4'}: {tmp_path / folder} is a folder - name a video file, e.g. " \
                  f"{tmp_path / folder / 'video.mp4'}"


def test_a_full_disk_while_the_video_is_written_is_one_line_and_leaves_no_file(tmp_path, monkeypatch, capsys):
    real_open = av.open

    def no_space(path, *args, **kwargs):
        if kwargs.get("mode") != "w":
            return real_open(path, *args, **kwargs)
        Path(path).write_bytes(b"partial")  # what the encoder had written when the disk filled
        raise av.error.OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(av, "open", no_space)
    out = tmp_path / "videos" / "v.mp4"
    assert main(["sample", str(_tiny_sample_job(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: could not write {out}: the disk is full - free space (or give "
                                            "--out a folder on another disk) and render again")
    assert list(out.parent.iterdir()) == []


def test_older_videos_of_the_same_name_are_named_before_loading_and_left_alone(tmp_path, monkeypatch, caplog):
    for i in range(3):  # an earlier render of three prompts
        (tmp_path / f"v_{i:02d}.mp4").write_bytes(b"earlier")
    (tmp_path / "v_notes.mp4").write_bytes(b"not a render's name")
    job = _tiny_sample_job(tmp_path)

    def stop(*args, **kwargs):
        raise ConfigError("stopped where the model would load")

    monkeypatch.setattr(render, "load_components", stop)
    with caplog.at_level(logging.WARNING):
        assert main(["sample", str(job), "--prompt", "a", "--prompt", "b", "--out", str(tmp_path / "v.mp4")]) == 2
    assert (f"warning: --out {tmp_path / 'v.mp4'}: v_02.mp4 in {tmp_path} is not written by this render (it writes "
            "v_00.mp4, v_01.mp4) - move or delete it, or choose another --out, so the renders do not mix"
            ) in [r.getMessage() for r in caplog.records]
    assert (tmp_path / "v_02.mp4").read_bytes() == b"earlier"


def test_sample_shows_a_progress_bar_per_video_on_stderr(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["sample", str(_tiny_sample_job(tmp_path)), "--prompt", "a", "--prompt", "b", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert re.search(r"video 1/2: 100%.*2/2", captured.err) and re.search(r"video 2/2: 100%.*2/2", captured.err)
    assert captured.out.splitlines() == [f"video: {tmp_path / 'v_00.mp4'}", f"video: {tmp_path / 'v_01.mp4'}"]
