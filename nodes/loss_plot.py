"""The loss curve of a run as a picture: both experts, raw values faint, smoothed values bold, validation losses as
dark dots (PIL, no matplotlib)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer_core.names import EXPERTS

COLOURS = {"high": (230, 120, 40), "low": (60, 140, 230)}
_FAINT = {k: tuple(int(c * 0.35 + 255 * 0.65) for c in v) for k, v in COLOURS.items()}
#: Validation losses: the expert's colour, darker, as dots joined by a thin line (a handful of points, no smoothing).
VALIDATION_COLOURS = {k: tuple(int(c * 0.55) for c in v) for k, v in COLOURS.items()}
_BG, _AXIS, _TEXT = (255, 255, 255), (90, 90, 90), (30, 30, 30)

Rows = list[tuple[int, str, float]]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): s_i = Σ w^(i-j)(1-w) v_j / (1 - w^(i+1))."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def loss_curve(losses: Rows, width: int = 768, height: int = 384, validation: Rows | None = None) -> Image.Image:
    """Plot ``losses`` ((step, expert, loss) rows) with one colour per expert and labelled axes; ``validation`` rows
    (the validation losses) as darker dots on the same axes."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=1)
    validation = [row for row in validation or [] if math.isfinite(row[2])]
    if not losses and not validation:
        draw.text((left + 10, top + 10), "no training steps yet", fill=_TEXT)
        return img
    rows = losses + validation
    steps = [s for s, _, _ in rows]
    vals = [v for _, _, v in rows]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    legend_x = left + 8
    for expert in EXPERTS:
        mine = [(s, v) for s, e, v in losses if e == expert]
        if mine:
            raw = [xy(s, v) for s, v in mine]
            sm = [xy(s, v) for (s, _), v in zip(mine, smooth([v for _, v in mine]))]
            _polyline(draw, raw, _FAINT[expert], 1)
            _polyline(draw, sm, COLOURS[expert], 2)
            legend_x = _legend(draw, legend_x, COLOURS[expert], f"{expert} noise: {mine[-1][1]:.4f} (last)")
        held = [(s, v) for s, e, v in validation if e == expert]
        if held:
            _polyline(draw, [xy(s, v) for s, v in held], VALIDATION_COLOURS[expert], 1, dots=True)
            legend_x = _legend(draw, legend_x, VALIDATION_COLOURS[expert], f"{expert} validation: {held[-1][1]:.4f}")
    draw.text((4, top - 6), f"{hi:.3g}", fill=_TEXT)
    draw.text((4, bottom - 6), f"{lo:.3g}", fill=_TEXT)
    draw.text((left, bottom + 8), f"step {s0}", fill=_TEXT)
    end = f"step {max(steps)}"
    draw.text((right - draw.textlength(end), bottom + 8), end, fill=_TEXT)
    return img


def _polyline(draw: ImageDraw.ImageDraw, pts: list[tuple[float, float]], fill: tuple[int, ...], width: int,
              dots: bool = False) -> None:  # fmt: skip
    """A line through ``pts`` (a dot where there is one point; a dot at every point with ``dots``)."""
    if len(pts) > 1:
        draw.line(pts, fill=fill, width=width)
    for x, y in pts if dots or len(pts) == 1 else []:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=fill)


def _legend(draw: ImageDraw.ImageDraw, x: int, colour: tuple[int, ...], label: str) -> int:
    """One legend entry at the top from ``x`` on; returns where the next one starts."""
    draw.line([(x, 12), (x + 16, 12)], fill=colour, width=2)
    draw.text((x + 20, 6), label, fill=_TEXT)
    return x + 24 + int(draw.textlength(label)) + 16


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float32 ``[1, H, W, 3]`` in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
