"""The quantization benchmark runs end to end (CPU, tiny shapes: the code path, not the numbers)."""

from __future__ import annotations

import sys

from benchmarks import quant_bench


def test_quant_bench_tiny_prints_both_tables(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quant_bench.py", "--tiny", "--samples", "2"])
    quant_bench.main()
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Expert quantization, resident on the device (2 calibration") for line in lines)
    for label in quant_bench.MODES:
        row = next(line for line in lines if line.startswith(label + " ")).split()
        seconds, err = float(row[len(label.split())]), float(row[-2])
        assert seconds >= 0 and 0 < err < 0.2, row
    shapes = (["256->256"], ["256->512"], ["512->256"])
    layer_rows = [line.split(None, 1) for line in lines if line.split()[:1] in shapes]
    variants = sorted(rest.rsplit(None, 2)[0] for _, rest in layer_rows)
    assert variants == sorted(["bf16", "nf4+ara", "uint4+ara", "float8 (dequant)"] * 3)
