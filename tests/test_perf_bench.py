"""benchmarks/perf_bench.py and benchmarks/fits_24gb.py run every code path in their CPU smoke modes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.slow


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_perf_bench_tiny_runs_every_path(tmp_path):
    results = _load("perf_bench").main(["--tiny", "--levers", "--parity", "3", "--dop", "--low-vram", "--no-compile",
                                        "--out", str(tmp_path)])
    res = results["sizes"][0]
    runs = {"plain", "eager, full checkpointing", "eager, selective checkpointing", "eager, planner's split",
            "bf16 fast path", "fp8 forward only", "fp8 fast path"}
    assert runs <= set(res)
    assert json.loads((tmp_path / "perf_32x32x5.json").read_text())["sizes"][0]["plain"]["s"] == res["plain"]["s"]
    assert len(res["plain"]["losses"]) == len(res["bf16 fast path"]["losses"]) == 4  # --steps 3 after a warm-up
    # same data and LoRA initialisation: the first loss (LoRA B = 0) is the base model's, equal up to dtype effects
    for key in runs - {"plain"}:
        assert res[key]["loss_rel_diff_vs_plain"] < 0.05 and res[key]["speedup"] > 0
        assert res[key]["speedup"] == pytest.approx(res["plain"]["s"] / res[key]["s"])
    assert res["fp8 fast path"]["losses"] != res["bf16 fast path"]["losses"]  # float8 really ran
    # ratios of wall times: present and finite (their size is measured on the device, never asserted here: a loaded
    # CPU makes any timing comparison flaky)
    assert res["dop"]["overhead"] > 0 and math.isfinite(res["dop"]["overhead"])
    assert math.isfinite(res["low_vram"]["ratio"])
    assert len(res["low_vram"]["low_vram"]["switch_copy_s"]) == 1  # 20 steps, switch every 10


def test_fits_24gb_tiny_trains_both_experts_with_switches(tmp_path):
    results = _load("fits_24gb").main(["--tiny", "--steps", "4", "--every", "2", "--calibration", "1",
                                       "--out", str(tmp_path)])
    assert results["steps"] == 4 and len(results["losses"]) == 4
    assert len(results["switch_copy_s"]) == 2  # the high-noise expert in from host memory at step 0, the low at 2
    assert set(results["quantize_s"]) == {"high", "low"} and results["planned_gib"] > 0
    assert json.loads((tmp_path / "fits_24gb.json").read_text())["losses"] == results["losses"]


def test_perf_bench_two_experts_fp8_first_rebuilds_bf16_experts(tmp_path):
    results = _load("perf_bench").main(["--tiny", "--experts", "2", "--fp8-first", "--steps", "2", "--plain-steps",
                                        "0", "--no-compile", "--out", str(tmp_path)])
    res = results["sizes"][0]
    assert list(k for k in res if isinstance(res[k], dict)) == ["plain", "fp8 fast path", "bf16 fast path"]
    assert res["plain"]["steps_timed"] == 1 and res["fp8 fast path"]["steps_timed"] == 2
    # both experts train, alternating: no loss parity against the one-expert plain loop is claimed
    assert "loss_rel_diff_vs_plain" not in res["bf16 fast path"]
    assert (tmp_path / "perf_32x32x5_2experts.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_expandable_segments_need_a_cuda_allocator():
    from trainer_core.memory.allocator import use_expandable_segments

    assert use_expandable_segments() is False
