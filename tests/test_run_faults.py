"""Faults during a run and bad resumes: each is refused with one line before work is spent, and none leaves a
checkpoint that cannot be resumed or that holds broken weights."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

import trainer_core.train.loop as loop
from trainer_core.cli import main
from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.errors import TrainingDiverged
from trainer_core.train.runs import MANIFEST, list_states

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=4, num_frames=5, size=(32, 32), seed=6)


def _job(out: Path, clips: Path, steps: int, **over) -> dict:
    return tiny_job(out, clips, steps, name="f", seed=5, switch_every=2, saving={"save_every": 2, "keep_last": 0},
                    **over)


def _no_models(monkeypatch):
    monkeypatch.setattr(loop, "load_components", lambda *a, **k: pytest.fail("models loaded before the check"))


def _cli(tmp_path: Path, job: dict, capsys) -> tuple[int, str, str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = main(["train", str(path)])
    out = capsys.readouterr()
    return code, out.out, out.err


# --- folders that cannot be written ---------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["output_dir", "cache_dir", "ara_cache_dir"])
def test_an_unwritable_folder_is_refused_before_any_model_loads(tmp_path, clips, monkeypatch, capsys, setting):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    job = _job(tmp_path / "out", clips, 2)
    if setting == "output_dir":
        job["save"]["output_dir"] = str(blocker / "runs")
    elif setting == "cache_dir":
        job["text_encoder"] = {"cache_dir": str(blocker / "cache")}
    else:
        job["quant"] = {"transformer": "4bit_ara", "ara_cache_dir": str(blocker / "ara")}
    _no_models(monkeypatch)
    code, _, err = _cli(tmp_path, job, capsys)
    name = {"output_dir": "save.output_dir", "cache_dir": "text_encoder.cache_dir",
            "ara_cache_dir": "quant.ara_cache_dir"}[setting]
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {name}: cannot write to {blocker}")
    assert errors[0].endswith(f": {blocker} is a file, not a folder - choose a folder")


# --- divergence -------------------------------------------------------------------------------------------------------


def test_exploding_weights_never_reach_a_resumable_state(tmp_path, clips, monkeypatch):
    """The issue's case: the low-noise expert's update at step 4 blows its LoRA up (|w| ~ 1e30, still finite); the
    high-noise expert trains steps 5-6 fine and step 7's low-noise loss is inf/NaN. The states of steps 4 and 6 both
    hold the exploded weights (resuming either replays step 7 as it was, whatever the lr): both are set aside, and
    resuming 'latest' with a lower lr starts from step 2's good state and trains on."""
    import trainer_core.train.experts as experts_mod

    real_step = experts_mod.Expert.optimizer_step

    def exploding(self, max_grad_norm):
        ok = real_step(self, max_grad_norm)
        if self.steps_done == 2 and self.name == "low":  # after global step 4 (2 high, then 2 low)
            with torch.no_grad():
                for p in self.model.parameters():
                    if p.requires_grad:
                        p.mul_(1e30)
        return ok

    monkeypatch.setattr(experts_mod.Expert, "optimizer_step", exploding)
    with pytest.raises(TrainingDiverged) as info:
        loop.run_training(job_from_dict(_job(tmp_path / "out", clips, 8)), progress_bar=False)
    message = str(info.value)
    assert "at step 7 (low-noise expert)" in message and "last good state is step 2" in message
    assert "set aside as training_state_000004.diverged.safetensors, training_state_000006.diverged" in message
    run = tmp_path / "out" / "f"
    assert [s for s, _ in list_states(run)] == [2]
    assert json.loads((run / MANIFEST).read_text())["status"] == "diverged"
    monkeypatch.setattr(experts_mod.Expert, "optimizer_step", real_step)
    resumed = loop.run_training(job_from_dict({**_job(tmp_path / "out", clips, 8, optimizer={"lr": 1e-3}),
                                               "resume": "latest"}), progress_bar=False)
    assert resumed.step == 8 and all(math.isfinite(v) for _, _, v in resumed.losses)
    assert [s for s, _, _ in resumed.losses] == list(range(1, 9))


def test_a_non_finite_loss_before_any_update_names_the_model_not_the_learning_rate(tmp_path, clips):
    from trainer_core.models import load_components

    cfg = job_from_dict(_job(tmp_path / "out", clips, 4))
    components = load_components(cfg.model)
    with torch.no_grad():
        components.low.blocks[0].ffn.net[2].weight[0, 0] = float("nan")  # a damaged base weight
    with pytest.raises(TrainingDiverged) as info:
        loop.run_training(cfg, components=components, progress_bar=False)
    message = str(info.value)
    assert "at step 3, the low-noise expert's first, before any LoRA update" in message  # steps 1-2 were high's
    assert "the low-noise expert's weights (tiny)" in message and "lower optimizer.lr" not in message


