"""Images for the client: read any common picture and turn it into the model's input.

numpy only; Pillow (the ``image`` extra: ``pip install 'mpcvit[image]'``) decodes PNG,
JPEG, WebP, BMP, GIF and TIFF.  NPY and binary PGM/PPM are read here without Pillow, and
numpy arrays are taken as they are, so an SDK-only install still classifies those.

Every file's size is checked from its header before any pixel is decoded: a picture of
more than ``MAX_PIXELS`` pixels is refused (``ImageError``) without reading its data.

:func:`to_model_input` converts pixels to the model's (channels, height, width), the way
its training images were made.  For a 1-channel model (Fashion-MNIST: a light object on
a black ground, 28 x 28):

1. transparency is composited over white;
2. colour becomes grey by luminance, 0.299 R + 0.587 G + 0.114 B (ITU-R 601, as Pillow's
   ``"L"``);
3. polarity: when the border of the picture is light (its median above 127 of 255), the
   grey values are negated, as Fashion-MNIST negated its product photos
   (``invert=True``/``False`` forces it either way);
4. the picture is trimmed to the box of pixels that differ from the background (the
   border's median) by more than 24 of 255;
5. the longer side is resized to the model's side, keeping the aspect ratio, with an
   antialiased bilinear (triangle) filter whose width grows with the reduction, and the
   shorter side is padded, centred, with the background value.

A picture already at the model's height and width is taken as model-ready: it skips
steps 4 and 5, and step 3 unless ``invert`` is given.  For a 3-channel
model, grey is repeated to RGB, and the shorter side is resized to the model's side and
the centre cut out (no polarity, no trim).  Very large pictures are first averaged down
by an integer factor (exact box filter) to at most 8 times the model's side.  The result
is in [0, 255]; :meth:`mpcvit.party.client.ModelInfo.preprocess` then normalises it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from mpcvit.models.data import FASHION_MNIST_ENV, fashion_mnist_dir, read_idx

#: Largest picture accepted, in pixels (width x height), checked before decoding.
MAX_PIXELS = 50_000_000
#: ITU-R 601 luma weights (R, G, B), the same as Pillow's conversion to "L".
LUMA = (0.299, 0.587, 0.114)
#: Grey levels (of 255) by which a pixel must differ from the background to be kept.
TRIM_THRESHOLD = 24.0
#: Pictures are box-reduced to at most this many times the model's side first.
WORK_FACTOR = 8

ImageSource = str | os.PathLike | bytes | np.ndarray

__all__ = [
    "MAX_PIXELS",
    "ImageError",
    "ImageSource",
    "LabelledImage",
    "PendingImage",
    "as_pixels",
    "fashion_mnist_split",
    "iter_images",
    "load_images",
    "read_image",
    "read_pixels",
    "source_name",
    "to_model_input",
]


class ImageError(ValueError):
    """A picture that cannot be read or converted; the message names it and says why."""


# --------------------------------------------------------------------------- reading

_PILLOW_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"P1", "PBM"), (b"P2", "PGM"), (b"P3", "PPM"), (b"P4", "PBM"),
)  # fmt: skip
_KNOWN = "PNG, JPEG, WebP, BMP, GIF, TIFF, PGM/PPM or NPY"


def _sniff(head: bytes) -> str | None:
    """The format of a file from its first bytes (never from its name)."""
    if head.startswith(b"\x93NUMPY"):
        return "NPY"
    if head[:2] in (b"P5", b"P6") and head[2:3].isspace():
        return "PNM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    for magic, fmt in _PILLOW_MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: header gives an empty picture ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width} x {height} pixels is too large (the limit is "
                         f"{max_pixels:,} pixels); scale it down first")


def read_pixels(source: ImageSource, *, max_pixels: int = MAX_PIXELS,
                draft: tuple[int, int] | None = None) -> np.ndarray:
    """A file (path or its bytes) as an array of pixels: HxW or HxWxC, uint8 or uint16.

    The format is recognised from the content.  ``draft`` (height, width) lets JPEG
    decode at a reduced scale that is still at least that large.  numpy arrays are
    returned unchanged.  Raises :class:`ImageError`.
    """
    if isinstance(source, np.ndarray):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read_stream(io.BytesIO(bytes(source)), "<bytes>", max_pixels, draft)
    name = os.fspath(source)
    try:
        with open(name, "rb") as fp:
            return _read_stream(fp, name, max_pixels, draft)
    except OSError as exc:
        raise ImageError(f"{name}: {exc.strerror or exc}") from None


def _read_stream(fp: IO[bytes], name: str, max_pixels: int,
                 draft: tuple[int, int] | None) -> np.ndarray:
    head = fp.read(16)
    fp.seek(0)
    fmt = _sniff(head)
    if fmt is None:
        raise ImageError(f"{name}: not a picture this client reads ({_KNOWN})")
    if fmt == "NPY":
        return _read_npy(fp, name, max_pixels)
    if fmt == "PNM":
        return _read_pnm(fp, name, max_pixels)
    return _read_pillow(fp, name, fmt, max_pixels, draft)


def _read_npy(fp: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:
            raise ImageError(f"{name}: NPY version {version} not supported")
    except ValueError as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: bad NPY header ({exc})") from None
    if dtype.hasobject:
        raise ImageError(f"{name}: NPY holds Python objects, not pixels")
    if len(shape) not in (2, 3):
        raise ImageError(f"{name}: NPY must hold HxW or HxWxC pixels, got shape {shape}")
    h, w = (shape[1], shape[2]) if len(shape) == 3 and _channels_first(shape) else shape[:2]
    _check_size(name, int(w), int(h), max_pixels)
    fp.seek(0)
    try:
        return fmt.read_array(fp, allow_pickle=False)
    except ValueError as exc:
        raise ImageError(f"{name}: NPY data truncated or unreadable ({exc})") from None


def _pnm_header(fp: IO[bytes], name: str) -> tuple[bytes, int, int, int]:
    """(magic, width, height, maxval) of a binary PGM/PPM; ``fp`` left at the pixels."""
    tokens: list[bytes] = []
    token = b""
    while len(tokens) < 4:
        c = fp.read(1)
        if not c:
            raise ImageError(f"{name}: truncated PGM/PPM header")
        if c == b"#" and not token:
            while c not in (b"\n", b"\r", b""):
                c = fp.read(1)
            continue
        if c.isspace():
            if token:
                tokens.append(token)
                token = b""
            continue
        token += c
        if len(token) > 20:
            raise ImageError(f"{name}: malformed PGM/PPM header")
    try:
        width, height, maxval = (int(t) for t in tokens[1:])
    except ValueError:
        raise ImageError(f"{name}: non-numeric PGM/PPM header") from None
    return tokens[0], width, height, maxval


def _read_pnm(fp: IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    magic, width, height, maxval = _pnm_header(fp, name)
    _check_size(name, width, height, max_pixels)
    if not 0 < maxval < 65536:
        raise ImageError(f"{name}: PGM/PPM maxval {maxval} out of range 1..65535")
    channels = 1 if magic == b"P5" else 3
    dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
    count = width * height * channels
    data = fp.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise ImageError(f"{name}: PGM/PPM pixel data truncated")
    img = np.frombuffer(data, dtype=dtype).reshape(height, width, channels)
    if maxval != 255:
        img = np.clip(np.rint(img.astype(np.float32) * (255.0 / maxval)), 0, 255)
    img = img.astype(np.uint8)
    return img[..., 0] if channels == 1 else img


def _read_pillow(fp: IO[bytes], name: str, fmt: str, max_pixels: int,
                 draft: tuple[int, int] | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ImageError(f"{name}: reading {fmt} needs Pillow: pip install 'mpcvit[image]' "
                         "(PGM/PPM/NPY files and numpy arrays work without it)") from None
    try:
        with Image.open(fp) as im:  # reads the header only
            width, height = im.size
            _check_size(name, width, height, max_pixels)
            if draft is not None and im.format == "JPEG":
                im.draft(im.mode, (draft[1], draft[0]))  # decode at 1/2, 1/4 or 1/8 scale
            return _pillow_array(im)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: too large ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{name}: unreadable {fmt} ({exc})") from None


def _pillow_array(im: Any) -> np.ndarray:
    """The decoded picture as uint8 L/RGB/RGBA, or uint16 for 16-bit grey."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(im.convert("I"), dtype=np.int64).clip(0, 65535).astype(np.uint16)
    if im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        return np.clip(a * (255.0 / 65535.0) if a.max(initial=0) > 255 else a, 0, 255).astype(
            np.uint8)
    has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        return np.asarray(im.convert("RGBA"))
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- converting


