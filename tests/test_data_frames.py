"""Frame index selection for uniform and fps sampling, against hand-computed expectations."""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import pytest

from trainer_core.data.frames import fps_indices, fps_start_count, padded_indices, uniform_indices


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