def test_a_non_finite_gradient_skips_the_update_and_stops(tmp_path, clips, monkeypatch):
    """A finite loss whose backward overflows: the optimizer never steps on it (clipping would turn inf into NaN
    weights and moments), so no state on disk and no weight in memory is ever non-finite."""
    import trainer_core.train.step as step
    from trainer_core.lora import lora_parameters
    from trainer_core.models import load_components

    calls = {"n": 0}

    def overflowing_grads(model):
        params = lora_parameters(model)
        calls["n"] += 1
        if calls["n"] == 4:
            params[0].grad = torch.full_like(params[0], float("inf"))
        return params

    monkeypatch.setattr(step, "lora_parameters", overflowing_grads)
    cfg = job_from_dict(_job(tmp_path / "out", clips, 6, save={"save_every": 1}))
    components = load_components(cfg.model)
    with pytest.raises(TrainingDiverged, match=r"\(or its gradient\) became nan at step 4"):
        loop.run_training(cfg, components=components, progress_bar=False)
    assert all(torch.isfinite(p).all() for m in (components.high, components.low) for p in lora_parameters(m))
    run = tmp_path / "out" / "f"
    # step 4's low-noise weights are those of step 3's update: that state is set aside, earlier ones stay
    assert [s for s, _ in list_states(run)] == [1, 2]
    for state in run.glob("training_state_*"):
        with safe_open(str(state), "pt") as fh:
            assert all(torch.isfinite(t).all() for t in map(fh.get_tensor, fh.keys()) if t.is_floating_point())


# --- what a resume may change ---------------------------------------------------------------------------------------


def test_resume_applies_a_new_lr_and_schedule_and_says_so(tmp_path, clips, caplog):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 4)), progress_bar=False)
    lrs = []
    job = {**_job(out, clips, 12, optimizer={"lr": 5e-4, "lr_scheduler": "cosine"}), "resume": "latest"}
    with caplog.at_level("INFO"):
        loop.run_training(job_from_dict(job), on_step=lambda i: lrs.append((i.step, i.expert, i.lr)),
                          progress_bar=False)
    assert f"resume: from {out / 'f' / 'training_state_000004.safetensors'}, step 4 of 12" in caplog.text
    # the run's config.yaml says what it trains with now; what steps 1-4 trained with is kept beside it
    assert yaml.safe_load((out / "f" / "config.yaml").read_text())["optimizer"]["lr"] == 5e-4
    assert yaml.safe_load((out / "f" / "config_until_000004.yaml").read_text())["optimizer"]["lr"] == 2e-3
    assert "resume: optimizer.lr: 0.002 -> 0.0005 (applied from step 4 on)" in caplog.text
    assert "optimizer.lr_scheduler: 'constant' -> 'cosine'" in caplog.text
    # each expert's own cosine over its 6 steps (diffusers' formula), continued from its 2 steps done; a step
    # reports the lr it trained with
    expected = []
    done = {"high": 2, "low": 2}
    for step in range(5, 13):
        expert = "high" if (step - 1) // 2 % 2 == 0 else "low"
        expected.append((step, expert, 5e-4 * 0.5 * (1 + math.cos(math.pi * done[expert] / 6))))
        done[expert] += 1
    assert [(s, e) for s, e, _ in lrs] == [(s, e) for s, e, _ in expected]
    assert all(math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15) for (_, _, a), (_, _, b) in zip(lrs, expected))


@pytest.mark.parametrize("change, named", [
    ({"optimizer": {"name": "adamw8bit"}}, "optimizer.name was 'adamw' in the state, now 'adamw8bit'"),
    ({"train": {"batch_size": 1}}, "train.batch_size was 2"),
    ({"lora": {"rank": 8}}, "lora.rank was 4"),
])
def test_resume_refuses_by_name_what_cannot_change(tmp_path, clips, monkeypatch, capsys, change, named):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 2)), progress_bar=False)
    _no_models(monkeypatch)
    code, _, err = _cli(tmp_path, {**_job(out, clips, 4, **change), "resume": "latest"}, capsys)
    assert code == 2 and "Traceback" not in err and named in err and "set them back" in err


