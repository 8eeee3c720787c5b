"""The client's image input: every format and array kind, converted to the model's input;
oversize pictures refused from their header; a clear message without Pillow."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from mpcvit.party.client import InvalidInput, ModelInfo
from mpcvit.party.images import (
    MAX_PIXELS,
    ImageError,
    as_pixels,
    iter_images,
    read_pixels,
    to_model_input,
)

Image = pytest.importorskip("PIL.Image")

GREY = (1, 28, 28)
FMNIST = ModelInfo("m", GREY, 10, tuple("abcdefghij"), 16, (0.2860,), (0.3530,), 1 << 20, 64,
                   ("m",))


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kw)
    return buf.getvalue()


def pnm(array: np.ndarray) -> bytes:
    magic = b"P5" if array.ndim == 2 else b"P6"
    h, w = array.shape[:2]
    return magic + b"\n# made by a test\n%d %d\n255\n" % (w, h) + array.tobytes()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def picture(h: int, w: int, channels: int) -> np.ndarray:
    """A dark blob on a white ground (what a product photo looks like)."""
    yy, xx = np.mgrid[0:h, 0:w]
    blob = ((yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 3) ** 2) < 1
    grey = np.where(blob, 40, 255).astype(np.uint8)
    if channels == 1:
        return grey
    out = np.stack([grey, grey, np.where(blob, 90, 255).astype(np.uint8)], -1)
    if channels == 4:
        out = np.concatenate([out, np.full((h, w, 1), 255, np.uint8)], -1)
    return out


ENCODERS = {
    "png": lambda a: encode(a, "PNG"),
    "jpeg": lambda a: encode(a[..., :3] if a.ndim == 3 else a, "JPEG", quality=95),
    "webp": lambda a: encode(a, "WEBP", lossless=True),
    "bmp": lambda a: encode(a[..., :3] if a.ndim == 3 else a, "BMP"),
    "tiff": lambda a: encode(a, "TIFF"),
    "gif": lambda a: encode(a[..., :3] if a.ndim == 3 else a, "GIF"),
    "npy": npy,
    "pnm": lambda a: pnm(a[..., :3] if a.ndim == 3 else a),
}


@pytest.mark.parametrize("fmt", sorted(ENCODERS))
@pytest.mark.parametrize("h, w, channels", [(28, 28, 1), (200, 300, 3), (56, 56, 1),
                                             (28, 28, 3), (97, 41, 4), (13, 17, 1)])
def test_every_format_and_size_becomes_the_model_input(tmp_path, fmt, h, w, channels) -> None:
    data = ENCODERS[fmt](picture(h, w, channels))
    path = tmp_path / f"pic.{fmt}"
    path.write_bytes(data)
    for source in (path, str(path), data):
        x = to_model_input(read_pixels(source), GREY)
        assert x.shape == GREY and x.dtype == np.float32
        assert 0 <= x.min() and x.max() <= 255
        border = np.median(np.concatenate([x[0, 0], x[0, -1]]))
        if (h, w) == (28, 28):  # model-sized: taken as it is (only made grey)
            assert border > 200 and x[0, 14, 14] < 100
        else:  # the dark blob on white became a light object on black, filling the frame
            assert border < 30 and x[0, 14, 14] > 150
    norm = FMNIST.preprocess(read_pixels(data))
    assert norm.shape == GREY and np.all(np.isfinite(norm))


@pytest.mark.parametrize("shape", [(28, 28), (300, 200), (50, 70, 1), (40, 30, 3), (64, 64, 4),
                                   (3, 40, 50), (5, 5)])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "float64", "int64", "bool"])
def test_uniform_arrays_stay_uniform(shape, dtype) -> None:
    value = {"uint8": 200, "uint16": 200 * 257, "float32": 200 / 255, "float64": 200 / 255,
             "int64": 200, "bool": True}[dtype]
    a = np.full(shape, value, dtype=dtype)
    if shape[-1] == 4:  # opaque
        a[..., 3] = {"uint16": 65535, "float32": 1.0, "float64": 1.0}.get(dtype, 255)
    x = to_model_input(a, GREY, invert=False)
    expect = 255.0 if dtype == "bool" else 200.0
    assert x.shape == GREY
    np.testing.assert_allclose(x, expect, atol=0.01)
    # Light ground: auto polarity negates a picture it resizes, as Fashion-MNIST negated
    # its photos; a model-sized one is taken as it is.
    auto = expect if shape[:2] == (28, 28) else 255.0 - expect
    np.testing.assert_allclose(to_model_input(a, GREY), auto, atol=0.01)
    rgb = to_model_input(a, (3, 32, 32), invert=False)
    assert rgb.shape == (3, 32, 32)
    np.testing.assert_allclose(rgb, expect, atol=0.01)


def test_colour_to_grey_by_luminance_and_alpha_over_white() -> None:
    red = np.zeros((28, 28, 3), np.uint8)
    red[..., 0] = 255
    x = to_model_input(red, GREY, invert=False)
    np.testing.assert_allclose(x, 0.299 * 255, atol=0.01)
    transparent = np.zeros((28, 28, 4), np.uint8)  # black, but fully transparent
    np.testing.assert_allclose(to_model_input(transparent, GREY, invert=False), 255.0)


def test_model_sized_images_are_taken_as_they_are() -> None:
    """Fashion-MNIST-sized inputs are only normalised, exactly as before conversion existed."""
    from mpcvit.party.images import load_images

    for im in load_images(["fashion-mnist:test:0-49"]):
        old = (im.pixels.astype(np.float32) / np.float32(255.0) - np.float32(0.2860)) / \
            np.float32(0.3530)
        assert np.array_equal(FMNIST.preprocess(im.pixels), old[None])
        # The same image twice the size, in colour, comes back close to the original.
        big = np.repeat(np.repeat(np.stack([im.pixels] * 3, -1), 2, 0), 2, 1)
        x = to_model_input(big, GREY)
        assert np.mean(np.abs(x[0] - im.pixels.astype(np.float32))) < 40


def test_letterbox_keeps_aspect_and_centres() -> None:
    wide = np.full((100, 400), 255, np.uint8)
    wide[20:80, 50:350] = 0  # a dark bar on white: 300 x 60 after the trim
    x = to_model_input(wide, GREY)[0]
    rows = np.flatnonzero(x.max(axis=1) > 128)
    cols = np.flatnonzero(x.max(axis=0) > 128)
    assert cols[0] == 0 and cols[-1] == 27  # the long side fills the width
    assert 4 <= len(rows) <= 7 and abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1  # 28/5, centred


def test_bad_arrays_are_refused_clearly() -> None:
    for bad, words in [(np.zeros((2, 3, 4, 5)), "shape"), (np.zeros((0, 5)), "empty"),
                       (np.full((5, 5), 2.0), "[0, 1]"), (np.full((5, 5), np.nan), "NaN"),
                       (np.full((5, 5), 300), "0..255"), (np.zeros((5, 5), complex), "type")]:
        with pytest.raises(ImageError, match=words.replace("[", r"\[").replace("]", r"\]")):
            as_pixels(bad)
        with pytest.raises(InvalidInput):  # what the SDK raises locally, before sending
            FMNIST.preprocess(bad)
    with pytest.raises(ImageError, match="channels"):
        to_model_input(np.zeros((8, 8, 3), np.uint8), (2, 8, 8))


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height; its pixel data is garbage."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage" * 10)
            + chunk(b"IEND", b""))


def test_oversize_pictures_are_refused_from_the_header(tmp_path) -> None:
    # 9000 x 9000 is over our limit but under Pillow's own bomb check, and 100000 x 100000
    # over both.  The pixel data is garbage: decoding it would fail differently, so "too
    # large" proves that only the header was read.
    for w, h in [(9000, 9000), (100_000, 100_000)]:
        path = tmp_path / f"claims_{w}.png"
        path.write_bytes(_png_claiming(w, h))
        with pytest.raises(ImageError, match="too large") as err:
            read_pixels(path)
        assert str(path) in str(err.value)
    assert 9000 * 9000 > MAX_PIXELS
    # The same garbage at a size within the limit is decoded, and fails as unreadable.
    with pytest.raises(ImageError, match="unreadable"):
        read_pixels(_png_claiming(100, 100))
    # NPY and PGM headers are checked the same way.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (60_000, 60_000)})
    with pytest.raises(ImageError, match="too large"):
        read_pixels(header.getvalue() + b"\0" * 64)
    with pytest.raises(ImageError, match="too large"):
        read_pixels(b"P5 80000 80000 255\n" + b"\0" * 64)
    # A real picture over a lower limit.
    with pytest.raises(ImageError, match="too large"):
        read_pixels(encode(picture(100, 100, 1), "PNG"), max_pixels=5000)


def test_unreadable_files_name_themselves(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "cut.pgm").write_bytes(b"P5 28 28 255\n" + b"\0" * 100)
    for name, words in [("notes.txt", "not a picture"), ("cut.pgm", "truncated"),
                        ("missing.png", "No such file")]:
        with pytest.raises(ImageError, match=words) as err:
            read_pixels(tmp_path / name)
        assert name in str(err.value)


def test_cli_specs_are_lazy_and_bad_ones_fail_alone(tmp_path) -> None:
    (tmp_path / "a.pgm").write_bytes(pnm(picture(30, 20, 1)))
    items = list(iter_images([str(tmp_path / "nope.png"), "fashion-mnist:test:0-1",
                              "fashion-mnist:val:1", str(tmp_path / "a.pgm")]))
    assert [it.label for it in items] == [None, 9, 2, None, None]
    for bad in (items[0], items[3]):
        with pytest.raises(ImageError):
            bad.load()
    assert items[1].load().shape == (28, 28) and items[4].load().shape == (30, 20)


def test_without_pillow_pngs_say_which_extra_to_install(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(encode(picture(30, 30, 3), "PNG"))
    (tmp_path / "a.pgm").write_bytes(pnm(picture(30, 30, 1)))
    code = f"""
import sys
class HidePillow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "PIL":
            raise ModuleNotFoundError("No module named 'PIL'", name="PIL")
sys.meta_path.insert(0, HidePillow())
from mpcvit.party.images import ImageError, read_pixels, to_model_input
assert to_model_input(read_pixels({str(tmp_path / 'a.pgm')!r}), (1, 28, 28)).shape == (1, 28, 28)
try:
    read_pixels({str(tmp_path / 'a.png')!r})
except ImageError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "a.png: reading PNG needs Pillow: pip install 'mpcvit[image]'" in out
