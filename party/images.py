"""Image files for the client, numpy only (the client must not import torch, and
``mpcvit.models`` does).  Reads IDX (Fashion-MNIST), NPY, binary PGM/PPM, and PNG/JPEG
when Pillow is installed."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MPCVIT_FASHION_MNIST"


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An unsigned-byte IDX file (gzip or raw), validated against its header."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX payload does not match its dimensions {dims}")
    return data.reshape(dims)


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


def read_netpbm(path: Path) -> np.ndarray:
    """Binary PGM (P5) or PPM (P6) with maxval 255, as HWC uint8."""
    data = path.read_bytes()
    tokens, pos = [], 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos:pos + 1].isspace():
            pos += 1
        if start == pos:
            raise ValueError(f"{path}: truncated PGM/PPM header")
        tokens.append(data[start:pos])
    if tokens[0] not in (b"P5", b"P6") or int(tokens[3]) != 255:
        raise ValueError(f"{path}: only binary 8-bit PGM (P5) / PPM (P6) are supported")
    width, height = int(tokens[1]), int(tokens[2])
    channels = 1 if tokens[0] == b"P5" else 3
    pixels = data[pos + 1:pos + 1 + width * height * channels]
    if len(pixels) != width * height * channels:
        raise ValueError(f"{path}: PGM/PPM pixel data truncated")
    return np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as HW or HWC uint8."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise ValueError(f"{path}: NPY image must be uint8 HW or HWC")
        return arr
    if suffix in (".pgm", ".ppm", ".pnm"):
        img = read_netpbm(path)
        return img[..., 0] if img.shape[2] == 1 else img
    if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
        try:
            from PIL import Image
        except ImportError:
            raise ValueError(f"{path}: reading {suffix} needs Pillow; use .pgm or .npy") from None
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if im.mode in ("1", "L", "I", "F") else "RGB"))
    raise ValueError(f"{path}: unsupported image type {suffix!r}")
