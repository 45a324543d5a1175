"""Which source frames make up a training clip (pure functions, no I/O).

Two sampling modes:

* ``uniform``: ``num_frames`` frame positions spread evenly over the whole clip, first and last frame included
  (a single frame takes the middle one). The clip's real speed is not kept: a long clip becomes fast motion.
* ``fps``: a window of ``num_frames`` frames at the model's frame rate (16 fps for Wan), so motion keeps its real
  speed. Output frame ``k`` of a window starting at source frame ``s`` shows the source frame whose timestamp is
  nearest to ``t_s + k / fps`` (ties go to the earlier frame). Working on timestamps rather than a nominal rate
  keeps variable-frame-rate clips (phones, GIFs) at their real speed too.

* ``aitoolkit_uniform``: as ``uniform``, with ai-toolkit's arithmetic (toolkit/dataloader_mixins.py, shrink on):
  position ``i * ((T - 1) / (n - 1))`` in floating point, rounded by Python's ``round`` (halves to even), so a
  position exactly between two frames may take the earlier one where ``uniform`` takes the later.
* ``stride``: ai-toolkit's ``shrink_video_to_frames: false``: every ``k``-th source frame, ``k = max(1,
  round(clip fps / fps))``, from a start drawn among ``0 .. T - 1 - (n - 1) k`` (:func:`stride_indices`).

A clip is *short* when the window does not fit: fewer than ``num_frames`` frames (uniform), or less time than
``(num_frames - 1) / fps`` between its first and last frame, with half a frame of slack for rounded timestamps
(fps), or fewer than ``n`` frames at the stride (``T // k < n``, stride). The dataset then skips it, pads it by
repeating its last frame (:func:`padded_indices`), or stretches it as ai-toolkit does (:func:`spread_indices`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from fractions import Fraction
from statistics import median
from typing import Sequence


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``range(total_frames)``, first and last included (rounded half up).

    Requires ``total_frames >= num_frames`` (a shorter clip is short: see :func:`padded_indices`).
    """
    if num_frames < 1 or total_frames < num_frames:
        raise ValueError(f"uniform sampling needs 1 <= num_frames <= total_frames, got {num_frames}, {total_frames}")
    if num_frames == 1:
        return [(total_frames - 1) // 2]
    # round(i * (T-1) / (n-1)) with exact integer arithmetic, halves rounded up.
    den = 2 * (num_frames - 1)
    return [(2 * i * (total_frames - 1) + num_frames - 1) // den for i in range(num_frames)]


def padded_indices(total_frames: int, num_frames: int) -> list[int]:
    """All frames of a short clip from the start, then its last frame repeated up to ``num_frames``."""
    if total_frames < 1:
        raise ValueError("a clip needs at least one frame")
    return [min(i, total_frames - 1) for i in range(num_frames)]


def _frame_duration(times: Sequence[Fraction]) -> Fraction:
    """Typical frame duration (median gap); 0 for a single frame."""
    if len(times) < 2:
        return Fraction(0)
    return Fraction(median(b - a for a, b in zip(times, times[1:])))


def fps_start_count(times: Sequence[Fraction], num_frames: int, fps: Fraction) -> int:
    """How many source frames can start a ``num_frames`` window at ``fps`` (0 = the clip is short).

    ``times`` are the presentation times of the source frames in seconds, strictly increasing. Valid starts are
    the first ``count`` frames.
    """
    if not times:
        return 0
    span = Fraction(num_frames - 1) / Fraction(fps)
    limit = times[-1] + _frame_duration(times) / 2 - span
    return bisect_right(times, limit)


def _nearest(times: Sequence[Fraction], t: Fraction) -> int:
    j = bisect_left(times, t)
    if j == 0:
        return 0
    if j == len(times):
        return len(times) - 1
    return j if times[j] - t < t - times[j - 1] else j - 1


def fps_indices(times: Sequence[Fraction], num_frames: int, fps: Fraction, start: int) -> list[int]:
    """Source frame indices of the window starting at source frame ``start``.

    Sample times past the last frame map to the last frame, so a short clip started at 0 is padded by repeating
    its last frame.
    """
    if not 0 <= start < len(times):
        raise ValueError(f"window start {start} outside a clip of {len(times)} frames")
    step = 1 / Fraction(fps)
    t0 = times[start]
    return [_nearest(times, t0 + k * step) for k in range(num_frames)]


def spread_indices(total_frames: int, num_frames: int) -> list[int]:
    """ai-toolkit's even spread over a whole clip (dataloader_mixins.py): ``int(round(i * interval))`` with
    ``interval = (T - 1) / (n - 1)`` a float and Python's ``round`` (halves to even); frame 0 for one frame. A clip
    shorter than ``num_frames`` is stretched: its frames repeat, spread evenly through it."""
    if total_frames < 1 or num_frames < 1:
        raise ValueError(f"spreading needs a clip and num_frames >= 1, got {total_frames}, {num_frames}")
    last = total_frames - 1
    interval = last / (num_frames - 1) if num_frames > 1 else 0
    return [min(int(round(i * interval)), last) for i in range(num_frames)]


def frame_stride(times: Sequence[Fraction], fps: Fraction) -> int:
    """ai-toolkit's step between source frames, ``max(1, round(clip fps / fps))`` (halves to even, as Python rounds);
    the clip's rate is its average over the whole clip (cv2's nominal rate there: the same for constant-rate
    clips). 1 for a single frame."""
    if len(times) < 2:
        return 1
    rate = Fraction(len(times) - 1) / (times[-1] - times[0])
    return max(1, round(rate / Fraction(fps)))


def stride_start_count(total_frames: int, num_frames: int, stride: int) -> int:
    """How many source frames can start a stride window (0 = short: ai-toolkit needs ``T // k >= n``)."""
    if total_frames // stride < num_frames:
        return 0
    return total_frames - (num_frames - 1) * stride  # starts 0 .. max_start, as random.randint(0, max_start)


def stride_indices(total_frames: int, num_frames: int, stride: int, start: int) -> list[int]:
    """Every ``stride``-th frame from ``start``; frames past the end repeat the last one (a padded short clip)."""
    return [min(start + i * stride, total_frames - 1) for i in range(num_frames)]