def _channels_first(shape: tuple[int, ...]) -> bool:
    return shape[0] in (1, 3, 4) and shape[-1] not in (1, 2, 3, 4)


def as_pixels(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Any pixel array as HxWxC (C = 1..4), keeping its dtype; checks shape and range.

    Accepted: HxW, HxWxC or CxHxW (C = 1, 3 or 4 first, when the last axis cannot be
    channels); bool, uint8, uint16 (full 0..65535 range), other integers in 0..255, and
    floats in [0, 1].
    """
    a = np.asarray(array)
    if a.ndim == 3 and _channels_first(a.shape):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 2, 3, 4):
        raise ImageError(f"{name}: expected HxW or HxWxC pixels (C = 1 to 4), got shape "
                         f"{np.shape(array)}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: empty picture, shape {np.shape(array)}")
    if a.dtype == np.bool_ or a.dtype in (np.uint8, np.uint16):
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.min() < 0 or a.max() > 255:
            raise ImageError(f"{name}: integer pixels must be in 0..255 (uint16: 0..65535), "
                             f"got {a.min()}..{a.max()} ({a.dtype})")
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise ImageError(f"{name}: pixels contain NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ImageError(f"{name}: float pixels must be in [0, 1], got {lo:g}..{hi:g} "
                             "(pass uint8 for 0..255 values)")
        return a
    raise ImageError(f"{name}: unsupported pixel type {a.dtype}")


def _box_reduce(a: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` x ``factor`` blocks (an exact box filter) into float32."""
    h, w, c = a.shape[0] // factor, a.shape[1] // factor, a.shape[2]
    blocks = a[: h * factor, : w * factor].reshape(h, factor, w, factor, c)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _to_float255(a: np.ndarray, source_dtype: np.dtype) -> np.ndarray:
    """Pixels (possibly already box-reduced to float32) on the 0..255 scale, float32."""
    x = a.astype(np.float32, copy=False)
    if source_dtype == np.bool_:
        return x * np.float32(255.0)
    if source_dtype == np.uint16:
        return x / np.float32(257.0)
    if np.issubdtype(source_dtype, np.floating):
        return x * np.float32(255.0)
    return x


def _resample_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a triangle filter widened by the reduction (antialiased)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    x = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(x[None, :] - centres[:, None]) / support)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def _resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """HxWxC float32 resized to h x w (separable antialiased bilinear)."""
    if a.shape[:2] == (h, w):
        return a
    rows = np.tensordot(_resample_weights(a.shape[0], h), a, axes=(1, 0))  # h, W, C
    out = np.tensordot(rows, _resample_weights(a.shape[1], w), axes=(1, 1))  # h, C, w
    return np.ascontiguousarray(out.transpose(0, 2, 1))


