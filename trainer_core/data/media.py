"""Reading (and, for synthetic data and tests, writing) clips and images.

Videos are read with PyAV. Probing demuxes every packet once (no decoding beyond the first frame) to learn each
frame's presentation time, which frame sampling works on. Display orientation is honoured: a video's rotation
metadata (phones store portrait clips as rotated landscape) and non-square pixels, and a photo's EXIF orientation.
Still images are read with Pillow (a dependency of diffusers), which applies EXIF orientation.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal, Sequence

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DatasetError
from .buckets import resize_crop_plan

VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".gif"})
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".webp"})

_ENCODERS = {  # extension -> (codec, pixel format, options) used by write_video
    ".mp4": ("libx264", "yuv420p", {"crf": "12"}),
    ".mov": ("libx264", "yuv420p", {"crf": "12"}),
    ".mkv": ("libx264", "yuv420p", {"crf": "12"}),
    ".webm": ("libvpx-vp9", "yuv420p", {"crf": "10", "b": "0"}),
    ".gif": ("gif", "rgb8", {}),
}


@dataclass(frozen=True)
class MediaInfo:
    """What probing learned about one file.

    ``width``/``height`` are the display size (after rotation and pixel aspect ratio), which buckets use.
    ``frame_times`` are the frames' presentation times in seconds from the first frame (``(0,)`` for an image).
    ``rotation`` is the counter-clockwise quarter turns needed to show a decoded video frame upright.
    """

    path: Path
    kind: Literal["video", "image"]
    width: Fraction
    height: Fraction
    frame_times: tuple[Fraction, ...]
    rotation: int = 0

    @property
    def num_frames(self) -> int:
        """Number of frames (1 for an image)."""
        return len(self.frame_times)

    @property
    def fps(self) -> float | None:
        """Average frame rate, or ``None`` for an image or a one-frame clip."""
        if len(self.frame_times) < 2:
            return None
        return float((len(self.frame_times) - 1) / (self.frame_times[-1] - self.frame_times[0]))


def media_kind(path: Path) -> Literal["video", "image"] | None:
    """``"video"``/``"image"`` by file extension (case-insensitive), ``None`` for anything else."""
    ext = path.suffix.lower()
    return "video" if ext in VIDEO_EXTS else "image" if ext in IMAGE_EXTS else None


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(
        f"cannot read media file {path}: {exc} - re-encode it (e.g. to H.264 mp4 or PNG) or remove it from the folder"
    )


def probe(path: Path) -> MediaInfo:
    """Size, orientation and frame timestamps of a video or image; :class:`DatasetError` if it cannot be read."""
    kind = media_kind(path)
    if kind is None:
        raise DatasetError(f"{path}: not a supported media file ({', '.join(sorted(VIDEO_EXTS | IMAGE_EXTS))})")
    try:
        return _probe_image(path) if kind == "image" else _probe_video(path)
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _probe_image(path: Path) -> MediaInfo:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return MediaInfo(path, "image", Fraction(img.width), Fraction(img.height), (Fraction(0),))


def _probe_video(path: Path) -> MediaInfo:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise DatasetError(f"{path}: has no video stream - is it an audio file?")
        stream = container.streams.video[0]
        pts: list[int] = []
        packets = 0
        first = None
        for packet in container.demux(stream):
            if packet.size == 0:  # the end-of-stream flush packet
                continue
            packets += 1
            if packet.pts is not None:
                pts.append(packet.pts)
            if first is None:  # decode only until the first picture comes out, to check the file and read its size
                first = next(iter(stream.decode(packet)), None)
        if first is None:
            first = next(iter(stream.decode(None)), None)
        if first is None or packets == 0:
            raise DatasetError(f"{path}: the video stream holds no decodable frame - the file is damaged or empty")
        if len(pts) == packets and stream.time_base is not None:
            start = min(pts)
            times = tuple(Fraction(p - start) * stream.time_base for p in sorted(pts))
        else:  # no timestamps: fall back to the nominal frame rate
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise DatasetError(f"{path}: frames carry no timestamps and no frame rate - re-encode the file")
            times = tuple(Fraction(i) / Fraction(rate) for i in range(packets))
        sar = stream.sample_aspect_ratio or Fraction(1)
        turns = round((first.rotation or 0) / 90) % 4
    width, height = Fraction(first.width) * Fraction(sar), Fraction(first.height)
    if turns % 2:
        width, height = height, width
    return MediaInfo(path, "video", width, height, times, turns)


def read_frames(info: MediaInfo, indices: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """Decode the frames at ``indices`` (repeats allowed), each resized to cover ``size`` = (width, height) and
    centre-cropped to it. Returns uint8 ``[len(indices), height, width, 3]`` RGB."""
    bw, bh = size
    rw, rh, left, top = resize_crop_plan(info.width, info.height, bw, bh)
    try:
        if info.kind == "image":
            with Image.open(info.path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                arr = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC))
            crop = arr[top : top + bh, left : left + bw]
            return np.stack([crop] * len(indices))
        frames = _decode_video(info, sorted(set(indices)), rw, rh)
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(info.path, exc) from None
    return np.stack([frames[i][top : top + bh, left : left + bw] for i in indices])


def _decode_video(info: MediaInfo, wanted: list[int], rw: int, rh: int) -> dict[int, np.ndarray]:
    # Decoded (stored) frames are rotated afterwards, so scale them to the pre-rotation size.
    sw, sh = (rh, rw) if info.rotation % 2 else (rw, rh)
    out: dict[int, np.ndarray] = {}
    todo = set(wanted)
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for ordinal, frame in enumerate(container.decode(stream)):
            if ordinal in todo:
                rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()
                out[ordinal] = np.rot90(rgb, k=info.rotation) if info.rotation else rgb
                todo.discard(ordinal)
                if not todo:
                    break
    if todo:
        raise DatasetError(
            f"{info.path}: frame {min(todo)} could not be decoded although the file lists {info.num_frames} frames "
            "- the file is damaged; re-encode it or remove it"
        )
    return out


def write_video(path: str | Path, frames: np.ndarray, fps: int | Fraction) -> Path:
    """Write uint8 RGB frames ``[F, H, W, 3]`` as a video; the codec follows the extension (.mp4/.mov/.mkv: H.264,
    .webm: VP9, .gif: GIF). H.264 and VP9 need even width and height."""
    path = Path(path)
    codec = _ENCODERS.get(path.suffix.lower())
    if codec is None:
        raise ValueError(f"cannot write {path}: use one of {', '.join(_ENCODERS)}")
    name, pix_fmt, options = codec
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got shape {frames.shape}")
    height, width = frames.shape[1:3]
    if pix_fmt == "yuv420p" and (width % 2 or height % 2):
        raise ValueError(f"{name} needs even width and height, got {width}x{height}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(name, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        for arr in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")))
        container.mux(stream.encode(None))
    return path
