"""A tiny learnable video dataset: coloured squares moving in the direction their caption names.

Used by the demo and the tests; no downloads needed. Each clip is an H.264 mp4 at 16 fps (the model's rate) plus a
caption file such as ``"a red square moving right"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .media import write_video

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 230),
    "yellow": (230, 210, 40),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
BACKGROUND = (30, 30, 30)
FPS = 16


def square_clip(colour: str, direction: str, num_frames: int, size: tuple[int, int], offset: float) -> np.ndarray:
    """Frames ``[F, H, W, 3]`` of a square crossing the frame in ``direction``.

    The square travels from one edge to the opposite one over the clip; ``offset`` in [0, 1] places it across the
    direction of motion.
    """
    width, height = size
    side = max(2, min(width, height) // 4)
    dx, dy = DIRECTIONS[direction]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[:] = BACKGROUND
    for f in range(num_frames):
        progress = f / max(1, num_frames - 1)
        along_x = progress if dx > 0 else 1 - progress
        along_y = progress if dy > 0 else 1 - progress
        x = round((along_x if dx else offset) * (width - side))
        y = round((along_y if dy else offset) * (height - side))
        frames[f, y : y + side, x : x + side] = COLOURS[colour]
    return frames


def make_synthetic_dataset(folder: str | Path, n_clips: int, num_frames: int, size: tuple[int, int], seed: int) -> Path:
    """Write ``n_clips`` clips ``clipNNN.mp4`` with captions ``clipNNN.txt`` into ``folder``; returns the folder.

    ``size`` is (width, height), both even. Colour, direction and placement are drawn from ``seed``.
    """
    if n_clips < 1 or num_frames < 1:
        raise ValueError(f"need n_clips >= 1 and num_frames >= 1, got {n_clips}, {num_frames}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours, directions = list(COLOURS), list(DIRECTIONS)
    for i in range(n_clips):
        colour = colours[rng.integers(len(colours))]
        direction = directions[rng.integers(len(directions))]
        frames = square_clip(colour, direction, num_frames, size, float(rng.uniform(0.1, 0.9)))
        write_video(folder / f"clip{i:03d}.mp4", frames, FPS)
        (folder / f"clip{i:03d}.txt").write_text(f"a {colour} square moving {direction}\n", encoding="utf-8")
    return folder
