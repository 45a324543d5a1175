"""The headless CLI as a user runs it: demo, train from our YAML and from ai-toolkit's job YAML, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from trainer_core.cli import demo_config, main
from trainer_core.data import make_synthetic_dataset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "trainer_core", "demo", "--steps", "4", "--output", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "trained 4 steps" in out.stdout
    for expert in ("high", "low"):
        f = tmp_path / "demo" / f"demo_000004_{expert}_noise.safetensors"
        with safe_open(str(f), "pt") as fh:
            assert "diffusion_model.blocks.1.ffn.2.lora_up.weight" in fh.keys()


def _clips(tmp_path: Path) -> Path:
    return make_synthetic_dataset(tmp_path / "clips", n_clips=2, num_frames=5, size=(32, 32), seed=1)


def test_train_from_our_yaml(tmp_path, capsys):
    cfg = demo_config(tmp_path / "out", steps=2)
    cfg["datasets"][0].update(folder=str(_clips(tmp_path)), num_frames=5, resolutions=[32])
    cfg["multistage"] = {"train_high_noise": False, "switch_every": 1}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "low-noise LoRA" in printed and "high-noise LoRA" not in printed
    assert (tmp_path / "out" / "demo" / "demo_000002_low_noise.safetensors").is_file()


def test_train_from_aitoolkit_yaml_warns_by_name(tmp_path, capsys):
    job = yaml.safe_load((ROOT / "tests/data/aitoolkit/train_lora_wan22_14b_24gb.yaml").read_text())
    proc = job["config"]["process"][0]
    proc["training_folder"] = str(tmp_path / "out")
    proc["device"] = "cpu"
    proc["model"]["name_or_path"] = "tiny"
    proc["train"].update(steps=2, dtype="fp32", optimizer="adamw", gradient_checkpointing=False)
    proc["datasets"][0].update(folder_path=str(_clips(tmp_path)), num_frames=5, resolution=[32])
    proc["sample"].update(width=32, height=32, num_frames=5, sample_steps=2, sample_every=2,
                          prompts=proc["sample"]["prompts"][:1])
    path = tmp_path / "ait.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["train", str(path)]) == 0
    err = capsys.readouterr().err
    assert "config.process[0].model.qtype is changed" in err  # the hub adapter is computed locally instead
    run = tmp_path / "out" / "my_first_wan22_14b_lora_v1"
    assert (run / "my_first_wan22_14b_lora_v1_000002_high_noise.safetensors").is_file()
    previews = sorted(p.name for p in (run / "samples").iterdir())
    assert previews == ["my_first_wan22_14b_lora_v1_000000_00.mp4", "my_first_wan22_14b_lora_v1_000002_00.mp4"]


def test_bad_config_exits_2_with_a_named_setting(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"source": "tiny"}, "multistage": {"boundary": 1.5}}))
    assert main(["train", str(path)]) == 2
    assert "multistage.boundary" in capsys.readouterr().err


def _no_work(monkeypatch):
    """Fail the test if the demo starts writing clips or training."""
    from trainer_core.data import synthetic
    from trainer_core.train import loop

    def work(*args, **kwargs):
        raise AssertionError("the demo started work before refusing its input")

    monkeypatch.setattr(synthetic, "make_synthetic_dataset", work)
    monkeypatch.setattr(loop, "run_training", work)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not any("Traceback" in line for line in err), err
    return err[0]


def test_demo_refuses_a_file_as_output_folder(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--output", str(afile)]) == 2
    assert _one_error_line(capsys) == (f"error: demo --output: {afile} is a file - give a folder (it is made if "
                                       "missing)")
    assert main(["demo", "--output", str(afile / "sub")]) == 2
    assert _one_error_line(capsys) == (f"error: demo --output: cannot write to {afile / 'sub'}: {afile} is a file, "
                                       "not a folder - choose a folder")


def _read_only(folder: Path) -> bool:
    """Make ``folder`` refuse new files, also for root (the immutable flag), if this machine allows it."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False).returncode == 0


def test_demo_refuses_a_read_only_output_folder(tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _read_only(ro):
        pytest.skip("cannot make a folder read-only here")
    try:
        assert main(["demo", "--output", str(ro)]) == 2
        line = _one_error_line(capsys)
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True, check=False)
        ro.chmod(0o755)
    assert line.startswith(f"error: demo --output: cannot write to {ro} (") and "choose a writable folder" in line
    assert list(ro.iterdir()) == []


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_demo_steps_below_one_name_the_demos_default(tmp_path, capsys, monkeypatch, steps):
    _no_work(monkeypatch)
    assert main(["demo", "--steps", steps, "--output", str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys) == f"error: demo --steps is {steps}: the demo trains at least 1 step - use e.g. " \
                                      "the default 40"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resume", ["", "  "])
def test_an_empty_resume_is_refused(tmp_path, capsys, resume):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(demo_config(tmp_path / "out", steps=2)))
    assert main(["train", str(path), "--resume", resume]) == 2
    assert _one_error_line(capsys) == ("error: --resume is empty - give latest, a run folder or a state file, or "
                                       "leave --resume out")
    assert not (tmp_path / "out").exists()


def test_sample_stopped_by_sigterm_leaves_no_partial_video(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM while the video is written stops like Ctrl-C: exit 130, no hidden temporary left."""
    import signal

    import av

    job = {"name": "s", "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
           "train": {"device": "cpu", "compute_dtype": "fp32"}, "datasets": [{"folder": str(tmp_path)}],
           "sample": {"width": 32, "height": 32, "num_frames": 5, "steps": 2, "prompts": ["a cat"]}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "videos"
    out.mkdir()
    real_open, before = av.open, signal.getsignal(signal.SIGTERM)

    def open_then_terminated(*args, **kwargs):
        container = real_open(*args, **kwargs)  # the temporary file exists now
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, before):
            pytest.fail("sample did not handle SIGTERM: it would die, leaving its temporary file")
        os.kill(os.getpid(), signal.SIGTERM)
        return container

    monkeypatch.setattr(av, "open", open_then_terminated)
    try:
        assert main(["sample", str(path), "--out", str(out / "v.mp4")]) == 130
    finally:
        signal.signal(signal.SIGTERM, before)
    assert list(out.iterdir()) == []
    assert "Traceback" not in capsys.readouterr().err
