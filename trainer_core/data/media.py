"""Reading (and, for synthetic data and tests, writing) clips and images.

Videos are read with PyAV. Probing demuxes every packet once (no decoding beyond the first frame) to learn each
frame's presentation time, which frame sampling works on, and which frames are keyframes. Display orientation is
honoured: a video's display matrix (phones store portrait clips as rotated landscape; editors store mirroring there
too), applied as ffmpeg's autorotate applies it (:func:`display_orientation`), and non-square pixels, and a photo's
EXIF orientation. Still images are read with Pillow (a dependency of diffusers), which applies EXIF orientation.

Videos are read as ffmpeg reads them: the video stream ffmpeg would pick (:func:`pick_stream`); only the frames it
shows (packets an MP4 edit list hides, as lossless cuts leave them, are decoded for reference but not counted: the
decoder drops their pictures); a WebM alpha channel decoded with libvpx (FFmpeg's own VP8/VP9 decoders drop it) and
composited onto black like a transparent image. Animated WebP and PNG (APNG) files are clips, decoded by Pillow with
their frames' durations. HDR (PQ/HLG) and interlaced sources are read as they are (no tone mapping, no
deinterlacing); the probe notes them.

Still images go through one set of rules (:func:`read_image`, and the probe): every pixel mode a PNG, JPEG or WebP
opens as becomes 8-bit RGB, 16-bit grey scaled rather than clipped, transparent pixels composited onto black (the
scan lists those files); an image above :data:`MAX_IMAGE_PIXELS`, or in a mode that cannot be decoded faithfully, is
refused with a :class:`DatasetError` naming it, the size check reading only the file's header.

Decoding seeks: frame ``i`` is the one with the ``i``-th smallest timestamp, so :func:`read_frames` jumps to the
keyframe before the first wanted frame (and again where that skips at least :data:`MIN_SEEK_SKIP` frames) and
decodes forward from there, matching decoded frames to indices by timestamp. Decoding from a keyframe gives the same
pictures as decoding from the start; when a container cannot seek precisely (or its timestamps are not unique) the
frames are decoded from the start instead. GIFs are always decoded from the start (their frames may be partial
updates of the previous one).
"""

from __future__ import annotations

import math
import re
import struct
import warnings
from bisect import bisect_right
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Literal, Sequence

import av
import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

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


#: How a stored video frame is shown: (transpose, then flip upside down, then mirror left-right).
Orientation = tuple[bool, bool, bool]


@dataclass(frozen=True)
class MediaInfo:
    """What probing learned about one file.

    ``width``/``height`` are the display size (after rotation and pixel aspect ratio), which buckets use.
    ``frame_times`` are the frames' presentation times in seconds from the first frame (``(0,)`` for an image).
    ``orient`` is how a decoded video frame is shown upright (see :data:`Orientation`). ``stream`` is the index of
    the video stream read. ``pts`` are the shown frames' raw timestamps in the stream's time base, sorted (empty
    when the file has none or they repeat, which disables seeking); ``keyframes`` the indices of the frames stored
    as keyframes. ``transparent``: an image with transparent pixels, or a video with an alpha channel, which decode
    composited onto black. ``notes``: report lines about how the file is read (which stream, HDR, interlacing).
    """

    path: Path
    kind: Literal["video", "image"]
    width: Fraction
    height: Fraction
    frame_times: tuple[Fraction, ...]
    orient: Orientation = (False, False, False)
    stream: int = 0
    pts: tuple[int, ...] = ()
    keyframes: tuple[int, ...] = ()
    transparent: bool = False
    notes: tuple[str, ...] = ()

    @property
    def animated_image(self) -> bool:
        """An animated WebP or PNG: a clip whose frames Pillow decodes."""
        return self.kind == "video" and self.path.suffix.lower() in IMAGE_EXTS

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
        f"{shown(path)}: unsupported file type '{path.suffix}' - convert videos to one of "
        f"{', '.join(sorted(VIDEO_EXTS))} (e.g. ffmpeg -i in{path.suffix} out.mp4) and images to one of "
        f"{', '.join(sorted(IMAGE_EXTS))}, or remove the file"
    )


def _zero_length(path: Path) -> DatasetError:
    return DatasetError(
        f"{shown(path)}: zero-length clip: the file holds no video frames - re-export the clip or remove the file"
    )


