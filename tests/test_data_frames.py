"""Frame index selection for uniform and fps sampling, against hand-computed expectations."""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import pytest

from trainer_core.data.frames import (
    fps_indices,
    fps_start_count,
    frame_stride,
    padded_indices,
    spread_indices,
    stride_indices,
    stride_start_count,
    uniform_indices,
)


def times_at(fps: int, n: int) -> list[Fr]:
    return [Fr(i, fps) for i in range(n)]


@pytest.mark.parametrize(
    ("total", "n", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (10, 5, [0, 2, 5, 7, 9]),  # 0, 2.25, 4.5, 6.75, 9 rounded half up
        (20, 5, [0, 5, 10, 14, 19]),  # 0, 4.75, 9.5, 14.25, 19
        (5, 5, [0, 1, 2, 3, 4]),
        (9, 1, [4]),  # a single frame is the middle one
        (10, 1, [4]),
    ],
)
def test_uniform_hand_computed(total, n, expected):
    assert uniform_indices(total, n) == expected


def test_uniform_matches_exact_rational_rounding():
    for total in range(1, 90):
        for n in (2, 5, 9, 17, 33, 81):
            if n > total:
                continue
            ref = [math.floor(Fr(i * (total - 1), n - 1) + Fr(1, 2)) for i in range(n)]
            got = uniform_indices(total, n)
            assert got == ref
            assert got[0] == 0 and got[-1] == total - 1 and len(set(got)) == n


def test_uniform_refuses_short_clip():
    with pytest.raises(ValueError):
        uniform_indices(4, 5)


def test_padded_repeats_last_frame():
    assert padded_indices(3, 5) == [0, 1, 2, 2, 2]
    assert padded_indices(1, 1) == [0]


def test_fps_30_to_16_hand_computed():
    # output frame k at k/16 s = source frame 1.875k, nearest (ties to the earlier frame)
    times = times_at(30, 20)
    assert fps_indices(times, 5, Fr(16), 0) == [0, 2, 4, 6, 7]
    # last start: t_s + 0.25 s <= t_last + half a frame = 19/30 + 1/60  ->  s <= 12
    assert fps_start_count(times, 5, Fr(16)) == 13
    assert fps_indices(times, 5, Fr(16), 12) == [12, 14, 16, 18, 19]


def test_fps_window_boundary_and_short():
    assert fps_start_count(times_at(30, 8), 5, Fr(16)) == 1  # 7/30 + 1/60 == 0.25 exactly: fits
    assert fps_start_count(times_at(30, 7), 5, Fr(16)) == 0  # 0.2167 s < 0.25 s: short
    # a short clip started at 0 is padded with its last frame
    assert fps_indices(times_at(30, 7), 5, Fr(16), 0) == [0, 2, 4, 6, 6]


def test_fps_same_rate_takes_consecutive_frames():
    assert fps_start_count(times_at(16, 33), 33, Fr(16)) == 1
    assert fps_indices(times_at(16, 33), 33, Fr(16), 0) == list(range(33))
    assert fps_start_count(times_at(16, 40), 33, Fr(16)) == 8
    assert fps_indices(times_at(16, 40), 9, Fr(16), 7) == list(range(7, 16))


def test_fps_slower_source_repeats_frames_to_keep_speed():
    times = times_at(8, 10)
    assert fps_indices(times, 5, Fr(16), 0) == [0, 0, 1, 1, 2]  # 0, .5, 1, 1.5, 2 source frames
    assert fps_start_count(times, 5, Fr(16)) == 8  # t_s <= 9/8 + 1/16 - 1/4 = 15/16


def test_fps_variable_frame_rate_uses_timestamps():
    times = [Fr(0), Fr(1, 10), Fr(15, 100), Fr(3, 10), Fr(31, 100), Fr(1, 2)]
    assert fps_indices(times, 3, Fr(10), 0) == [0, 1, 2]  # 0, .1, .2 -> .2 is nearer .15 than .3
    assert fps_indices(times, 3, Fr(10), 3) == [3, 4, 5]  # .3, .4 (nearer .31), .5
    assert fps_start_count(times, 3, Fr(10)) == 5  # median gap .1: t_s <= .5 + .05 - .2


def test_fps_robust_to_millisecond_rounded_timestamps():
    # WebM/MKV store milliseconds: a 32 fps clip's frame 2 sits at 63 ms, just after the 62.5 ms sample time
    times = [Fr(math.ceil(i * 1000 / 32), 1000) for i in range(40)]
    assert fps_indices(times, 9, Fr(16), 0) == list(range(0, 18, 2))


def test_single_frame_window_fits_everywhere():
    times = times_at(24, 10)
    assert fps_start_count(times, 1, Fr(16)) == 10
    assert fps_indices(times, 1, Fr(16), 7) == [7]
    assert fps_start_count([Fr(0)], 1, Fr(16)) == 1
    assert fps_start_count([Fr(0)], 5, Fr(16)) == 0


def test_fps_start_out_of_range():
    with pytest.raises(ValueError):
        fps_indices(times_at(16, 4), 1, Fr(16), 4)


# --- ai-toolkit's arithmetic (toolkit/dataloader_mixins.py, load_and_process_video) ---------------------------


def _aitk_spread(total, n):
    """ai-toolkit's shrink / stretch branch, verbatim."""
    max_frame_index = total - 1
    interval = max_frame_index / (n - 1) if n > 1 else 0
    return [min(int(round(i * interval)), max_frame_index) for i in range(n)]


@pytest.mark.parametrize(("total", "n", "expected"), [
    (10, 5, [0, 2, 4, 7, 9]),  # 0, 2.25, 4.5, 6.75, 9: Python's round takes 4.5 to 4 (uniform takes 5)
    (4, 9, [0, 0, 1, 1, 2, 2, 2, 3, 3]),  # stretched: 0.375 steps, 1.5 -> 2, 2.625 -> 3
    (9, 17, [0, 0, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6, 6, 6, 7, 8, 8]),
])
def test_spread_hand_computed(total, n, expected):
    assert spread_indices(total, n) == expected


def test_spread_is_ai_toolkits_formula_and_uniform_keeps_its_own():
    for total in range(1, 90):
        for n in (2, 5, 9, 17, 33, 81):
            assert spread_indices(total, n) == _aitk_spread(total, n)
    assert uniform_indices(10, 5) == [0, 2, 5, 7, 9]  # this trainer's default rounds halves up, as before


@pytest.mark.parametrize(("times_fps", "fps", "stride"), [(30, 16, 2), (24, 16, 2), (16, 16, 1), (60, 16, 4), (30, 12, 2)])
def test_stride_is_rounded_fps_ratio(times_fps, fps, stride):
    # max(1, int(round(video_fps / fps))): 1.875 -> 2, 1.5 -> 2, 3.75 -> 4, 2.5 -> 2 (halves to even)
    assert frame_stride(times_at(times_fps, 50), Fr(fps)) == stride


def test_stride_windows():
    # 20 frames, stride 2, 9 frames: max_start = 19 - 16 = 3, random.randint(0, 3) -> 4 starts
    assert stride_start_count(20, 9, 2) == 4
    assert stride_indices(20, 9, 2, 3) == [3, 5, 7, 9, 11, 13, 15, 17, 19]
    assert stride_start_count(17, 9, 2) == 0  # 17 // 2 = 8 < 9: ai-toolkit stretches instead
