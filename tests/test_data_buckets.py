"""Bucket math: sizes, assignment by aspect ratio, resize + centre-crop plan."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer_core.data.buckets import assign_bucket, bucket_sizes, resize_crop_plan


def brute_force_buckets(res: int, step: int = 16, max_aspect: float = 4.0) -> set[tuple[int, int]]:
    area = res * res
    fits = lambda w, h: w * h <= area  # noqa: E731
    out = set()
    for w in range(step, 4 * res + step, step):
        for h in range(step, 4 * res + step, step):
            if fits(w, h) and not fits(w + step, h) and not fits(w, h + step) and max(w / h, h / w) <= max_aspect:
                out.add((w, h))
    return out


@pytest.mark.parametrize("res", [32, 48, 256, 512, 768, 1024, 640])
def test_bucket_sizes_properties(res):
    buckets = bucket_sizes(res)
    assert set(buckets) == brute_force_buckets(res)
    assert len(buckets) == len(set(buckets))
    assert (res, res) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert w * h <= res * res
        assert (h, w) in buckets  # portrait and landscape alike


def test_bucket_sizes_refuses_bad_resolution():
    with pytest.raises(ValueError):
        bucket_sizes(500)


@pytest.mark.parametrize(
    ("res", "size", "expected"),
    [
        (512, (1920, 1080), (672, 384)),  # 16:9
        (512, (1080, 1920), (384, 672)),  # 9:16
        (768, (1920, 1080), (1024, 576)),  # exact 16:9
        (1024, (1920, 1080), (1360, 768)),
        (512, (640, 640), (512, 512)),
        (32, (64, 48), (32, 32)),
    ],
)
def test_assign_hand_computed(res, size, expected):
    assert assign_bucket(*size, bucket_sizes(res)) == expected


def test_assign_is_closest_aspect_float64():
    rng = np.random.default_rng(0)
    for res in (512, 768, 1024):
        buckets = bucket_sizes(res)
        ratios = np.array([w / h for w, h in buckets], dtype=np.float64)
        for _ in range(200):
            w, h = rng.integers(16, 4000, size=2)
            got = assign_bucket(int(w), int(h), buckets)
            dist = np.abs(np.log(ratios) - np.log(np.float64(w) / np.float64(h)))
            assert math.isclose(abs(math.log(got[0] / got[1]) - math.log(w / h)), dist.min(), abs_tol=1e-12)


def test_assign_tie_prefers_larger_then_squarer_bucket():
    buckets = bucket_sizes(32)  # 16x64, 32x32, 64x16 (all area 1024)
    assert assign_bucket(64, 32, buckets) == (32, 32)  # 2:1 is equally far from 1:1 and 4:1
    assert assign_bucket(32, 64, buckets) == (32, 32)


def test_assign_extreme_aspect_takes_the_widest_bucket():
    buckets = bucket_sizes(512)
    w, h = assign_bucket(10000, 100, buckets)
    assert w / h == max(a / b for a, b in buckets) and w / h <= 4.0


@pytest.mark.parametrize(
    ("src", "bucket", "expected"),
    [
        ((64, 48), (32, 32), (43, 32, 5, 0)),  # scale 2/3 on height: 42.67 -> 43 wide, crop 5 from the left
        ((48, 64), (32, 32), (32, 43, 0, 5)),
        ((20, 10), (32, 16), (32, 16, 0, 0)),  # upscaled, same aspect: nothing to crop
        ((1920, 1080), (672, 384), (683, 384, 5, 0)),
        ((128, 64), (32, 32), (64, 32, 16, 0)),
    ],
)
def test_resize_crop_plan_hand_computed(src, bucket, expected):
    assert resize_crop_plan(*src, *bucket) == expected


def test_resize_crop_plan_always_covers_bucket():
    rng = np.random.default_rng(1)
    for _ in range(300):
        sw, sh = (int(v) for v in rng.integers(8, 3000, size=2))
        bw, bh = assign_bucket(sw, sh, bucket_sizes(512))
        rw, rh, left, top = resize_crop_plan(sw, sh, bw, bh)
        assert rw >= bw and rh >= bh
        assert rw == bw or rh == bh  # one side matches exactly: the picture is scaled to cover, no more
        assert left == (rw - bw) // 2 and top == (rh - bh) // 2
        assert abs(rw / rh - sw / sh) <= max(1 / rh, 1 / rw) * (sw / sh + 1)  # aspect kept up to rounding
