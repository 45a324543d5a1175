"""The loss curve of a run as a picture: both experts, raw values faint, smoothed values bold (PIL, no matplotlib)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer_core.names import EXPERTS

COLOURS = {"high": (230, 120, 40), "low": (60, 140, 230)}
_FAINT = {k: tuple(int(c * 0.35 + 255 * 0.65) for c in v) for k, v in COLOURS.items()}
_BG, _AXIS, _TEXT = (255, 255, 255), (90, 90, 90), (30, 30, 30)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing): s_i = Σ w^(i-j)(1-w) v_j / (1 - w^(i+1))."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight ** (i + 1)))
    return out


def loss_curve(losses: list[tuple[int, str, float]], width: int = 768, height: int = 384) -> Image.Image:
    """Plot ``losses`` ((step, expert, loss) rows) with one colour per expert and labelled axes."""
    img = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 12, 24, height - 28
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_AXIS, width=1)
    if not losses:
        draw.text((left + 10, top + 10), "no training steps yet", fill=_TEXT)
        return img
    steps = [s for s, _, _ in losses]
    vals = [v for _, _, v in losses]
    s0, s1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    legend_x = left + 8
    for expert in EXPERTS:
        rows = [(s, v) for s, e, v in losses if e == expert]
        if not rows:
            continue
        raw = [xy(s, v) for s, v in rows]
        sm = [xy(s, v) for (s, _), v in zip(rows, smooth([v for _, v in rows]))]
        for pts, fill, w in ((raw, _FAINT[expert], 1), (sm, COLOURS[expert], 2)):
            if len(pts) > 1:
                draw.line(pts, fill=fill, width=w)
            else:
                x, y = pts[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=fill)
        label = f"{expert} noise: {rows[-1][1]:.4f} (last)"
        draw.line([(legend_x, 12), (legend_x + 16, 12)], fill=COLOURS[expert], width=2)
        draw.text((legend_x + 20, 6), label, fill=_TEXT)
        legend_x += 24 + int(draw.textlength(label)) + 16
    draw.text((4, top - 6), f"{hi:.3g}", fill=_TEXT)
    draw.text((4, bottom - 6), f"{lo:.3g}", fill=_TEXT)
    draw.text((left, bottom + 8), f"step {s0}", fill=_TEXT)
    end = f"step {max(steps)}"
    draw.text((right - draw.textlength(end), bottom + 8), end, fill=_TEXT)
    return img


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: float32 ``[1, H, W, 3]`` in 0..1."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]
