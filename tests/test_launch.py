"""Multi-GPU runs launched from one process (the ComfyUI path): torchrun as a child, progress events, cancel."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.errors import TrainerError
from trainer_core.launch import STOP_FILE, LaunchCancelled, run_torchrun
from trainer_core.train.runs import list_states
from trainer_core.train.loop import run_training
from trainer_core.train.state_io import load_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("clips"), n_clips=4, num_frames=5, size=(32, 32), seed=2)


def _cfg(tmp: Path, clips: Path, steps: int, **over):
    return job_from_dict({
        "name": "l",
        "model": {"source": "tiny", "dtype": "fp32", "text_encoder_dtype": "fp32"},
        "lora": {"rank": 4},
        "multistage": {"switch_every": 2},
        "optimizer": {"name": "adamw", "lr": 2e-3},
        "train": {"steps": steps, "batch_size": 2, "gradient_checkpointing": "off", "compute_dtype": "fp32",
                  "device": "cpu", "num_workers": 0},
        "save": {"output_dir": str(tmp / "out"), "save_every": 0},
        "datasets": [{"folder": str(clips), "num_frames": 5, "resolutions": [32]}],
        **over,
    })


def _steps(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] == "step"]


def _workers_left(tmp_path: Path) -> list[Path]:
    """Processes still running a job file of this test's launches (each launch has its own folder)."""
    launches = str(tmp_path / "out" / ".launch")
    return [p for p in Path("/proc").iterdir() if p.name.isdigit() and launches in _cmdline(p)]


def test_two_process_run_streams_every_step_and_returns_the_pair(tmp_path, clips):
    events = []
    done = run_torchrun(_cfg(tmp_path, clips, 4), 2, events.append, lambda: False, env=ENV)
    assert events[0] == {"event": "run", "run_dir": str(tmp_path / "out" / "l")}  # the folder the child claimed
    events = _steps(events)
    assert [e["step"] for e in events] == [1, 2, 3, 4]
    assert [e["expert"] for e in events] == ["high", "high", "low", "low"]
    assert all(e["total"] == 4 and e["loss"] > 0 for e in events)
    assert done["step"] == 4 and set(done["lora_files"]) == {"high", "low"}
    assert all(Path(p).is_file() for p in done["lora_files"].values())
    assert not (tmp_path / "out" / ".launch").exists() or not any((tmp_path / "out" / ".launch").iterdir())


def test_cancel_leaves_a_resumable_state_and_no_process(tmp_path, clips):
    cfg = _cfg(tmp_path, clips, 400)
    events = []
    with pytest.raises(LaunchCancelled):
        run_torchrun(cfg, 2, events.append, lambda: len(_steps(events)) >= 3, env=ENV)
    states = list_states(cfg.run_dir)
    assert states, "no resumable state was written on cancel"
    step, _ = states[-1]
    assert 3 <= step < 400 and step >= max(e["step"] for e in _steps(events))
    assert not _workers_left(tmp_path)  # every worker is gone


def test_cancelled_expert_groups_stop_together_at_a_round_end(tmp_path, clips):
    groups = {"multistage": {"switch_every": 1}, "distributed": {"expert_groups": True}}
    cfg = _cfg(tmp_path, clips, 400, **groups)
    cfg.train.num_workers = 1  # the forwarded SIGTERM reaches the loader workers too: they must not die of it
    events = []
    with pytest.raises(LaunchCancelled):
        # the cancel creates the stop file and sends no signal (torchrun < 2.12 kills 30 s after a SIGTERM)
        run_torchrun(cfg, 2, events.append, lambda: len(_steps(events)) >= 3, env=ENV)
    # the stop file went with the launch's own folder: a later run of the job is not stopped by it
    assert not list((tmp_path / "out").rglob(STOP_FILE))
    states = list_states(cfg.run_dir)
    assert len(states) == 1  # save_every 0: the state comes from the stop alone
    step, path = states[0]
    assert step % 2 == 0 and 4 <= step < 400  # a whole round of (high, low), at or after the cancel
    assert set(load_state(path)[0]["lora"]) == {"high", "low"}  # rank 0 gathered the low-noise group's expert
    assert not _workers_left(tmp_path)
    resumed = run_training(_cfg(tmp_path, clips, step + 2, **{**groups, "distributed": {}}, resume="latest"),
                           progress_bar=False)
    assert [e for _, e, _ in resumed.losses] == ["high", "low"] * (step // 2 + 1)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_a_failing_child_reports_its_output(tmp_path, clips):
    cfg = _cfg(tmp_path, clips, 4)
    cfg.datasets[0].folder = str(tmp_path / "missing")
    with pytest.raises(TrainerError, match=r"(?s)multi-GPU training failed.*\nerror: datasets\[0\].folder: .*missing"):
        run_torchrun(cfg, 2, lambda e: None, lambda: False, env=ENV)


class _HostInterrupt(Exception):
    """Stands for ComfyUI's progress hook raising its interrupt from inside a progress update."""


def test_an_exception_in_the_progress_callback_stops_the_child_cleanly(tmp_path, clips):
    cfg = _cfg(tmp_path, clips, 400)
    seen = []

    def on_event(event):
        seen.append(event)
        if len(_steps(seen)) == 3:
            raise _HostInterrupt()

    with pytest.raises(_HostInterrupt):
        run_torchrun(cfg, 2, on_event, lambda: False, env=ENV)
    step, _ = list_states(cfg.run_dir)[-1]
    assert 3 <= step < 400
    assert not _workers_left(tmp_path)