def shown(path: Path | str) -> str:
    """A file name for a one-line message: as is, or quoted (``repr``) when it holds a newline or other control
    character that would split or garble the line."""
    text = str(path)
    return repr(text) if any(not c.isprintable() for c in text) else text


def _unreadable(path: Path, exc: Exception) -> DatasetError:
    if isinstance(exc, PermissionError):  # av.error.PermissionError is one too
        return DatasetError(
            f"cannot read media file {shown(path)}: permission denied - check its permissions (the training user "
            "must be able to read it)"
        )
    return DatasetError(
        f"cannot read media file {shown(path)}: {exc} - re-encode it (e.g. to H.264 mp4 or PNG) or remove it from "
        "the folder"
    )


def probe(path: Path) -> MediaInfo:
    """Size, orientation and frame timestamps of a video or image; :class:`DatasetError` if it cannot be read."""
    kind = media_kind(path)
    if kind is None:
        raise unsupported_error(path)
    try:
        if path.stat().st_size == 0:
            raise DatasetError(
                f"{shown(path)}: the file is empty (0 bytes) - the copy or export did not finish; replace it or "
                "remove it"
            )
        return _probe_image(path) if kind == "image" else _probe_video(path)
    except DatasetError:
        raise
    except av.error.EOFError:
        raise _zero_length(path) from None
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def _probe_image(path: Path) -> MediaInfo:
    with _open_image(path) as img:
        # The EXIF tag exif_transpose turns decoded pixels by; 5-8 are quarter turns, which swap width and height.
        turned = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        # Only an image that can hold transparency is decoded here, to tell whether any pixel is transparent.
        transparent = _has_alpha(img) and _pixels(img, path)[1]
        width, height = (img.height, img.width) if turned else (img.width, img.height)
        # An animated WebP/PNG is a clip: its first frame alone would train a still of a moving subject. (A camera
        # JPEG with a preview picture, MPO, is "animated" to Pillow too, but its first picture is the photo.)
        animated = img.format in ("WEBP", "PNG") and getattr(img, "is_animated", False)
        frames = img.n_frames if animated else 1
        times = _animation_times(img, frames, path) if frames > 1 else (Fraction(0),)
    kind: Literal["video", "image"] = "video" if frames > 1 else "image"
    return MediaInfo(path, kind, Fraction(width), Fraction(height), times, transparent=transparent)


def _animation_times(img: Image.Image, frames: int, path: Path) -> tuple[Fraction, ...]:
    """Presentation times (s) of an animated image's frames: each frame is shown for its ``duration`` (ms)."""
    times = [Fraction(0)]
    for i in range(frames - 1):
        img.seek(i)
        img.load()  # WebP sets a frame's duration as it decodes it
        ms = img.info.get("duration")
        if not ms or ms <= 0:  # no or zero delay: players disagree on its speed, so there is no real speed to keep
            raise DatasetError(
                f"{shown(path)}: animation frame {i} has no display time ({ms!r} ms), so its speed is unknown - "
                "re-export it with a frame rate (e.g. as mp4) or remove it"
            )
        times.append(times[-1] + Fraction(ms) / 1000)
    img.seek(0)
    return tuple(times)


#: Still images above this many pixels are refused from their header, before any pixel is decoded. Every common
#: camera sensor (100 MP medium format included) is below it, a training bucket needs a tiny fraction of it, and one
#: decoded RGB copy already takes 450 MB in every loader worker. Pillow's own refusal (above twice
#: ``PIL.Image.MAX_IMAGE_PIXELS``: 179 MP by default) comes earlier, at open, and is reported the same way.
MAX_IMAGE_PIXELS = 150_000_000

# Modes Pillow's convert("RGB") turns into RGB faithfully (palette, 1-bit, CMYK and YCbCr by their standard formulas).
_RGB_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"})
# Modes with an alpha band; the modes above can carry transparency too, as a transparent colour or palette alpha.
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
# Grey modes deeper than 8 bits, by the value that is white. convert("RGB") would clip them at 255, so a 16-bit grey
# PNG (I;16 in recent Pillow, I in older releases) would train near-white. "I" (32-bit) is taken to hold 16-bit
# samples, as Pillow opens them; float images to be 0-1, the convention of float image files and numpy/torch.
_DEEP_GREY: dict[str, float] = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