def _border(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _trim(grey: np.ndarray, background: float) -> np.ndarray:
    mask = np.abs(grey[..., 0] - background) > TRIM_THRESHOLD
    if not mask.any():
        return grey
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _letterbox(a: np.ndarray, h: int, w: int, fill: float) -> np.ndarray:
    scale = min(h / a.shape[0], w / a.shape[1])
    nh = min(h, max(1, round(a.shape[0] * scale)))
    nw = min(w, max(1, round(a.shape[1] * scale)))
    canvas = np.full((h, w, a.shape[2]), fill, dtype=np.float32)
    top, left = (h - nh) // 2, (w - nw) // 2
    canvas[top : top + nh, left : left + nw] = _resize(a, nh, nw)
    return canvas


def _centre_crop(a: np.ndarray, h: int, w: int) -> np.ndarray:
    scale = max(h / a.shape[0], w / a.shape[1])
    nh, nw = max(h, round(a.shape[0] * scale)), max(w, round(a.shape[1] * scale))
    a = _resize(a, nh, nw)
    top, left = (nh - h) // 2, (nw - w) // 2
    return a[top : top + h, left : left + w]


def _grey(a: np.ndarray) -> np.ndarray:
    if a.shape[-1] == 1:
        return a
    luma = np.asarray(LUMA, dtype=np.float32)
    return np.tensordot(a[..., :3], luma, axes=(2, 0))[..., None].astype(np.float32)


def to_model_input(pixels: np.ndarray, input_shape: tuple[int, ...], *,
                   invert: bool | None = None, name: str = "image") -> np.ndarray:
    """Pixels of any size and colour -> float32 (C, H, W) in [0, 255] for the model.

    See the module docstring for the steps.  ``invert`` (1-channel models): None
    decides from the border (never for a model-sized picture), True/False forces it.
    Raises :class:`ImageError`.
    """
    c, h, w = (int(d) for d in input_shape)
    a = as_pixels(pixels, name)
    if c not in (1, 3) and a.shape[-1] != c:
        raise ImageError(f"{name}: cannot convert {a.shape[-1]}-channel pixels to the model's "
                         f"{c} channels")
    exact = a.shape[:2] == (h, w)
    source_dtype = a.dtype
    factor = min(a.shape[0] // (WORK_FACTOR * h), a.shape[1] // (WORK_FACTOR * w))
    a = _to_float255(_box_reduce(a, factor) if factor > 1 else a, source_dtype)
    if a.shape[-1] in (2, 4):  # with alpha: composite over white
        alpha = a[..., -1:] / np.float32(255.0)
        a = a[..., :-1] * alpha + np.float32(255.0) * (1 - alpha)
    if c == 3:
        a = np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a
        out = a if exact else _centre_crop(a, h, w)
    elif c == 1:
        a = _grey(a)
        background = float(np.median(_border(a)))
        if invert is None:  # a model-sized picture is taken as model-ready
            invert = not exact and background > 127.5
        if invert:
            a, background = np.float32(255.0) - a, 255.0 - background
        out = a if exact else _letterbox(_trim(a, background), h, w, background)
    else:
        out = a if exact else _letterbox(a, h, w, 0.0)
    return np.ascontiguousarray(np.clip(out, 0, 255).transpose(2, 0, 1), dtype=np.float32)


def read_image(path: str | os.PathLike | bytes, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One picture as HxW (grey) or HxWxC pixels, as stored (no conversion)."""
    img = read_pixels(path, max_pixels=max_pixels)
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


# --------------------------------------------------------------------------- CLI inputs


def fashion_mnist_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) of the ``test`` or ``train`` split."""
    prefix = {"test": "t10k", "train": "train"}[split]
    directory = fashion_mnist_dir()
    out = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = directory / f"{prefix}-{kind}-ubyte"
        path = stem.with_name(stem.name + ".gz") if not stem.exists() else stem
        if not path.exists():
            raise ValueError(f"Fashion-MNIST not found in {directory} (install Debian's "
                             f"dataset-fashion-mnist or set {FASHION_MNIST_ENV})")
        out.append(read_idx(path))
    return out[0], out[1]


@dataclass(frozen=True)
class LabelledImage:
    name: str
    pixels: np.ndarray  # as read: HxW or HxWxC, uint8 (or uint16)
    label: int | None = None


@dataclass(frozen=True)
class PendingImage:
    """One IMAGE argument, read only when ``load()`` is called (errors come from there)."""

    name: str
    load: Callable[[], np.ndarray]
    label: int | None = None


def _fashion_range(spec: str) -> tuple[str, int, int]:
    parts = spec.split(":")
    if len(parts) != 3 or parts[1] not in ("test", "train"):
        raise ImageError(f"expected fashion-mnist:test:INDEX[-END], got {spec!r}")
    lo, _, hi = parts[2].partition("-")
    try:
        start, stop = int(lo), int(hi or lo) + 1
    except ValueError:
        raise ImageError(f"bad index in {spec!r}") from None
    return parts[1], start, stop


def _failing(error: Exception) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        raise error
    return load


def iter_images(specs: list[str], *, max_pixels: int = MAX_PIXELS,
                draft: tuple[int, int] | None = None) -> Iterator[PendingImage]:
    """IMAGE arguments (files or fashion-mnist:SPLIT:INDEX[-END]) one by one, lazily.

    A bad argument becomes an item whose ``load()`` raises, so the others still run.
    """
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in specs:
        if not spec.startswith("fashion-mnist:"):
            yield PendingImage(spec, lambda s=spec: read_pixels(s, max_pixels=max_pixels,
                                                                draft=draft))
            continue
        try:
            split, start, stop = _fashion_range(spec)
            if split not in splits:
                splits[split] = fashion_mnist_split(split)
            images, labels = splits[split]
            if not 0 <= start < stop <= len(images):
                raise ImageError(f"index out of range 0..{len(images) - 1}: {spec!r}")
        except ValueError as exc:
            yield PendingImage(spec, _failing(exc if isinstance(exc, ImageError)
                                              else ImageError(str(exc))))
            continue
        for i in range(start, stop):
            yield PendingImage(f"fashion-mnist:{split}:{i}", lambda x=images[i]: x,
                               int(labels[i]))


def load_images(specs: list[str]) -> list[LabelledImage]:
    """Resolve IMAGE arguments to pixels at once; the first bad one raises ImageError."""
    return [LabelledImage(p.name, _squeeze(p.load()), p.label) for p in iter_images(specs)]


def _squeeze(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img


def _is_path(source: object) -> bool:
    return isinstance(source, (str, os.PathLike)) and not isinstance(source, bytes)


def source_name(source: object) -> str:
    """How an image source is named in messages."""
    if _is_path(source):
        return str(Path(source))  # type: ignore[arg-type]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return "<array>"
