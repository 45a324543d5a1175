"""benchmarks/memory_bench.py runs every code path in its CPU smoke mode."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "memory_bench.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("memory_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_benchmark_runs_every_path(tmp_path):
    out = tmp_path / "bench.json"
    results = _load_bench().main(["--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    offload = results["offload"]
    assert set(offload) == {"resident", "offload_1", "offload_3"}
    for key in ("offload_1", "offload_3"):
        assert offload[key]["misses"] == 0 and offload[key]["host_gib"] > 0
    swap = results["swap"]
    assert swap["expert_gib"] > 0 and len(swap["waited"]) == len(swap["overlapped"]) == 2
    assert all(w["copy_s"] >= 0 for w in swap["waited"] + swap["overlapped"])
    assert all(r["planned_gib"] > 0 for r in offload.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_full_size_benchmark_needs_a_gpu():
    with pytest.raises(SystemExit):
        _load_bench().main([])
