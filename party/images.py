"""Image files for the client, numpy only (the client must not import torch).

The readers themselves live in ``mpcvit.models.data`` (numpy-only, importable without
torch); this module adapts them to what the client wants: grey images as HW arrays, and
Fashion-MNIST test images picked by index.
"""

from __future__ import annotations

import os

import numpy as np
from mpcvit.models.data import FASHION_MNIST_ENV, fashion_mnist_dir, read_idx
from mpcvit.models.data import read_image as _read_hwc


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


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as HW (grey) or HWC uint8."""
    img = _read_hwc(path)
    return img[..., 0] if img.shape[-1] == 1 else img
