"""benchmarks/comfy_lora_formats.py and benchmarks/comfy_native_sampling.py parse their arguments and refuse a folder
that is not ComfyUI without needing ComfyUI (the comparisons themselves run against a real ComfyUI, outside tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["comfy_lora_formats.py", "comfy_native_sampling.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_parses_without_comfyui(script):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--comfy" in proc.stdout and "ComfyUI" in proc.stdout
    if script == "comfy_native_sampling.py":  # the README's UniPC figure comes from this mode
        assert "--unipc" in proc.stdout and "--pairs" in proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_folder_that_is_not_comfyui_is_refused(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--comfy", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "is not a ComfyUI folder" in proc.stderr