def test_resume_past_train_steps_is_refused_and_at_train_steps_returns_the_pair(tmp_path, clips, monkeypatch,
                                                                                capsys):
    out = tmp_path / "out"
    first = loop.run_training(job_from_dict(_job(out, clips, 4)), progress_bar=False)
    _no_models(monkeypatch)
    code, _, err = _cli(tmp_path, {**_job(out, clips, 3), "resume": "latest"}, capsys)
    assert code == 2 and "is at step 4, past train.steps 3 - raise train.steps above 4" in err
    code, printed, _ = _cli(tmp_path, {**_job(out, clips, 4), "resume": "latest"}, capsys)
    assert code == 0
    assert f"high-noise LoRA: {first.lora_files['high']}" in printed
    assert f"low-noise LoRA: {first.lora_files['low']}" in printed


def test_an_unreadable_state_is_named_and_latest_falls_back(tmp_path, clips, monkeypatch, capsys, caplog):
    out = tmp_path / "out"
    loop.run_training(job_from_dict(_job(out, clips, 4)), progress_bar=False)
    newest = out / "f" / "training_state_000004.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (a copy cut short, a full disk elsewhere)
    code, _, err = _cli(tmp_path, {**_job(out, clips, 6), "resume": str(newest)}, capsys)
    assert code == 2 and "Traceback" not in err and f"resume: cannot use {newest}" in err
    with caplog.at_level("WARNING"):
        result = loop.run_training(job_from_dict({**_job(out, clips, 6), "resume": "latest"}), progress_bar=False)
    assert "skipping training_state_000004.safetensors" in caplog.text
    assert result.step == 6 and [s for s, _, _ in result.losses] == list(range(1, 7))  # from step 2


# --- interrupts and a full disk -------------------------------------------------------------------------------------


def test_a_cancel_without_training_states_still_writes_the_lora_pair(tmp_path, clips):
    def cancel_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    cfg = job_from_dict(_job(tmp_path / "out", clips, 8, save={"save_every": 0, "save_training_state": False}))
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(cfg, on_step=cancel_at_3, progress_bar=False)
    run = tmp_path / "out" / "f"
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["f_000003_high_noise.safetensors",
                                                                 "f_000003_low_noise.safetensors"]


