"""TensorBoard event files of a run, in its folder's ``tensorboard`` subfolder (``tensorboard --logdir <output_dir>``
shows every run side by side).

Optional: written through ``torch.utils.tensorboard`` when the ``tensorboard`` package is installed (``pip install
tensorboard``, or the pack's ``[tensorboard]`` extra); ``save.tensorboard: auto`` writes them only then, ``on``
refuses to start without it (:func:`check_tensorboard`), ``off`` never writes them. Only rank 0 writes.

Tags: ``loss/<expert>`` (each step's training loss), ``validation/<expert>``, ``lr/<expert>``,
``time/seconds_per_step`` and ``preview/<n>`` (the first, middle and last frame of preview video ``n``, side by
side; video summaries would need moviepy).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Sequence

import torch

from ..config import JobConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

FOLDER = "tensorboard"


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package can be imported (looked up, not imported: that takes about a second)."""
    return importlib.util.find_spec("tensorboard") is not None


def check_tensorboard(cfg: JobConfig) -> None:
    """Refuse ``save.tensorboard: on`` without the tensorboard package, before anything loads."""
    if cfg.save.tensorboard == "on" and not tensorboard_installed():
        raise ConfigError("save.tensorboard is on but the tensorboard package is not installed - pip install "
                          "tensorboard, or set save.tensorboard to auto (event files only when it is installed)")


class EventLog:
    """What the training loop reports to TensorBoard. This base writes nothing: TensorBoard is off, not installed,
    or this is not rank 0."""

    def steps(self, steps: Sequence[int], experts: Sequence[str], losses: Sequence[float], lrs: Sequence[float],
              seconds_per_step: float) -> None:  # fmt: skip
        """A round's optimizer steps (1-based numbers) with each one's expert, loss and learning rate."""

    def validation(self, step: int, values: dict[str, float]) -> None:
        """The validation loss of each expert after ``step`` steps."""

    def previews(self, step: int, videos: Sequence[torch.Tensor]) -> None:
        """The preview videos (``[F, H, W, 3]`` in 0..1) rendered after ``step`` steps."""

    def close(self) -> None:
        """Flush and close the event file."""


class TensorBoardLog(EventLog):
    """Event files written with ``torch.utils.tensorboard.SummaryWriter`` into ``folder``."""

    def __init__(self, folder: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run hides what the interrupted one logged after the state it resumes from (purge_step):
        # those steps are trained again, and TensorBoard would draw both.
        self.writer = SummaryWriter(str(folder), purge_step=first_step + 1 if first_step else None)

    def steps(self, steps: Sequence[int], experts: Sequence[str], losses: Sequence[float], lrs: Sequence[float],
              seconds_per_step: float) -> None:  # fmt: skip
        for step, expert, loss, lr in zip(steps, experts, losses, lrs):
            self.writer.add_scalar(f"loss/{expert}", loss, step)
            self.writer.add_scalar(f"lr/{expert}", lr, step)
            self.writer.add_scalar("time/seconds_per_step", seconds_per_step, step)

    def validation(self, step: int, values: dict[str, float]) -> None:
        for expert, value in values.items():
            self.writer.add_scalar(f"validation/{expert}", value, step)

    def previews(self, step: int, videos: Sequence[torch.Tensor]) -> None:
        for i, frames in enumerate(videos):
            picked = frames[[0, len(frames) // 2, len(frames) - 1]].float().clamp(0, 1)
            strip = torch.cat(list(picked), dim=1)  # [H, 3W, 3]
            self.writer.add_image(f"preview/{i}", strip.cpu(), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def open_event_log(cfg: JobConfig, run_dir: Path, is_main: bool, first_step: int) -> EventLog:
    """The run's event log: TensorBoard files in ``run_dir/tensorboard`` on rank 0 when ``save.tensorboard`` and the
    installation allow, else one that writes nothing (``auto`` without the package says so in one line)."""
    if not is_main or cfg.save.tensorboard == "off":
        return EventLog()
    if not tensorboard_installed():
        log.info("TensorBoard: the tensorboard package is not installed, so no event files are written (pip "
                 "install tensorboard to get them)")
        return EventLog()
    return TensorBoardLog(run_dir / FOLDER, first_step)
