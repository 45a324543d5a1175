"""Still images in every Pillow mode decode to the right 8-bit RGB; oversized images are refused from their header.

Expected pixels are computed here with numpy from the values written, never from the decoder's output.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from trainer_core.config import DatasetConfig
from trainer_core.data import build_dataset, media
from trainer_core.data.media import probe, read_frames, read_image
from trainer_core.errors import DatasetError

RNG = np.random.default_rng(0)


def decoded(path: Path) -> np.ndarray:
    """The decoder's pixels at the image's own size (Pillow's resize to the same size is an exact copy)."""
    with Image.open(path) as img:
        size = img.size
    return read_image(path, size, Image.Resampling.BICUBIC)


def grey_rgb(levels: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(levels, np.uint8)[..., None], 3, axis=-1)


def onto_black(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Independent reference: colour times alpha / 255, rounded to nearest (no exact halves arise for 8-bit)."""
    return np.rint(rgb.astype(float) * alpha.astype(float)[..., None] / 255).astype(np.uint8)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(path: Path, size: tuple[int, int], depth: int, colour_type: int, rows: bytes, extra: bytes = b"") -> Path:
    """A PNG written by hand (Pillow cannot write 16-bit RGB/RGBA): ``rows`` are the unfiltered scanlines."""
    width, height = size
    stride = len(rows) // height if rows else 0
    data = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height)) if rows else b"\x00"
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + extra
        + png_chunk(b"IDAT", zlib.compress(data))
        + png_chunk(b"IEND", b"")
    )
    return path


def cfg(folder: Path, **kw) -> DatasetConfig:
    base = dict(folder=str(folder), resolutions=[32], num_frames=1, caption_dropout=0.0, default_caption="a picture")
    return DatasetConfig(**(base | kw))


GREY16 = np.array([[0, 1, 128, 129, 255, 256, 385, 32767], [32768, 33023, 40000, 65024, 65152, 65280, 65534, 65535]])


# --- deeper than 8 bits -----------------------------------------------------------------------------------


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "depth.png"
    Image.fromarray(GREY16.astype(np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")  # what Pillow opens a 16-bit grey PNG as (I;16 now, I in older releases)
    assert (decoded(path) == grey_rgb(np.rint(GREY16 / 257))).all()


def test_16bit_grey_png_trains_at_its_level(tmp_path):
    Image.fromarray(np.full((32, 32), 0x4000, np.uint16)).save(tmp_path / "flat16.png")
    ds = build_dataset([cfg(tmp_path)], None, 0)
    frames = ds.frames(ds.plan(0, 0))
    assert (frames == round(0x4000 / 257)).all()  # 64, where clipping gave 255


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("I;16B", GREY16.astype(">u2"), np.rint(GREY16 / 257)),
        ("I", GREY16.astype(np.int32), np.rint(GREY16 / 257)),  # 32-bit integer holding 16-bit samples
        ("F", (GREY16 / 65535).astype(np.float32), np.rint((GREY16 / 65535).astype(np.float32) * 255.0)),
    ],
)
def test_deep_grey_modes(tmp_path, mode, values, expected):
    path = tmp_path / f"deep_{mode.replace(';', '_')}.tif"  # TIFF keeps these modes (PNG cannot hold them)
    img = Image.fromarray(values)
    assert img.mode == mode
    img.save(path)
    assert (decoded(path) == grey_rgb(expected)).all()


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (np.array([[0, 70000]], np.int32), "0-70000 lie outside 0-65535"),
        (np.array([[0.0, 2.0]], np.float32), "outside 0-1"),
    ],
)
def test_deep_grey_of_unknown_scale_is_refused(tmp_path, values, reason):
    path = tmp_path / "unknown_scale.tif"
    Image.fromarray(values).save(path)
    with pytest.raises(DatasetError, match=rf"unknown_scale\.tif: .*{reason}.*re-save it"):
        decoded(path)


def test_16bit_grey_with_transparent_value(tmp_path):
    key = 385
    trns = png_chunk(b"tRNS", struct.pack(">H", key))
    path = raw_png(tmp_path / "key16.png", (8, 2), 16, 0, GREY16.astype(">u2").tobytes(), trns)
    alpha = np.where(GREY16 == key, 0, 255)
    assert (decoded(path) == onto_black(grey_rgb(np.rint(GREY16 / 257)), alpha)).all()
    assert probe(path).transparent


def test_16bit_rgb_and_rgba_png_keep_the_high_byte(tmp_path):
    # Pillow reads 16-bit colour PNGs as 8-bit by keeping each sample's high byte (at most 1 level below v / 257).
    rgb16 = RNG.integers(0, 65536, (4, 5, 3))
    path = raw_png(tmp_path / "rgb16.png", (5, 4), 16, 2, rgb16.astype(">u2").tobytes())
    assert (decoded(path) == (rgb16 >> 8)).all()
    alpha16 = RNG.integers(0, 65536, (4, 5, 1))
    rgba16 = np.concatenate([rgb16, alpha16], axis=-1)
    path = raw_png(tmp_path / "rgba16.png", (5, 4), 16, 6, rgba16.astype(">u2").tobytes())
    assert (decoded(path) == onto_black(rgb16 >> 8, alpha16[..., 0] >> 8)).all()


def test_16bit_rgb_with_transparent_colour_is_skipped_with_reason(tmp_path):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "good.png")
    rgb16 = np.full((2, 2, 3), 256)
    trns = png_chunk(b"tRNS", struct.pack(">HHH", 256, 256, 256))
    raw_png(tmp_path / "keyed16.png", (2, 2), 16, 2, rgb16.astype(">u2").tobytes(), trns)
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert [it.media.path.name for it in ds.items] == ["good.png"]
    assert len(ds.skipped) == 1
    assert "keyed16.png: 16-bit RGB with a transparent colour (tRNS) cannot be decoded faithfully" in ds.skipped[0]
    assert "skipped (1)" in ds.report() and "keyed16.png" in ds.report()


# --- 8-bit modes ---------------------------------------------------------------------------------------------


def test_grey_and_bilevel_png(tmp_path):
    levels = RNG.integers(0, 256, (6, 7))
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "grey.png")
    assert (decoded(tmp_path / "grey.png") == grey_rgb(levels)).all()
    bits = RNG.integers(0, 2, (6, 7)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert (decoded(tmp_path / "bits.png") == grey_rgb(np.where(bits, 255, 0))).all()


def test_palette_png_with_and_without_transparency(tmp_path):
    palette = RNG.integers(0, 256, (4, 3))
    index = RNG.integers(0, 4, (5, 6))
    img = Image.fromarray(index.astype(np.uint8), "P")
    img.putpalette(palette.astype(np.uint8).tobytes())
    img.save(tmp_path / "opaque_p.png")
    assert (decoded(tmp_path / "opaque_p.png") == palette[index]).all()
    palette_alpha = np.array([255, 0, 128, 37])
    img.save(tmp_path / "clear_p.png", transparency=palette_alpha.astype(np.uint8).tobytes())
    with Image.open(tmp_path / "clear_p.png") as back:
        assert back.mode == "P"
    assert (decoded(tmp_path / "clear_p.png") == onto_black(palette[index], palette_alpha[index])).all()
    assert probe(tmp_path / "clear_p.png").transparent and not probe(tmp_path / "opaque_p.png").transparent


def test_grey_alpha_png(tmp_path):
    grey, alpha = RNG.integers(0, 256, (5, 6)), RNG.integers(0, 256, (5, 6))
    Image.fromarray(np.stack([grey, alpha], axis=-1).astype(np.uint8), "LA").save(tmp_path / "la.png")
    assert (decoded(tmp_path / "la.png") == onto_black(grey_rgb(grey), alpha)).all()


@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_rgba_is_composited_onto_black(tmp_path, ext):
    rgb, alpha = RNG.integers(0, 256, (5, 6, 3)), RNG.integers(0, 256, (5, 6))
    alpha[0, :] = 0  # fully transparent: whatever colour is stored there must not show
    rgb[0, :] = 255
    path = tmp_path / f"rgba{ext}"
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path, lossless=True)
    out = decoded(path)
    assert (out == onto_black(rgb, alpha)).all()
    assert (out[0] == 0).all()


def test_grey_and_rgb_with_transparent_colour(tmp_path):
    levels = np.array([[5, 7, 7, 200]])
    Image.fromarray(levels.astype(np.uint8)).save(tmp_path / "key_l.png", transparency=7)
    assert (decoded(tmp_path / "key_l.png") == grey_rgb([[5, 0, 0, 200]])).all()
    rgb = np.array([[[1, 2, 3], [4, 5, 6], [4, 5, 7]]])
    Image.fromarray(rgb.astype(np.uint8)).save(tmp_path / "key_rgb.png", transparency=(4, 5, 6))
    assert (decoded(tmp_path / "key_rgb.png") == [[[1, 2, 3], [0, 0, 0], [4, 5, 7]]]).all()


def test_cmyk_and_ycbcr(tmp_path):
    cmyk = RNG.integers(0, 256, (5, 6, 4))
    Image.fromarray(cmyk.astype(np.uint8), "CMYK").save(tmp_path / "cmyk.tif")
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected = np.stack([(255 - x) * (255 - k) / 255 for x in (c, m, y)], axis=-1)
    assert np.abs(decoded(tmp_path / "cmyk.tif").astype(int) - np.rint(expected)).max() <= 1
    ycc = RNG.integers(16, 240, (5, 6, 3))
    Image.fromarray(ycc.astype(np.uint8), "YCbCr").save(tmp_path / "ycc.tif")
    yy, cb, cr = (ycc[..., i].astype(float) for i in range(3))
    expected = np.stack(  # JFIF (full-range BT.601)
        [yy + 1.402 * (cr - 128), yy - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), yy + 1.772 * (cb - 128)], -1
    )
    assert np.abs(decoded(tmp_path / "ycc.tif").astype(int) - np.rint(np.clip(expected, 0, 255))).max() <= 1


def test_unsupported_mode_is_refused_with_reason(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (4, 4)).save(path)
    with pytest.raises(DatasetError, match=r"lab\.tif: pixel mode LAB is not supported - re-save it"):
        decoded(path)


def test_exif_orientation_applies_to_deep_grey(tmp_path):
    stored = GREY16.astype(np.uint16)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "turned16.png"
    img.save(path, exif=exif)
    info = probe(path)
    assert (info.width, info.height) == (2, 8)
    out = read_frames(info, [0], (2, 8))[0]
    assert (out == grey_rgb(np.rot90(np.rint(stored / 257), k=-1))).all()


# --- the report ------------------------------------------------------------------------------------------------


def test_report_lists_images_whose_alpha_was_dropped(tmp_path):
    rgb = np.full((32, 32, 3), 200, np.uint8)
    alpha = np.full((32, 32, 1), 255, np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(tmp_path / "a_opaque.png")
    alpha[:, :16] = 64
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(tmp_path / "b_clear.png")
    Image.fromarray(rgb).save(tmp_path / "c_plain.png")
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert len(ds.items) == 3 and ds.skipped == ()
    [warning] = [w for w in ds.warnings if "transparent pixels" in w]
    assert "1 image(s) have transparent pixels; their alpha channel is dropped" in warning
    assert "composited onto black" in warning and "b_clear.png" in warning
    assert "a_opaque.png" not in warning and "c_plain.png" not in warning
    assert warning in ds.report()
    clear = next(i for i, it in enumerate(ds.items) if it.media.path.name == "b_clear.png")
    frames = ds.frames(ds.plan(clear, 0))[0]
    assert (frames[:, :16] == round(200 * 64 / 255)).all() and (frames[:, 16:] == 200).all()


# --- oversized images ------------------------------------------------------------------------------------------


def test_huge_png_is_skipped_from_its_header(tmp_path, recwarn):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "good.png")
    raw_png(tmp_path / "huge.png", (20000, 20000), 8, 0, b"")  # 400 megapixels declared, almost no data
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert [it.media.path.name for it in ds.items] == ["good.png"]
    assert len(ds.skipped) == 1
    assert "huge.png: 400 megapixels, above the limit of" in ds.skipped[0] and "downscale it" in ds.skipped[0]
    assert "skipped (1)" in ds.report() and "huge.png: 400 megapixels" in ds.report()
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_own_limit_refuses_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some ComfyUI nodes set it: Pillow checks nothing
    monkeypatch.setattr(media, "MAX_IMAGE_PIXELS", 1000)

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", no_decoding)
        with pytest.raises(DatasetError, match=r"big\.png: 0\.002 megapixels, above the limit of 0\.001 megapixels"):
            probe(path)
    with pytest.raises(DatasetError, match="above the limit"):
        read_image(path, (50, 40), Image.Resampling.BICUBIC)


def test_pillow_limit_warning_and_error_name_the_file(tmp_path, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above 1000 pixels, refuses above 2000
    Image.fromarray(np.full((32, 40, 3), 90, np.uint8)).save(tmp_path / "warned.png")  # 1280 pixels
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / "refused.png")  # 4096 pixels
    ds = build_dataset([cfg(tmp_path)], None, 0)
    assert [it.media.path.name for it in ds.items] == ["warned.png"]
    assert (ds.frames(ds.plan(0, 0)) == 90).all()
    assert len(ds.skipped) == 1
    assert "refused.png: 0.0041 megapixels, above the limit of 0.002 megapixels - downscale it" in ds.skipped[0]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
