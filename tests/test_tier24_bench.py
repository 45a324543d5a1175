"""benchmarks/tier24_bench.py runs every section in its CPU smoke mode (tiny shapes, a couple of steps)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / ".peer" / "musubi"  # musubi-tuner's files, fetched outside git (absent in CI's fresh clone)
pytestmark = pytest.mark.slow


def _bench():
    spec = importlib.util.spec_from_file_location("tier24_bench", ROOT / "benchmarks" / "tier24_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tier24")
    bench = _bench()
    results = bench.main(["--tiny", "--steps", "2", "--every", "1", "--fp8-offload", "1", "--probe-steps", "2",
                          "--planner-free", "22", "--sweep-steps", "2", "--peer", str(PEER), "--out", str(out)])
    return bench, results, out


def test_every_section_runs_and_trains_with_finite_losses(tiny_run):
    bench, results, out = tiny_run
    sections = results["sections"]
    assert set(sections) == set(bench.SECTIONS) - {"low_vram_vs_resident"}
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("traceback"))
    for name in ("reference_bf16", "float8_low_vram", "nf4_ara_low_vram"):
        r = sections[name]
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
        assert r["s_per_step"] > 0 and math.isfinite(r["switch_overhead"])
    # both experts trained, switching every step; the capped runs brought each one in from host memory
    assert len(sections["float8_low_vram"]["switch_copy_s"]) == 2
    assert sections["float8_low_vram"]["offload_blocks"] == 1  # --fp8-offload 1: the streamed-block path ran
    # the same seeded LoRA initialisation reached every section (same tensors, whatever the base layers are)
    counts = {name: sections[name]["lora_tensors"] for name in ("reference_bf16", "float8_low_vram",
                                                                 "nf4_ara_low_vram")}
    assert counts["reference_bf16"] == counts["float8_low_vram"] == counts["nf4_ara_low_vram"]
    assert sections["float8_low_vram"]["losses"] != sections["reference_bf16"]["losses"]  # float8 really ran
    probe = sections["float8_probes"]["48x48x5"]
    assert len(probe["losses"]) == 2 and probe["plan"]["offload_blocks"] == 1
    sweep = sections["float8_sweep"]["variants"]
    assert list(sweep) == ["1:eager", "1:compiled", "0:compiled"]  # the tiny default variants, in order
    for variant, row in sweep.items():
        assert "error" not in row and len(row["losses"]) == 2, (variant, row.get("error"))
        assert row["plan"]["offload_blocks"] == int(variant.split(":")[0])
        assert row["blocks"].endswith("compiled") == variant.endswith("compiled")
    # streamed and compiled or not, the same seeded step: same losses up to compiled float rounding
    assert sweep["1:compiled"]["losses"] == pytest.approx(sweep["1:eager"]["losses"], rel=1e-3)
    rows = sections["planner"]["rows"]
    assert {r["quant"] for r in rows} == {"none", "float8", "4bit_ara"} and all(r["free_gib"] == 22 for r in rows)
    assert json.loads((out / "tier24_bench.json").read_text())["sections"]["reference_bf16"]["losses"] == \
        sections["reference_bf16"]["losses"]


def test_summary_compares_against_bf16(tiny_run):
    _, results, _ = tiny_run
    summary = results["summary"]
    for key in ("float8_low_vram", "nf4_ara_low_vram"):
        # same data, same LoRA init: the tiny models' losses stay close to bf16 (sizes measured on the GPU only)
        assert 0 <= summary[key]["loss_rel_diff_mean"] <= summary[key]["loss_rel_diff_max"] < 0.05
        assert summary[key]["steps"] == 2
    assert summary["float8_speedup_vs_nf4"] > 0


def test_peer_section_runs_musubi_when_its_files_are_there(tiny_run):
    _, results, _ = tiny_run
    peer = results["sections"]["peer_musubi"]
    if not PEER.is_dir():
        assert "skipped" in peer  # CI: a fresh clone has no .peer/
        return
    assert peer["best"]["s"] > 0 and peer["fp8_tensors"] > 0
    run = peer["none"][0]  # CPU: no block swap (musubi's offloaders need CUDA)
    assert run["lora_modules"] == 10 * 2  # every Linear of the 2 tiny blocks: q, k, v, o twice, ffn.0, ffn.2
    assert all(math.isfinite(v) for v in run["losses"])
    assert "peer_s_over_float8_s" in results["summary"]


def test_missing_peer_is_a_recorded_skip_and_report_prints_a_table(tiny_run, tmp_path):
    bench, _, out = tiny_run
    results = bench.main(["--tiny", "--only", "peer_musubi", "--peer", str(tmp_path / "absent"),
                          "--out", str(tmp_path)])
    assert "no musubi-tuner copy" in results["sections"]["peer_musubi"]["skipped"]
    table = bench.main(["--report", str(out / "tier24_bench.json")])["table"]
    assert "float8 + Low VRAM" in table and "4bit_ara nf4" in table


def test_out_of_memory_under_the_cap_is_a_result_not_a_crash(tmp_path):
    bench = _bench()
    real, calls = bench.micro_batch_loss, []

    def flaky(*args, **kwargs):  # the second step runs out of memory, as a too-large plan would under the cap
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(*args, **kwargs)

    bench.micro_batch_loss = flaky
    results = bench.main(["--tiny", "--only", "float8_low_vram", "--steps", "3", "--every", "1",
                          "--out", str(tmp_path)])
    r = results["sections"]["float8_low_vram"]
    assert r["error"].startswith("OutOfMemoryError at step 1") and len(r["losses"]) == 1
    assert r["offload_blocks"] == 0 and "blocks" in r  # the plan is still reported


def test_float8_blocks_compiled_experiment_compiles_the_streamed_blocks(tmp_path):
    # Inductor's CPU backend: every block compiled, the streamed one too (as the trainer compiles them on CUDA);
    # same losses as the trainer's CPU blocks (eager) up to compile's rounding.
    bench, runs = _bench(), {}
    for mode in ("planner", "compiled"):
        out = tmp_path / mode
        out.mkdir()
        runs[mode] = bench.main(["--tiny", "--only", "float8_low_vram", "--steps", "2", "--every", "1",
                                 "--fp8-offload", "1", "--float8-blocks", mode, "--out", str(out)])
    planner, compiled = (runs[m]["sections"]["float8_low_vram"] for m in ("planner", "compiled"))
    assert compiled["blocks"].endswith(", compiled") and not planner["blocks"].endswith("compiled")
    assert compiled["offload_blocks"] == planner["offload_blocks"] == 1
    assert compiled["losses"] == pytest.approx(planner["losses"], rel=1e-3)


def test_a_malformed_sweep_variant_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--tiny", "--sweep", "12:fast", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "OFFLOAD:eager|compiled[:PREFETCH]" in capsys.readouterr().err
    assert not (tmp_path / "tier24_bench.json").exists()