def _too_large(path: Path, pixels: int | None, limit: int) -> DatasetError:
    size = f"{pixels / 1e6:.3g} megapixels" if pixels else "its size"
    return DatasetError(
        f"{shown(path)}: {size}, above the limit of {limit / 1e6:.3g} megapixels - downscale it (training buckets are "
        "far smaller) or remove it"
    )


@contextmanager
def _open_image(path: Path) -> Iterator[Image.Image]:
    """Open a still image lazily (header only), refusing one too large (:data:`MAX_IMAGE_PIXELS`) or in a mode that
    cannot be decoded faithfully before any pixel is decoded."""
    with warnings.catch_warnings():
        # Pillow warns of (and above twice its limit refuses) large images without naming them; report them here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path)
        except Image.DecompressionBombError as exc:
            found = re.search(r"\((\d+) pixels\)", str(exc))
            raise _too_large(path, int(found[1]) if found else None, 2 * (Image.MAX_IMAGE_PIXELS or 0)) from None
    with img:
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise _too_large(path, img.width * img.height, MAX_IMAGE_PIXELS)
        _check_mode(img, path)
        yield img


def _check_mode(img: Image.Image, path: Path) -> None:
    """Refuse, from the header, an image whose pixels the rules of :func:`_pixels` cannot turn into RGB faithfully."""
    if img.mode not in _RGB_MODES | _ALPHA_MODES | _DEEP_GREY.keys():
        raise DatasetError(
            f"{shown(path)}: pixel mode {img.mode} is not supported - re-save it as 8-bit RGB or RGBA (PNG, JPEG or "
            "WebP)"
        )
    # Pillow reads 16-bit RGB PNGs as 8-bit but keeps a transparent colour (tRNS) in 16 bits, then masks wrong pixels.
    if img.mode == "RGB" and "transparency" in img.info and any(";16" in str(tile[3]) for tile in img.tile):
        raise DatasetError(
            f"{shown(path)}: 16-bit RGB with a transparent colour (tRNS) cannot be decoded faithfully - re-save it "
            "as 8-bit or as RGBA"
        )


def _has_alpha(img: Image.Image) -> bool:
    """Whether an image can hold transparent pixels: an alpha band, a transparent colour or a palette with alpha."""
    palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return img.mode in _ALPHA_MODES or img.info.get("transparency") is not None or palette_alpha


def _deep_grey(img: Image.Image, path: Path) -> np.ndarray:
    """uint8 ``[H, W, 3]`` grey of an image deeper than 8 bits, scaled to 0-255 (see :data:`_DEEP_GREY`); ``[H, W, 4]``
    with its alpha when it has a transparent value."""
    white = _DEEP_GREY[img.mode]
    values = np.asarray(img)
    if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= white):
        raise DatasetError(
            f"{shown(path)}: {img.mode} pixel values {values.min()}-{values.max()} lie outside 0-{white:g}, so their "
            "brightness scale is unknown - re-save it as 8- or 16-bit"
        )
    grey = np.rint(values * (255 / white)).astype(np.uint8)
    key = img.info.get("transparency")
    alpha = [] if key is None else [np.where(values == key, 0, 255).astype(np.uint8)]
    return np.stack([grey] * 3 + alpha, axis=-1)


def _onto_black(rgba: np.ndarray) -> tuple[np.ndarray, bool]:
    """RGB of uint8 ``[H, W, 4]`` pixels composited onto black, and whether any pixel was transparent.

    Black, i.e. colour premultiplied by alpha: the colour stored under a transparent pixel is arbitrary (editors leave
    black, white or stale colours there), so dropping alpha as is (Pillow's convert("RGB"), what musubi-tuner and
    ai-toolkit do with training images) trains on invisible colours. Black is what those trainers give for the usual
    export (transparent pixels stored as 0) and ai-toolkit's default fill for transparent control images; the scan
    lists these files so that a user who wants another background flattens them first.
    """
    alpha = rgba[..., 3:].astype(np.uint16)
    rgb = (rgba[..., :3] * alpha + 127) // 255  # rounded rgb * alpha / 255
    return rgb.astype(np.uint8), bool((alpha < 255).any())


