"""Aspect-ratio buckets (pure math).

For a training resolution ``res`` the buckets are every size ``(width, height)`` with both sides multiples of 16
(the VAE's 8x spatial compression times the transformer's 2x2 patches), area at most ``res**2``, aspect ratio
within ``1/max_aspect .. max_aspect``, and no room left to grow either side by one step. An item goes to the bucket
whose aspect ratio is closest to its own (on a log scale, so 2:1 and 1:2 are equally far from 1:1) and is then
resized to cover the bucket and centre-cropped.
"""

from __future__ import annotations

import math
from fractions import Fraction

#: Bucket sides are multiples of this many pixels.
BUCKET_STEP = 16
#: Widest (and, inverted, tallest) bucket aspect ratio.
MAX_ASPECT = 4.0


def bucket_sizes(resolution: int, step: int = BUCKET_STEP, max_aspect: float = MAX_ASPECT) -> list[tuple[int, int]]:
    """All ``(width, height)`` buckets for ``resolution``, sorted by width.

    Each bucket is maximal: neither side can grow by ``step`` without the area exceeding ``resolution**2``.
    """
    if resolution < step or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    area = resolution * resolution
    out = []
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        if (w + step) * h <= area:  # a wider bucket of the same height exists
            continue
        if max(w / h, h / w) <= max_aspect:
            out.append((w, h))
    return out


def assign_bucket(width: int | float, height: int | float, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the aspect ratio closest to ``width / height``.

    Ties go to the larger bucket, then to the one nearer to square (so portrait and landscape are treated alike).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"media size must be positive, got {width}x{height}")
    target = math.log(width / height)

    def rank(b: tuple[int, int]) -> tuple[float, int, float, int]:
        aspect = math.log(b[0] / b[1])
        return (abs(aspect - target), -b[0] * b[1], abs(aspect), -b[0])

    return min(buckets, key=rank)


def resize_crop_plan(
    src_w: int | Fraction, src_h: int | Fraction, bucket_w: int, bucket_h: int
) -> tuple[int, int, int, int]:
    """How to fit a ``src_w x src_h`` picture (display size) into a bucket.

    Returns ``(resized_w, resized_h, left, top)``: scale uniformly so the picture covers the bucket (the bucket's
    limiting side is matched exactly), then crop ``bucket_w x bucket_h`` at ``(left, top)``, centred.
    """
    sx = Fraction(bucket_w) / Fraction(src_w)
    sy = Fraction(bucket_h) / Fraction(src_h)
    if sx >= sy:
        rw, rh = bucket_w, max(bucket_h, round(Fraction(src_h) * sx))
    else:
        rw, rh = max(bucket_w, round(Fraction(src_w) * sy)), bucket_h
    return rw, rh, (rw - bucket_w) // 2, (rh - bucket_h) // 2
