"""CPU smoke run of benchmarks/e2e_fullscale.py: the same script the H200 runs, on the tiny model's files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from benchmarks import e2e_fullscale, pinned_release, te_load_memory


def test_tiny_end_to_end_from_comfy_files(tmp_path):
    out = tmp_path / "out"  # made by the script
    res = e2e_fullscale.main(["--tiny", "--root", str(tmp_path / "root"), "--out", str(out), "--phases",
                              "files,job512,sample", "--steps", "6", "--save-every", "3", "--clips", "4",
                              "--preview-steps", "2", "--sample-steps", "2"])
    assert json.loads((out / "e2e_fullscale.json").read_text())["job512"]["rc"] == 0
    # The files are ComfyUI's fp8_scaled layout: float8 block weights with a scale each, behind the model prefix.
    with safe_open(str(e2e_fullscale.model_path(tmp_path / "root", "high")), "pt") as f:
        keys = set(f.keys())
        assert "model.diffusion_model.scaled_fp8" in keys
        q = "model.diffusion_model.blocks.0.self_attn.q"
        assert f.get_tensor(f"{q}.weight").dtype.itemsize == 1 and f"{q}.scale_weight" in keys
    with safe_open(str(e2e_fullscale.model_path(tmp_path / "root", "text_encoder")), "pt") as f:
        assert "spiece_model" in f.keys()
    job = res["job512"]
    assert job["steps"] == 6 and all(math.isfinite(x) for x in job["losses"])
    for phase in ("loaded the high-noise expert", "loaded the low-noise expert", "loaded the text encoder",
                  "caption embeddings ready", "checkpoint of step 6 written", "preview of step 3 (1 video(s))"):
        assert phase in job["phases_s"], phase
    assert 0 < job["time_to_first_step_s"] < job["wall_s"]
    assert job["host_gib"]["VmHWM"] > 0
    assert set(job["lora_files"]) == {"high", "low"} and all(Path(p).is_file() for p in job["lora_files"].values())
    sample = res["sample"]
    assert sample["rc"] == 0 and sample["video_bytes"] > 0
    assert "--lora-high" in sample["cmd"] or "--lora-low" in sample["cmd"]


def test_tiny_text_encoder_load_memory(tmp_path):
    """benchmarks/te_load_memory.py on the CPU: the tiny encoder written as ComfyUI's fp8_scaled file, loaded in a
    fresh process, made float8, kept in host memory and used; its figures and embeddings come back."""
    res = te_load_memory.main(["--tiny", "--root", str(tmp_path / "root"), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "te_load_memory.json").read_text()) == res
    (run,) = res["runs"]
    assert run["load_on"] == "cpu" and run["load_s"] > 0 and run["gpu_peak_gib"] is None
    assert run["host_peak_gib"] >= run["host_kept_float8_gib"] >= run["rss_before_gib"] > 0
    emb = torch.load(tmp_path / "root" / "emb_cpu.pt")
    assert emb.shape[0] == 1 and bool(torch.isfinite(emb).all()) and emb.abs().sum() > 0


def test_tiny_pinned_release(tmp_path):
    """benchmarks/pinned_release.py on the CPU: both runs (the host cache kept and emptied) place, switch, close and
    move two experts to host memory in fresh processes and report their figures."""
    res = pinned_release.main(["--tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "pinned_release.json").read_text()) == res
    assert [r["mode"] for r in res["runs"]] == ["cached", "released"]
    for run in res["runs"]:
        assert run["experts_gib"] > 0 and run["pinned_gib"] > 0 and run["pinned_cache_gib"] is None
        assert run["resident_gib"]["VmRSS"] >= run["resident_gib"]["RssAnon"] > 0