def _pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, bool]:
    """An opened image turned upright (EXIF) as uint8 RGB ``[H, W, 3]``, and whether it had transparent pixels."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _DEEP_GREY:
        pixels = _deep_grey(img, path)
    else:
        pixels = np.asarray(img.convert("RGBA" if _has_alpha(img) else "RGB"))
    return _onto_black(pixels) if pixels.shape[-1] == 4 else (pixels, False)


def _decode_animated(info: MediaInfo, wanted: list[int], rw: int, rh: int) -> dict[int, np.ndarray]:
    """Frames of an animated WebP/PNG by index, each composed by Pillow (disposal, blending) and resized."""
    out = {}
    with _open_image(info.path) as img:
        for i in wanted:
            img.seek(i)
            rgb, _ = _pixels(img, info.path)
            out[i] = np.asarray(Image.fromarray(rgb).resize((rw, rh), Image.Resampling.BICUBIC))
    return out


def read_image(path: Path, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """The still image at ``path``, upright, as uint8 RGB ``[height, width, 3]`` resized to ``size`` = (width,
    height) (see the module docstring for the rules); :class:`DatasetError` for an image they refuse."""
    with _open_image(path) as img:
        rgb, _ = _pixels(img, path)
    return np.asarray(Image.fromarray(rgb).resize(size, resample))


#: FFmpeg's transfer characteristics of HDR video: AVCOL_TRC_SMPTE2084 (PQ) and AVCOL_TRC_ARIB_STD_B67 (HLG).
_HDR_TRC = {16: "PQ (HDR10)", 18: "HLG"}


def pick_stream(streams: Sequence[av.video.stream.VideoStream]) -> av.video.stream.VideoStream | None:
    """The video stream ffmpeg's command line reads by default (``map_auto_video`` in fftools), ``None`` if none.

    Attached pictures (cover art, thumbnails) are skipped; of the rest the one with the most pixels wins, a stream
    marked default counting 5,000,000 pixels more, and the first such stream on a tie.
    """
    def score(s: av.video.stream.VideoStream) -> int:
        default = bool(s.disposition & av.stream.Disposition.default)
        return s.codec_context.width * s.codec_context.height + 5_000_000 * default

    movies = [s for s in streams if not s.disposition & av.stream.Disposition.attached_pic]
    return max(movies, key=score, default=None)


def display_orientation(matrix: Sequence[int] | None) -> Orientation:
    """How ffmpeg's autorotate (fftools ``ffmpeg_filter.c``, ``ffplay.c``) shows a frame stored under a display
    matrix (9 ints, FFmpeg's ``AV_PKT_DATA_DISPLAYMATRIX`` layout): rotation *and* mirroring.

    Raises ``ValueError`` for a rotation that is not a multiple of 90 degrees (ffmpeg would rotate the picture by it,
    filling the corners).
    """
    if matrix is None:
        return (False, False, False)
    m = matrix
    sx, sy = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if not sx or not sy:  # av_display_rotation_get gives NaN: ffmpeg applies nothing
        return (False, False, False)
    theta = round(math.degrees(math.atan2(m[1] / sy, m[0] / sx)))  # -round(av_display_rotation_get(m))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:  # transpose=cclock_flip (a plain transpose) or transpose=clock
        return (True, False, m[3] <= 0)
    if abs(theta - 180) < 1:  # hflip and/or vflip
        return (False, m[4] < 0, m[0] < 0)
    if abs(theta - 270) < 1:  # transpose=clock_flip or transpose=cclock
        return (True, True, m[3] < 0)
    if abs(theta) > 1:
        raise ValueError(f"the display matrix rotates the picture by {theta} degrees, not a multiple of 90")
    return (False, m[4] < 0, False)  # vflip


def _display_matrix(frame: av.VideoFrame) -> tuple[int, ...] | None:
    for data in frame.side_data:
        if data.type == av.sidedata.sidedata.Type.DISPLAYMATRIX:
            return struct.unpack("=9i", bytes(data))
    return None


def _demux(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> tuple[list[int], list[int], int, av.VideoFrame | None]:
    """Timestamps of the shown frames and of those that are keyframes, the number of shown frames, and the first
    decoded picture (decoding only until it comes out).

    A packet flagged discard (an MP4 edit list hides it: a lossless cut keeps the whole GOP its start falls in) is
    decoded, as later frames refer to it, but the decoder drops its picture: it is not a frame of the clip.
    """
    pts: list[int] = []
    key_pts: list[int] = []
    count = 0
    first = None
    for packet in container.demux(stream):
        if packet.size == 0:  # the end-of-stream flush packet
            continue
        if first is None:
            first = next(iter(stream.decode(packet)), None)
        if packet.is_discard:
            continue
        count += 1
        if packet.pts is not None:
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    return pts, key_pts, count, first


def _video_notes(
    path: Path, streams: Sequence[av.video.stream.VideoStream], stream: av.video.stream.VideoStream,
    first: av.VideoFrame,
) -> tuple[str, ...]:
    """Report lines on how a video is read: which of several streams, HDR and interlacing (read as stored)."""
    notes = []
    if len(streams) > 1:
        notes.append(
            f"{shown(path)}: {len(streams)} video streams; reading stream #{stream.index} ({first.width}x"
            f"{first.height}), the one ffmpeg picks (cover pictures skipped, then the largest)"
        )
    hdr = _HDR_TRC.get(first.color_trc)
    if hdr:
        notes.append(
            f"{shown(path)}: HDR video ({hdr}); it trains as stored, without tone mapping, so its colours differ "
            "from SDR footage - convert it to SDR BT.709 first (e.g. ffmpeg's zscale and tonemap filters) if the "
            "LoRA should learn normal colours"
        )
    if first.interlaced_frame:
        notes.append(
            f"{shown(path)}: interlaced video; its frames train as stored (two fields woven, no deinterlacing), "
            "so motion shows combing - deinterlace it first (e.g. ffmpeg -vf bwdif out.mp4)"
        )
    return tuple(notes)


def _probe_video(path: Path) -> MediaInfo:
    with av.open(str(path)) as container:
        if not container.streams:
            raise _zero_length(path)
        stream = pick_stream(container.streams.video)
        if stream is None:
            if container.streams.video:
                raise DatasetError(
                    f"{shown(path)}: its only video is an attached picture (cover art), not a clip - remove it"
                )
            raise DatasetError(f"{shown(path)}: has no video stream - is it an audio file? Remove it from the folder")
        pts, key_pts, count, first = _demux(container, stream)
        if count == 0:
            raise _zero_length(path)
        if first is None:
            first = next(iter(stream.decode(None)), None)
        if first is None:
            raise DatasetError(
                f"{shown(path)}: the video stream holds no decodable frame - the file is damaged; re-encode it"
            )
        timed = len(pts) == count and stream.time_base is not None
        if timed:
            pts.sort()
            times = tuple(Fraction(p - pts[0]) * stream.time_base for p in pts)
        else:  # no timestamps: fall back to the nominal frame rate
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise DatasetError(f"{shown(path)}: frames carry no timestamps and no frame rate - re-encode the file")
            times = tuple(Fraction(i) / Fraction(rate) for i in range(count))
        try:
            orient = display_orientation(_display_matrix(first))
        except ValueError as exc:
            raise DatasetError(f"{shown(path)}: {exc} - re-encode it upright (ffmpeg applies it)") from None
        sar = stream.sample_aspect_ratio or Fraction(1)
        notes = _video_notes(path, container.streams.video, stream, first)
        # WebM keeps a VP8/VP9 alpha channel beside the picture, flagged by the track's alpha_mode.
        alpha = stream.codec_context.name in ("vp8", "vp9") and stream.metadata.get("alpha_mode") == "1"
        common = {"orient": orient, "stream": stream.index, "transparent": alpha, "notes": notes}
    width, height = Fraction(first.width) * Fraction(sar), Fraction(first.height)
    if orient[0]:
        width, height = height, width
    if not (timed and len(set(pts)) == len(pts) and path.suffix.lower() in _SEEKABLE_EXTS):
        return MediaInfo(path, "video", width, height, times, **common)
    index = {p: i for i, p in enumerate(pts)}
    keyframes = tuple(sorted(index[p] for p in set(key_pts)))
    return MediaInfo(path, "video", width, height, times, pts=tuple(pts), keyframes=keyframes, **common)


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
            arr = read_image(info.path, (rw, rh), Image.Resampling.BICUBIC)
            crop = arr[top : top + bh, left : left + bw]
            return np.stack([crop] * len(indices))
        wanted = sorted(set(indices))
        if info.animated_image:
            frames = _decode_animated(info, wanted, rw, rh)
        else:
            frames = _decode_seeking(info, wanted, rw, rh) if seek and info.pts else None
            if frames is None:
                frames = _decode_from_start(info, wanted, rw, rh)
    except DatasetError:
        raise
    except (av.error.FFmpegError, OSError, UnidentifiedImageError, ValueError) as exc:
        raise _unreadable(info.path, exc) from None
    return np.stack([frames[i][top : top + bh, left : left + bw] for i in indices])


def _to_rgb(frame: av.VideoFrame, info: MediaInfo, width: int, height: int) -> np.ndarray:
    """A decoded frame scaled so that, once shown upright (``info.orient``), it is ``width x height``; a frame with
    alpha is composited onto black first, at full size, as images are."""
    transpose, flip_rows, flip_cols = info.orient
    # Decoded (stored) frames are turned afterwards, so scale them to the stored size.
    sw, sh = (height, width) if transpose else (width, height)
    if info.transparent:
        rgb, _ = _onto_black(frame.to_ndarray(format="rgba"))
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="BICUBIC").to_ndarray()
    if transpose:
        rgb = rgb.swapaxes(0, 1)
    if flip_rows:
        rgb = rgb[::-1]
    if flip_cols:
        rgb = rgb[:, ::-1]
    return np.ascontiguousarray(rgb)


def _open_video(info: MediaInfo) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
    """The file opened for decoding, and its video stream (the one the probe picked)."""
    container = av.open(str(info.path))
    stream = next(s for s in container.streams.video if s.index == info.stream)
    stream.thread_type = "AUTO"
    return container, stream


def _decoded(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, info: MediaInfo,
    keyframes_only: bool = False,
) -> Iterator[av.VideoFrame]:
    """Decoded frames of ``stream`` from the container's current position (frames an edit list hides are dropped
    by the decoder). A WebM alpha channel needs libvpx: FFmpeg's own VP8/VP9 decoders ignore it."""
    if info.transparent:
        ctx = av.CodecContext.create("libvpx-vp9" if stream.codec_context.name == "vp9" else "libvpx", "r")
    else:
        ctx = stream.codec_context
    if keyframes_only:
        ctx.skip_frame = "NONKEY"
    for packet in container.demux(stream):
        yield from ctx.decode(packet)


