"""Write rendered frames as mp4 (H.264) or webm (VP9) through PyAV, with text metadata in the container."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fileio import FULL_DISK_RUN, atomic_write

#: format -> (encoder, encoder options). CRF keeps quality constant; VP9 needs bitrate 0 for pure CRF mode.
_CODECS: dict[str, tuple[str, dict[str, str]]] = {
    "mp4": ("libx264", {"crf": "18", "preset": "medium"}),
    "webm": ("libvpx-vp9", {"crf": "30", "b": "0", "row-mt": "1"}),
}
#: mp4 keeps arbitrary keys only with use_metadata_tags; faststart puts the index first for streaming players.
_MUXER_OPTIONS = {"mp4": {"movflags": "use_metadata_tags+faststart"}, "webm": {}}
# Matroska stores tag names upper-case: lower-case keys are what round-trips through both containers.
_META_KEY = re.compile(r"[a-z][a-z0-9_]*")


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = list(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ConfigError(f"frames must be a tensor [F, H, W, 3] (ComfyUI IMAGE layout), got {shape}")
    if frames.shape[0] < 1 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ConfigError(f"frames {list(frames.shape)}: need at least one frame and an even height and width")
    frames = frames.detach().float().cpu()
    if not torch.isfinite(frames).all():
        raise ConfigError("frames contain NaN/Inf values - the render diverged; nothing was written")
    lo, hi = frames.aminmax()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ConfigError(f"frames must lie in 0..1, got {lo.item():.3f}..{hi.item():.3f} (map [-1, 1] with x*0.5+0.5)")
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def write_video(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: int,
    fmt: str,
    metadata: dict[str, str] | None = None,
    full_disk: str = FULL_DISK_RUN,
) -> Path:
    """Encode ``frames`` (``[F, H, W, 3]`` float in 0..1) to ``path`` atomically and return the path.

    ``fmt`` is ``"mp4"`` (libx264, yuv420p) or ``"webm"`` (libvpx-vp9, yuv420p) and must match the file suffix.
    ``metadata`` (lower-case keys such as ``prompt``, ``seed``, ``settings``; string values) goes into the
    container; read it back with :func:`read_video_metadata`. A file system failure (disk full, read-only folder)
    raises :class:`~trainer_core.fileio.ArtifactWriteError` naming the file (``full_disk``: what to do when the disk
    is full) and leaves no partial file.
    """
    path = Path(path)
    if fmt not in _CODECS:
        raise ConfigError(f"sample.format must be one of {sorted(_CODECS)}, got {fmt!r}")
    if path.suffix.lower() != f".{fmt}":
        raise ConfigError(f"video file {path} does not end in .{fmt} - name it *.{fmt} or change sample.format")
    if not isinstance(fps, int) or fps < 1:
        raise ConfigError(f"sample.fps must be a positive whole number, got {fps!r}")
    metadata = metadata or {}
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and _META_KEY.fullmatch(k) and isinstance(v, str))]
    if bad:
        raise ConfigError(f"video metadata keys must be lower-case names ([a-z0-9_]) with string values; bad: {bad}")
    pixels = _to_uint8(frames).numpy()
    codec, options = _CODECS[fmt]
    import av  # lazily: rendering on a GPU box without PyAV still works up to the file write

    def encode(tmp: Path) -> None:
        # PyAV's I/O errors (av.error.OSError, errno 28 on a full disk) are OSErrors: atomic_write words them
        with av.open(str(tmp), mode="w", format=fmt, options=_MUXER_OPTIONS[fmt]) as container:
            container.metadata.update(metadata)
            stream = container.add_stream(codec, rate=fps, options=options)
            stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
            for frame in pixels:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())

    return atomic_write(path, encode, full_disk)


def read_video_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The container metadata of a video, keys lower-cased (Matroska/webm stores them upper-case)."""
    import av

    with av.open(str(path)) as container:
        return {k.lower(): v for k, v in container.metadata.items()}