def test_ctrl_c_on_the_cli_ends_with_one_line_saying_how_to_resume(tmp_path, clips):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(tmp_path / "out", clips, 400, save={"save_every": 0})))
    proc = subprocess.Popen([sys.executable, "-m", "trainer_core", "train", str(job), "--events"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if '"event": "step"' in line:  # a step finished: Ctrl-C now
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130 and "Traceback" not in err
    step = list_states(tmp_path / "out" / "f")[-1][0]
    assert f"training stopped: resumable state at step {step}" in err
    assert "--resume latest" in err


def _signal_during_save(monkeypatch, at_call: int, signum: int) -> dict:
    """Send ``signum`` to this process in the middle of the ``at_call``-th training state write."""
    import trainer_core.train.checkpoints as checkpoints

    real, calls = checkpoints.save_state, {"n": 0}

    def interrupted(path, state, metadata=None):
        calls["n"] += 1
        if calls["n"] == at_call:
            os.kill(os.getpid(), signum)  # Python runs the handler at once, here: mid-save
        return real(path, state, metadata)

    monkeypatch.setattr(checkpoints, "save_state", interrupted)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_save_stops_the_run_once_that_save_is_written(tmp_path, clips, monkeypatch, signum):
    from trainer_core.launch import interrupt_on_sigterm

    whole = loop.run_training(job_from_dict(_job(tmp_path / "a", clips, 6)), progress_bar=False)
    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()  # as the CLI does: SIGTERM stops a run like Ctrl-C
    try:
        calls = _signal_during_save(monkeypatch, 2, signum)  # the save of step 4
        with pytest.raises(KeyboardInterrupt):
            loop.run_training(job_from_dict(_job(tmp_path / "b", clips, 6)), progress_bar=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    run = tmp_path / "b" / "f"
    assert calls["n"] == 2 and [s for s, _ in list_states(run)] == [2, 4]  # step 4 kept, nothing written twice
    assert not list(run.glob(".*.tmp"))
    monkeypatch.undo()
    resumed = loop.run_training(job_from_dict({**_job(tmp_path / "b", clips, 6), "resume": "latest"}),
                                progress_bar=False)
    assert resumed.losses == whole.losses


def test_a_second_ctrl_c_during_the_save_on_the_way_out_does_not_cut_it_short(tmp_path, clips, monkeypatch, caplog):
    def stop_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    _signal_during_save(monkeypatch, 2, signal.SIGINT)  # the save of step 3, on the way out
    with pytest.raises(KeyboardInterrupt):
        loop.run_training(job_from_dict(_job(tmp_path / "b", clips, 6)), on_step=stop_at_3, progress_bar=False)
    run = tmp_path / "b" / "f"
    assert [s for s, _ in list_states(run)] == [2, 3] and not list(run.glob(".*.tmp"))
    assert "SIGINT during the save of step 3: the save was finished first" in caplog.text


def test_a_full_disk_ends_with_one_line_and_the_earlier_state_intact(tmp_path, clips, monkeypatch, capsys):
    import trainer_core.train.checkpoints as checkpoints

    real = checkpoints.save_state
    calls = {"n": 0}

    def full_disk(path, state, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            from trainer_core.fileio import atomic_write

            def no_space(tmp):
                raise OSError(errno.ENOSPC, "No space left on device")

            atomic_write(path, no_space)
        return real(path, state, metadata)

    monkeypatch.setattr(checkpoints, "save_state", full_disk)
    code, _, err = _cli(tmp_path, _job(tmp_path / "out", clips, 6), capsys)
    assert code == 2 and "Traceback" not in err and calls["n"] == 2  # not tried again on the way out
    assert "error: could not write" in err and "training_state_000004.safetensors: the disk is full" in err
    run = tmp_path / "out" / "f"
    assert [s for s, _ in list_states(run)] == [2] and not list(run.glob(".*.tmp"))
    resumed = loop.run_training(job_from_dict({**_job(tmp_path / "out", clips, 6), "resume": "latest"}),
                                progress_bar=False)
    assert resumed.step == 6


def test_a_full_disk_while_a_preview_is_written_is_one_warning_and_training_goes_on(tmp_path, clips, monkeypatch,
                                                                                     caplog):
    """A preview is a by-product: one that cannot be written is named in one line and the run trains on (its frames
    still reach on_sample); only a checkpoint that cannot be written stops it (above)."""
    import av

    real_open, failed = av.open, []

    def full_once(path, *args, **kwargs):
        if kwargs.get("mode") == "w" and not failed:
            failed.append(Path(path))
            Path(path).write_bytes(b"partial")  # what the encoder had written when the disk filled
            raise av.error.OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(av, "open", full_once)
    sample = {"prompts": ["a cat"], "width": 32, "height": 32, "num_frames": 5, "steps": 2, "sample_every": 2}
    rendered = []
    result = loop.run_training(job_from_dict(_job(tmp_path / "out", clips, 4, sample=sample)),
                               on_sample=lambda step, videos: rendered.append(step), progress_bar=False)
    run = tmp_path / "out" / "f"
    assert result.step == 4 and rendered == [2, 4] and [s for s, _ in list_states(run)] == [2, 4]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["f_000004_00.mp4"]  # nothing partial of step 2
    warnings = [r.getMessage() for r in caplog.records if "preview" in r.getMessage() and r.levelno == logging.WARNING]
    assert warnings == [f"warning: preview of step 2 not saved, training goes on: could not write "
                        f"{run / 'samples' / 'f_000002_00.mp4'}: the disk is full - free space (or point "
                        "save.output_dir at another disk) before the next checkpoint is due"]


def test_lora_dropout_with_data_workers_resumes_exactly(tmp_path, clips):
    over = dict(lora={"dropout": 0.2}, train={"num_workers": 1}, save={"save_every": 0})
    full = loop.run_training(job_from_dict(_job(tmp_path / "a", clips, 6, **over)), progress_bar=False)

    def stop_at_3(info):
        if info.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.run_training(job_from_dict(_job(tmp_path / "b", clips, 6, **over)), on_step=stop_at_3,
                          progress_bar=False)
    resumed = loop.run_training(job_from_dict({**_job(tmp_path / "b", clips, 6, **over), "resume": "latest"}),
                                progress_bar=False)
    assert resumed.losses == full.losses  # bitwise, every step


def test_settings_that_run_but_not_as_written_are_named_before_models_load(tmp_path, clips, monkeypatch, caplog):
    job = _job(tmp_path / "out", clips, 2, train={"batch_size": 8}, multistage={"switch_every": 1})
    job["distributed"] = {"expert_groups": True}
    _no_models(monkeypatch)
    with caplog.at_level("WARNING"), pytest.raises(pytest.fail.Exception, match="models loaded"):
        loop.run_training(job_from_dict(job), progress_bar=False)
    assert "train.batch_size is 8 but an epoch has 4 sample(s)" in caplog.text
    assert "distributed.expert_groups is on but this is one process" in caplog.text
