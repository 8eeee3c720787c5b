"""Image files for the client, numpy only (the client must not import torch).

The readers themselves live in ``mpcvit.models.data`` (numpy-only, importable without
torch); this module adapts them to what the client wants: grey images as HW arrays, and
Fashion-MNIST test images picked by index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LabelledImage:
    name: str
    pixels: np.ndarray  # uint8, HW or HWC
    label: int | None = None


def load_images(specs: list[str]) -> list[LabelledImage]:
    """Resolve IMAGE arguments (files or fashion-mnist:SPLIT:INDEX[-END]) to uint8 arrays."""
    out: list[LabelledImage] = []
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in specs:
        if spec.startswith("fashion-mnist:"):
            parts = spec.split(":")
            if len(parts) != 3 or parts[1] not in ("test", "train"):
                raise ValueError(f"expected fashion-mnist:test:INDEX, got {spec!r}")
            if parts[1] not in splits:
                splits[parts[1]] = fashion_mnist_split(parts[1])
            images, labels = splits[parts[1]]
            lo, _, hi = parts[2].partition("-")
            try:
                start, stop = int(lo), int(hi or lo) + 1
            except ValueError:
                raise ValueError(f"bad index in {spec!r}") from None
            if not 0 <= start < stop <= len(images):
                raise ValueError(f"index out of range 0..{len(images) - 1}: {spec!r}")
            for i in range(start, stop):
                out.append(LabelledImage(f"fashion-mnist:{parts[1]}:{i}", images[i],
                                         int(labels[i])))
        else:
            out.append(LabelledImage(spec, read_image(spec)))
    return out
