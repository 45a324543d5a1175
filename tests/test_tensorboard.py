"""TensorBoard event files: refused only when asked for without the package, silent without it, every series
reported on rank 0 (through a recording stand-in for ``SummaryWriter``, and through the real one when tensorboard is
installed)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
import torch

import trainer_core.train.event_log as event_log
import trainer_core.train.loop as loop
from trainer_core.config import job_from_dict
from trainer_core.data import make_synthetic_dataset
from trainer_core.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from tiny_job import tiny_job  # noqa: E402

SAMPLE = {"prompts": ["a red square moving right"], "width": 32, "height": 32, "num_frames": 5, "steps": 2,
          "sample_every": 2, "sampler": "euler"}  # fmt: skip


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    make_synthetic_dataset(root / "train", n_clips=4, num_frames=5, size=(32, 32), seed=0)
    make_synthetic_dataset(root / "held", n_clips=1, num_frames=5, size=(32, 32), seed=1)
    return root


def _job(out: Path, clips: Path, tensorboard: object, **over) -> dict:
    return tiny_job(out, clips / "train", 4, name="tb", seed=1, switch_every=1,
                    saving={"save_every": 2, "tensorboard": tensorboard},
                    datasets=[{"folder": str(clips / "train"), "num_frames": 5, "resolutions": [32]},
                              {"folder": str(clips / "held"), "num_frames": 5, "resolutions": [32],
                               "validation": True}], **over)  # fmt: skip


class RecordingWriter:
    """Records what the trainer writes, as ``torch.utils.tensorboard.SummaryWriter`` would receive it."""

    made: list["RecordingWriter"] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        self.log_dir, self.purge_step = log_dir, purge_step
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, tuple[int, ...], int]] = []
        self.closed = False
        RecordingWriter.made.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, float(value), step))

    def add_image(self, tag: str, image: torch.Tensor, step: int, dataformats: str = "CHW") -> None:
        assert dataformats == "HWC" and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        self.images.append((tag, tuple(image.shape), step))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recording(monkeypatch):
    """TensorBoard 'installed', with the recording writer in place of the real one."""
    RecordingWriter.made = []
    monkeypatch.setattr(event_log, "tensorboard_installed", lambda: True)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=RecordingWriter))
    return RecordingWriter.made


def test_tensorboard_on_without_the_package_is_refused_in_one_line(tmp_path, clips, monkeypatch):
    monkeypatch.setattr(event_log, "tensorboard_installed", lambda: False)
    cfg = job_from_dict(_job(tmp_path, clips, "on"))
    with pytest.raises(ConfigError) as err:
        loop.preflight(cfg, model_files=False)
    assert "pip install tensorboard" in str(err.value) and "\n" not in str(err.value)
    loop.preflight(job_from_dict(_job(tmp_path, clips, "auto")), model_files=False)  # auto: no refusal


def test_run_without_tensorboard_writes_no_event_files(tmp_path, clips, monkeypatch, caplog):
    monkeypatch.setattr(event_log, "tensorboard_installed", lambda: False)
    with caplog.at_level(logging.INFO, logger="trainer_core"):
        result = loop.run_training(job_from_dict(_job(tmp_path, clips, "auto")), progress_bar=False)
    assert result.step == 4 and not (result.run_dir / "tensorboard").exists()
    assert sum("tensorboard package is not installed" in r.getMessage() for r in caplog.records) == 1


def test_tensorboard_off_writes_nothing(tmp_path, clips, recording):
    result = loop.run_training(job_from_dict(_job(tmp_path, clips, False)), progress_bar=False)
    assert result.step == 4 and recording == []


@pytest.mark.slow
def test_event_log_gets_every_series(tmp_path, clips, recording):
    result = loop.run_training(job_from_dict(_job(tmp_path, clips, "auto", sample=SAMPLE)), progress_bar=False)
    (writer,) = recording
    assert Path(writer.log_dir) == result.run_dir / "tensorboard" and writer.purge_step is None and writer.closed
    by_tag: dict[str, list[tuple[int, float]]] = {}
    for tag, value, step in writer.scalars:
        by_tag.setdefault(tag, []).append((step, value))
    assert by_tag["loss/high"] == [(s, v) for s, e, v in result.losses if e == "high"]
    assert by_tag["loss/low"] == [(s, v) for s, e, v in result.losses if e == "low"]
    assert [s for s, _ in by_tag["lr/high"]] == [1, 3] and [s for s, _ in by_tag["time/seconds_per_step"]] == [1, 2, 3, 4]
    assert by_tag["validation/low"] == [(s, v) for s, e, v in result.validation if e == "low"]
    assert [s for s, _ in by_tag["validation/high"]] == [0, 2, 4]
    assert writer.images == [("preview/0", (32, 96, 3), 2), ("preview/0", (32, 96, 3), 4)]  # 3 frames side by side

    RecordingWriter.made.clear()
    cfg = job_from_dict({**_job(tmp_path, clips, "auto", train={"steps": 6}), "resume": "latest"})
    loop.run_training(cfg, progress_bar=False)
    (resumed,) = recording
    assert resumed.purge_step == 5  # what the first run may have logged after step 4 is hidden
    assert min(s for _, _, s in resumed.scalars) == 5


@pytest.mark.slow
def test_real_event_files(tmp_path, clips):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = loop.run_training(job_from_dict(_job(tmp_path, clips, "on")), progress_bar=False)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/high", "loss/low", "lr/high", "lr/low", "validation/high", "validation/low",
            "time/seconds_per_step"} <= tags  # fmt: skip
    high = [(s, v) for s, x, v in result.validation if x == "high"]
    written = events.Scalars("validation/high")
    assert [e.step for e in written] == [s for s, _ in high]
    assert [e.value for e in written] == pytest.approx([v for _, v in high], rel=1e-6)  # stored as float32
