"""Reading (and, for synthetic data and tests, writing) clips and images.

Videos are read with PyAV. Probing demuxes every packet once (no decoding beyond the first frame) to learn each
frame's presentation time, which frame sampling works on, and which frames are keyframes. Display orientation is
honoured: a video's rotation metadata (phones store portrait clips as rotated landscape) and non-square pixels, and a
photo's EXIF orientation. Still images are read with Pillow (a dependency of diffusers), which applies EXIF
orientation.

Decoding seeks: frame ``i`` is the one with the ``i``-th smallest timestamp, so :func:`read_frames` jumps to the
keyframe before the first wanted frame (and again where that skips at least :data:`MIN_SEEK_SKIP` frames) and
decodes forward from there, matching decoded frames to indices by timestamp. Decoding from a keyframe gives the same
pictures as decoding from the start; when a container cannot seek precisely (or its timestamps are not unique) the
frames are decoded from the start instead. GIFs are always decoded from the start (their frames may be partial
updates of the previous one).
"""

from __future__ import annotations

from bisect import bisect_right
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
#: Video and image formats that are recognised but not accepted: reported as bad files with a conversion hint.
UNSUPPORTED_MEDIA_EXTS = frozenset(
    {".avi", ".wmv", ".flv", ".m4v", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts", ".3gp", ".ogv", ".vob"}
    | {".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl"}
)
_SEEKABLE_EXTS = frozenset({".mp4", ".mov", ".mkv", ".webm"})

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
    ``pts`` are the frames' raw timestamps in the stream's time base, sorted (empty when the file has none or they
    repeat, which disables seeking); ``keyframes`` the indices of the frames stored as keyframes.
    """

    path: Path
    kind: Literal["video", "image"]
    width: Fraction
    height: Fraction
    frame_times: tuple[Fraction, ...]
    rotation: int = 0
    pts: tuple[int, ...] = ()
    keyframes: tuple[int, ...] = ()

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


def unsupported_error(path: Path) -> DatasetError:
    """The error for a file whose extension is not a supported video or image format."""
    return DatasetError(
        f"{path}: unsupported file type '{path.suffix}' - convert videos to one of "
        f"{', '.join(sorted(VIDEO_EXTS))} (e.g. ffmpeg -i in{path.suffix} out.mp4) and images to one of "
        f"{', '.join(sorted(IMAGE_EXTS))}, or remove the file"
    )


def _zero_length(path: Path) -> DatasetError:
    return DatasetError(
        f"{path}: zero-length clip: the file holds no video frames - re-export the clip or remove the file"
    )


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    return DatasetError(
        f"cannot read media file {path}: {exc} - re-encode it (e.g. to H.264 mp4 or PNG) or remove it from the folder"
    )


def probe(path: Path) -> MediaInfo:
    """Size, orientation and frame timestamps of a video or image; :class:`DatasetError` if it cannot be read."""
    kind = media_kind(path)
    if kind is None:
        raise unsupported_error(path)
    try:
        if path.stat().st_size == 0:
            raise DatasetError(
                f"{path}: the file is empty (0 bytes) - the copy or export did not finish; replace it or remove it"
            )
        return _probe_image(path) if kind == "image" else _probe_video(path)
    except DatasetError:
        raise
    except av.error.EOFError:
        raise _zero_length(path) from None
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _probe_image(path: Path) -> MediaInfo:
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return MediaInfo(path, "image", Fraction(img.width), Fraction(img.height), (Fraction(0),))


def _probe_video(path: Path) -> MediaInfo:
    with av.open(str(path)) as container:
        if not container.streams:
            raise _zero_length(path)
        if not container.streams.video:
            raise DatasetError(f"{path}: has no video stream - is it an audio file? Remove it from the folder")
        stream = container.streams.video[0]
        pts: list[int] = []
        key_pts: list[int] = []
        packets = 0
        first = None
        for packet in container.demux(stream):
            if packet.size == 0:  # the end-of-stream flush packet
                continue
            packets += 1
            if packet.pts is not None:
                pts.append(packet.pts)
                if packet.is_keyframe:
                    key_pts.append(packet.pts)
            if first is None:  # decode only until the first picture comes out, to check the file and read its size
                first = next(iter(stream.decode(packet)), None)
        if packets == 0:
            raise _zero_length(path)
        if first is None:
            first = next(iter(stream.decode(None)), None)
        if first is None:
            raise DatasetError(f"{path}: the video stream holds no decodable frame - the file is damaged; re-encode it")
        timed = len(pts) == packets and stream.time_base is not None
        if timed:
            pts.sort()
            times = tuple(Fraction(p - pts[0]) * stream.time_base for p in pts)
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
    seekable = timed and len(set(pts)) == len(pts) and path.suffix.lower() in _SEEKABLE_EXTS
    if not seekable:
        return MediaInfo(path, "video", width, height, times, turns)
    index = {p: i for i, p in enumerate(pts)}
    keyframes = tuple(sorted(index[p] for p in set(key_pts)))
    return MediaInfo(path, "video", width, height, times, turns, tuple(pts), keyframes)


def read_frames(info: MediaInfo, indices: Sequence[int], size: tuple[int, int], seek: bool = True) -> np.ndarray:
    """Decode the frames at ``indices`` (repeats allowed), each resized to cover ``size`` = (width, height) and
    centre-cropped to it. Returns uint8 ``[len(indices), height, width, 3]`` RGB.

    ``seek`` jumps to keyframes near the wanted frames (see the module docstring); ``False`` decodes from the start
    (same frames, slower on long clips).
    """
    bw, bh = size
    rw, rh, left, top = resize_crop_plan(info.width, info.height, bw, bh)
    try:
        if info.kind == "image":
            with Image.open(info.path) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                arr = np.asarray(img.resize((rw, rh), Image.Resampling.BICUBIC))
            crop = arr[top : top + bh, left : left + bw]
            return np.stack([crop] * len(indices))
        wanted = sorted(set(indices))
        frames = _decode_seeking(info, wanted, rw, rh) if seek and info.pts else None
        if frames is None:
            frames = _decode_from_start(info, wanted, rw, rh)
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(info.path, exc) from None
    return np.stack([frames[i][top : top + bh, left : left + bw] for i in indices])


def _to_rgb(frame: av.VideoFrame, info: MediaInfo, width: int, height: int) -> np.ndarray:
    """A decoded frame scaled so that, once turned upright, it is ``width x height``."""
    # Decoded (stored) frames are rotated afterwards, so scale them to the pre-rotation size.
    sw, sh = (height, width) if info.rotation % 2 else (width, height)
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    return np.rot90(rgb, k=info.rotation) if info.rotation else rgb


def _decode_from_start(info: MediaInfo, wanted: list[int], rw: int, rh: int) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    todo = set(wanted)
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for ordinal, frame in enumerate(container.decode(stream)):
            if ordinal in todo:
                out[ordinal] = _to_rgb(frame, info, rw, rh)
                todo.discard(ordinal)
                if not todo:
                    break
    if todo:
        raise DatasetError(
            f"{info.path}: frame {min(todo)} could not be decoded although the file lists {info.num_frames} frames "
            "- the file is damaged; re-encode it or remove it"
        )
    return out


#: Seek again only to skip at least this many frames: a seek restarts the decoder (and its frame-thread pipeline)
#: at a keyframe, which cost more than it saved for 33 frames spread over a 10 s clip with 1 s between keyframes.
MIN_SEEK_SKIP = 16


def seek_runs(wanted: Sequence[int], keyframes: Sequence[int], min_skip: int = MIN_SEEK_SKIP) -> list[list[int]]:
    """Split sorted frame indices into runs, each decoded forward after one seek to the keyframe before its first
    frame: a new run starts where a keyframe lies at least ``min_skip`` frames past the previous wanted frame, so
    seeking there skips decoding the frames in between."""
    runs: list[list[int]] = []
    for w in wanted:
        j = bisect_right(keyframes, w) - 1
        if not runs or (j >= 0 and keyframes[j] - runs[-1][-1] - 1 >= min_skip):
            runs.append([w])
        else:
            runs[-1].append(w)
    return runs


def _decode_seeking(info: MediaInfo, wanted: list[int], rw: int, rh: int) -> dict[int, np.ndarray] | None:
    """Frames by index, decoded run by run after seeks; ``None`` when a seek did not reach a wanted frame (the
    container's index is imprecise), so the caller decodes from the start."""
    index = {p: i for i, p in enumerate(info.pts)}
    out: dict[int, np.ndarray] = {}
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for run in seek_runs(wanted, info.keyframes):
            container.seek(info.pts[run[0]], stream=stream)  # lands on the keyframe at or before that frame
            todo, last = set(run), run[-1]
            for frame in container.decode(stream):
                if frame.pts is None:
                    return None
                i = index.get(frame.pts)
                if i is None:  # not a listed frame (e.g. a leading picture of an open GOP)
                    continue
                if i in todo:
                    out[i] = _to_rgb(frame, info, rw, rh)
                    todo.discard(i)
                if not todo or i >= last:
                    break
            if todo:
                return None
    return out


#: A row or column of pixels is black when at least this share of its pixels has every channel <= _BLACK_LEVEL.
_BLACK_SHARE = 0.98
_BLACK_LEVEL = 20  # video black (16 of 255 in limited range) decodes to ~0; a dark grey scene stays above
_THUMB_SIDE = 160  # longest side of the frames black-bar detection looks at


def _leading(mask: np.ndarray) -> int:
    return len(mask) if mask.all() else int(np.argmin(mask))


def black_bars(info: MediaInfo, looks: int = 3) -> tuple[float, float, float, float]:
    """Shares of the upright picture covered by black bars at the top, bottom, left and right.

    Looks at the image, or at up to ``looks`` keyframes spread over a clip (decoding only those, so it is cheap);
    a bar counts only where it is black in every looked-at frame that is not black as a whole (a fade says nothing
    about bars). Raises :class:`DatasetError` if the file cannot be decoded.
    """
    try:
        thumbs = _thumbnails(info, looks)
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(info.path, exc) from None
    bars = (1.0, 1.0, 1.0, 1.0)
    informative = False
    for arr in thumbs:
        dark = arr.max(axis=2) <= _BLACK_LEVEL
        rows, cols = dark.mean(axis=1) >= _BLACK_SHARE, dark.mean(axis=0) >= _BLACK_SHARE
        if rows.all() or cols.all():
            continue
        h, w = dark.shape
        here = (_leading(rows) / h, _leading(rows[::-1]) / h, _leading(cols) / w, _leading(cols[::-1]) / w)
        bars = tuple(min(a, b) for a, b in zip(bars, here))
        informative = True
    return bars if informative else (0.0, 0.0, 0.0, 0.0)


def _thumbnails(info: MediaInfo, looks: int) -> list[np.ndarray]:
    scale = _THUMB_SIDE / max(info.width, info.height)
    tw, th = max(1, round(info.width * scale)), max(1, round(info.height * scale))
    if info.kind == "image":
        with Image.open(info.path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            return [np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR))]
    n = info.num_frames
    spots = sorted({(n - 1) * (k + 1) // (looks + 1) for k in range(looks)})
    out = []
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        if info.pts:
            stream.codec_context.skip_frame = "NONKEY"  # decode keyframes only
            seen = set()
            for spot in spots:
                container.seek(info.pts[spot], stream=stream)
                frame = next(iter(container.decode(stream)), None)
                if frame is not None and frame.pts not in seen:
                    seen.add(frame.pts)
                    out.append(_to_rgb(frame, info, tw, th))
        else:  # no seeking (GIFs): decode up to the last spot
            wanted = set(spots)
            for ordinal, frame in enumerate(container.decode(stream)):
                if ordinal in wanted:
                    out.append(_to_rgb(frame, info, tw, th))
                if ordinal >= spots[-1]:
                    break
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