def _decode_from_start(info: MediaInfo, wanted: list[int], rw: int, rh: int) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    todo = set(wanted)
    container, stream = _open_video(info)
    with container:
        for ordinal, frame in enumerate(_decoded(container, stream, info)):
            if ordinal in todo:
                out[ordinal] = _to_rgb(frame, info, rw, rh)
                todo.discard(ordinal)
                if not todo:
                    break
    if todo:
        raise DatasetError(
            f"{shown(info.path)}: frame {min(todo)} could not be decoded although the file lists {info.num_frames} "
            "frames - the file is damaged; re-encode it or remove it"
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
    container, stream = _open_video(info)
    with container:
        for run in seek_runs(wanted, info.keyframes):
            container.seek(info.pts[run[0]], stream=stream)  # lands on the keyframe at or before that frame
            todo, last = set(run), run[-1]
            for frame in _decoded(container, stream, info):
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
        return [read_image(info.path, (tw, th), Image.Resampling.BILINEAR)]
    n = info.num_frames
    spots = sorted({(n - 1) * (k + 1) // (looks + 1) for k in range(looks)})
    if info.animated_image:
        return list(_decode_animated(info, spots, tw, th).values())
    out = []
    container, stream = _open_video(info)
    with container:
        if info.pts:
            seen = set()
            for spot in spots:
                container.seek(info.pts[spot], stream=stream)
                frame = next(_decoded(container, stream, info, keyframes_only=True), None)
                if frame is not None and frame.pts not in seen:
                    seen.add(frame.pts)
                    out.append(_to_rgb(frame, info, tw, th))
        else:  # no seeking (GIFs): decode up to the last spot
            wanted = set(spots)
            for ordinal, frame in enumerate(_decoded(container, stream, info)):
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
