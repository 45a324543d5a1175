"""benchmarks/scaling_bench.py --report on the CPU: rows grouped by size, each run against its own size's one-GPU run,
a perf_bench.py result as a missing one-GPU run, other files skipped with a line each (no GPU, no torchrun)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scaling_h200x2"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("scaling_bench_report", ROOT / "benchmarks" / "scaling_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(size: str, world: int, s: float, experts: int = 1, groups: bool = False, shard: bool = False,
         fp8: bool = False) -> dict:
    return {"world": world, "size": size, "shard": shard, "fp8": fp8, "compiled": True, "experts": experts,
            "expert_groups": groups, "blocks": "40 off", "s_per_step": s, "samples_per_s": world / s,
            "peak_gib_rank0": 1.0, "losses": [1.0], "device": "cpu"}


def _write(tmp: Path, name: str, data) -> str:
    (tmp / name).write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(tmp / name)


def _eff(rows: list[dict]) -> dict:
    return {(r["size"], r["world"], r.get("experts", 1), r.get("expert_groups", False), r.get("shard", False)):
            round(r["efficiency"], 4) for r in rows}


def test_each_size_against_its_own_one_gpu_run(bench, tmp_path, capsys):
    paths = [_write(tmp_path, "b2.json", _run("64x64x9", 2, 2.0)),  # one GPU 1 s/step, two 2 s/step: 50%
             _write(tmp_path, "a1.json", _run("64x64x9", 1, 1.0)),
             _write(tmp_path, "c1.json", _run("32x32x5", 1, 0.5)),
             _write(tmp_path, "c2.json", _run("32x32x5", 2, 0.5)),  # 100%
             _write(tmp_path, "g.json", _run("32x32x5", 2, 1.0, experts=2, groups=True)),  # no one-GPU 2-expert run
             _write(tmp_path, "other.json", {"device": "cpu", "something": 1}),
             _write(tmp_path, "broken.json", "{not json")]
    rows = bench.report(paths)
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("skipped ") for line in out) == 2
    assert any("other.json: not a scaling_bench.py result" in line for line in out)
    assert any("broken.json: not readable as JSON" in line for line in out)
    eff = _eff(rows)
    assert eff[("64x64x9", 2, 1, False, False)] == 0.5
    assert eff[("64x64x9", 1, 1, False, False)] == eff[("32x32x5", 2, 1, False, False)] == 1.0
    assert eff[("32x32x5", 2, 2, True, False)] != eff[("32x32x5", 2, 2, True, False)]  # nan: no baseline
    table = [line for line in out if line.startswith("| 32x32x5") or line.startswith("| 64x64x9")]
    assert [line.split("|")[1].strip() for line in table] == ["32x32x5, bf16"] * 3 + ["64x64x9, bf16"] * 2  # grouped
    assert "no one-GPU run" in table[2] and "nan" not in "".join(out)


def test_float8_runs_are_not_measured_against_bf16_ones(bench, tmp_path, capsys):
    rows = bench.report([_write(tmp_path, "bf16.json", _run("64x64x9", 1, 1.0)),
                         _write(tmp_path, "fp8.json", _run("64x64x9", 2, 1.0, fp8=True))])
    capsys.readouterr()
    assert rows[1]["efficiency"] != rows[1]["efficiency"]  # nan


def test_committed_h200_results_give_the_readme_figures(bench, capsys):
    rows = bench.report(sorted(str(p) for p in RESULTS.glob("*.json")))
    out = capsys.readouterr().out
    assert "perf_1024x1024x81_2experts_fp8_baseline.json (perf_bench.py)" in out and "skipped" not in out
    eff = {k: f"{v:.0%}" for k, v in _eff(rows).items()}
    assert eff == {
        ("512x512x33", 1, 1, False, False): "100%", ("512x512x33", 2, 1, False, False): "99%",
        ("512x512x33", 2, 1, False, True): "73%", ("512x512x33", 1, 2, False, False): "100%",
        ("512x512x33", 2, 2, True, False): "103%",
        ("1024x1024x81", 1, 1, False, False): "100%", ("1024x1024x81", 2, 1, False, False): "99%",
        ("1024x1024x81", 1, 2, False, False): "100%", ("1024x1024x81", 2, 2, True, False): "92%"}
    groups = next(r for r in rows if r["size"] == "1024x1024x81" and r.get("expert_groups"))
    assert groups["efficiency"] == pytest.approx((2 / 44.57649331600004) / (2 / 40.87682430999996))  # 40.88 / 44.58


def test_a_perf_bench_file_is_not_used_where_a_scaling_one_gpu_run_exists(bench, tmp_path, capsys):
    perf = str(RESULTS / "perf_1024x1024x81_2experts_fp8_baseline.json")
    own = _write(tmp_path, "w1e2.json", _run("1024x1024x81", 1, 50.0, experts=2, fp8=True))
    groups = str(RESULTS / "g1024_w2g.json")
    rows = bench.report([perf, own, groups])
    out = capsys.readouterr().out
    assert "skipped " + perf + ": a perf_bench.py result" in out
    assert [f"{r['efficiency']:.0%}" for r in rows] == ["100%", f"{50.0 / 44.57649331600004:.0%}"]
