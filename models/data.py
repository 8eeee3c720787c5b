"""Datasets for training and evaluating the plaintext ViTs.

Everything here works on numpy ``uint8`` images and has no torch import at module
level, so a torch-free client can reuse :func:`preprocess` and the normalisation
constants and send exactly what the model was trained on.  :meth:`Split.tensors`
converts to torch lazily for training.

A dataset is named by a *spec* string (the CLI's ``--data``):

- ``fashion-mnist`` or ``fashion-mnist:/dir`` -- IDX files (gzip or raw); the directory
  defaults to ``$MPCVIT_FASHION_MNIST`` or Debian's ``/usr/share/datasets/fashion-mnist``.
- ``digits`` -- scikit-learn's shipped 8x8 digits (needs scikit-learn).
- ``cifar10:/dir`` / ``cifar100:/dir`` -- the official "python version" pickled batches
  (``cifar-10-batches-py`` / ``cifar-100-python``) or the binary ``.bin`` batches.
- ``folder:/dir`` -- an image folder: ``dir/train/<class>/*`` and ``dir/test/<class>/*``,
  or ``dir/<class>/*`` split deterministically.
- ``synthetic`` or ``synthetic:size=16,channels=1,classes=4,train=1024,test=256,seed=0,noise=0.5``
  -- deterministic learnable data for tests and benchmarks.
- a bare directory path -- its layout is detected (IDX, CIFAR or image folder).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "MPCVIT_FASHION_MNIST"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetError(ValueError):
    """A dataset path is missing or its contents are malformed."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{problem}: {self.path}" if self.path else problem)


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std applied to pixels scaled to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


# Per-dataset constants: the training pipeline and any client must agree on them.
NORMALIZATION: dict[str, Normalization] = {
    "fashion-mnist": Normalization((0.2860,), (0.3530,)),
    "digits": Normalization((0.3053,), (0.3761,)),
    "cifar10": Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # Unknown statistics: map [0, 1] to [-1, 1].
    "synthetic": Normalization((0.5,), (0.5,)),
    "folder": Normalization((0.5,), (0.5,)),
}


def normalization_for(dataset_name: str, channels: int) -> Normalization:
    """The normalisation of ``dataset_name``, broadcast to ``channels`` channels."""
    _default_channels(dataset_name)  # validates the name
    norm = NORMALIZATION[dataset_name.split(":", 1)[0].lower()]
    if len(norm.mean) == channels:
        return norm
    if len(norm.mean) == 1:
        return Normalization(norm.mean * channels, norm.std * channels)
    raise ValueError(f"{dataset_name} normalisation has {len(norm.mean)} channels, not {channels}")


def _default_channels(dataset_name: str) -> int:
    key = dataset_name.split(":", 1)[0].lower()
    if key not in NORMALIZATION:
        raise KeyError(
            f"no normalisation for dataset {dataset_name!r}; known: {sorted(NORMALIZATION)}"
        )
    return len(NORMALIZATION[key].mean)


def _to_nhwc(images: np.ndarray, channels: int) -> np.ndarray:
    """Accept HW, HWC, NHW or NHWC and return NHWC."""
    a = np.asarray(images)
    if a.ndim == 2:
        return a[None, :, :, None]
    if a.ndim == 3:
        if channels == 1:
            return a[:, :, :, None]  # NHW: a batch of grayscale images
        if a.shape[-1] == channels:
            return a[None]  # HWC: one colour image
    if a.ndim == 4 and a.shape[-1] == channels:
        return a
    raise ValueError(
        f"expected channel-last images with {channels} channel(s), got shape {a.shape}"
    )


def preprocess(
    images_uint8: np.ndarray, dataset_name: str, channels: int | None = None
) -> np.ndarray:
    """Turn channel-last ``uint8`` image(s) into normalised float32 NCHW (pure numpy).

    ``channels`` defaults to the dataset's own channel count (1 for grayscale sets).
    """
    if channels is None:
        channels = _default_channels(dataset_name)
    a = _to_nhwc(images_uint8, channels)
    if a.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {a.dtype}")
    norm = normalization_for(dataset_name, channels)
    mean = np.asarray(norm.mean, dtype=np.float32)
    std = np.asarray(norm.std, dtype=np.float32)
    x = (a.astype(np.float32) / np.float32(255.0) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


@dataclass
class Split:
    """One split: normalised float32 NCHW images and int64 labels (numpy)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.images) != len(self.labels):
            raise ValueError(f"bad split shapes {self.images.shape} / {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[Any, Any]:
        """(images, labels) as torch tensors sharing memory with the arrays."""
        import torch

        return torch.from_numpy(self.images), torch.from_numpy(self.labels)


@dataclass
class DataBundle:
    """A loaded dataset: both splits plus what a model and augmentation must know."""

    name: str
    train: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...] = ()
    normalization: Normalization = field(default_factory=lambda: Normalization((0.5,), (0.5,)))
    hflip: bool = False  # horizontal flip preserves the label
    crop_padding: int = 0  # random-crop padding that keeps the object in view

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        c, h, w = self.train.images.shape[1:]
        return int(c), int(h), int(w)


# ----------------------------------------------------------------------------- subsets


def limit_split(split: Split, limit: int | None, seed: int = 0) -> Split:
    """A deterministic random subset of at most ``limit`` examples (order preserved)."""
    if limit is None or limit >= len(split):
        return split
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
    return Split(split.images[idx], split.labels[idx])


def limit_bundle(
    bundle: DataBundle, train_limit: int | None, test_limit: int | None = None, seed: int = 0
) -> DataBundle:
    """``bundle`` with both splits cut down (for quick runs and tests)."""
    return replace(
        bundle,
        train=limit_split(bundle.train, train_limit, seed),
        test=limit_split(bundle.test, test_limit, seed + 1),
    )


def _bundle(
    name: str,
    norm_name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    class_names: Sequence[str] = (),
    hflip: bool = False,
    crop_padding: int = 0,
) -> DataBundle:
    """Normalise NHWC uint8 splits into a :class:`DataBundle`."""
    channels = train[0].shape[-1]
    return DataBundle(
        name=name,
        train=Split(preprocess(train[0], norm_name, channels), train[1].astype(np.int64)),
        test=Split(preprocess(test[0], norm_name, channels), test[1].astype(np.int64)),
        num_classes=num_classes,
        class_names=tuple(class_names),
        normalization=normalization_for(norm_name, channels),
        hflip=hflip,
        crop_padding=crop_padding,
    )


# ----------------------------------------------------------------------------- IDX

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(data: bytes, source: str | os.PathLike | None = None) -> np.ndarray:
    """Parse the bytes of an IDX file (the MNIST format), validating header and size."""
    if len(data) < 4:
        raise DatasetError(source, f"IDX file too short ({len(data)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        raise DatasetError(source, f"bad IDX magic number 0x{data[:4].hex()}")
    if ndim == 0:
        raise DatasetError(source, "IDX file declares zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(source, f"IDX header truncated: {ndim} dims need {header} bytes")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise DatasetError(
            source,
            f"IDX payload is {len(data) - header} bytes but dims {dims} of {dtype} need {expected}",
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file, gunzipping it if it starts with the gzip magic."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(path, f"cannot read IDX file ({exc.strerror or exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DatasetError(path, f"corrupt gzip data ({exc})") from exc
    return parse_idx(raw, path)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(directory, f"missing {stem}[.gz] in Fashion-MNIST directory")


def _idx_pair(directory: Path, prefix: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    img_path = _find_idx(directory, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(img_path), read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            img_path, f"expected uint8 images N x H x W, got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(lab_path, f"expected uint8 labels N, got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(lab_path, f"{len(labels)} labels for {len(images)} images")
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(lab_path, f"label {int(labels.max())} out of range 0..{num_classes - 1}")
    return images[..., None], labels


def fashion_mnist_dir(path: str | os.PathLike | None = None) -> Path:
    """The Fashion-MNIST directory: argument, else ``$MPCVIT_FASHION_MNIST``, else Debian's."""
    return Path(path or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)


def load_fashion_mnist(path: str | os.PathLike | None = None) -> DataBundle:
    """The full Fashion-MNIST (60k train / 10k test) from its four IDX files."""
    directory = fashion_mnist_dir(path)
    if not directory.is_dir():
        raise DatasetError(
            directory,
            "Fashion-MNIST directory not found (install Debian's dataset-fashion-mnist, "
            f"or pass fashion-mnist:/dir or set {FASHION_MNIST_ENV})",
        )
    train = _idx_pair(directory, "train", 10)
    test = _idx_pair(directory, "t10k", 10)
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DatasetError(
            directory, f"train/test image sizes differ: {train[0].shape} vs {test[0].shape}"
        )
    return _bundle(
        "fashion-mnist",
        "fashion-mnist",
        train,
        test,
        10,
        FASHION_MNIST_CLASSES,
        hflip=True,
        crop_padding=2,
    )


# ----------------------------------------------------------------------------- digits


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """scikit-learn's 1797 shipped 8x8 digits, split deterministically."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DatasetError(
            None, "the 'digits' dataset needs scikit-learn (pip install scikit-learn)"
        ) from exc
    d = sk_load_digits()
    images = np.clip(np.rint(np.asarray(d.images) * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(d.target, dtype=np.int64)
    train_idx, test_idx = _split_indices(len(labels), test_fraction, seed)
    return _bundle(
        "digits",
        "digits",
        (images[train_idx, ..., None], labels[train_idx]),
        (images[test_idx, ..., None], labels[test_idx]),
        10,
        [str(i) for i in range(10)],
        crop_padding=1,
    )


def _split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# ----------------------------------------------------------------------------- CIFAR

# The official batches are pickled dicts of a numpy array and lists; this unpickler
# refuses every global except those needed to rebuild a numpy array, so a hostile
# file cannot run code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _safe_unpickle(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DatasetError(path, f"cannot read CIFAR batch ({exc.strerror or exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a malformed file
        raise DatasetError(path, f"not a CIFAR python batch ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(path, f"CIFAR batch is a {type(obj).__name__}, not a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_cifar_batch(path: str | os.PathLike, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One python-pickle CIFAR batch as NHWC uint8 images and labels."""
    path = Path(path)
    batch = _safe_unpickle(path)
    if "data" not in batch or label_key not in batch:
        raise DatasetError(
            path, f"CIFAR batch lacks 'data' or '{label_key}' (keys: {sorted(batch)})"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            path, f"CIFAR data must be uint8 N x 3072, got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),):
        raise DatasetError(path, f"{labels.shape} labels for {len(data)} images")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar_bin(path: str | os.PathLike, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """One binary CIFAR batch (records of label byte(s) + 3072 pixels); last label is used."""
    path = Path(path)
    try:
        raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(path, f"cannot read CIFAR batch ({exc.strerror or exc})") from exc
    record = label_bytes + 3072
    if raw.size == 0 or raw.size % record:
        raise DatasetError(path, f"size {raw.size} is not a multiple of the {record}-byte record")
    rows = raw.reshape(-1, record)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, rows[:, label_bytes - 1].astype(np.int64)


def _cifar_files(directory: Path, classes: int) -> tuple[list[Path], list[Path], str]:
    """(train files, test files, format) for either CIFAR layout in ``directory``."""
    if classes == 10:
        py = ([directory / f"data_batch_{i}" for i in range(1, 6)], [directory / "test_batch"])
        binary = (
            [directory / f"data_batch_{i}.bin" for i in range(1, 6)],
            [directory / "test_batch.bin"],
        )
    else:
        py = ([directory / "train"], [directory / "test"])
        binary = ([directory / "train.bin"], [directory / "test.bin"])
    for train, test, fmt in (py + ("python",), binary + ("binary",)):
        if all(p.is_file() for p in train + test):
            return train, test, fmt
    raise DatasetError(directory, f"no CIFAR-{classes} batches (python or binary version) found")


def load_cifar(path: str | os.PathLike, classes: int = 10) -> DataBundle:
    """CIFAR-10/100 from the official python-pickle (or binary) batch directory."""
    if classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, not {classes}")
    directory = Path(path)
    if not directory.is_dir():
        raise DatasetError(directory, f"CIFAR-{classes} directory not found")
    train_files, test_files, fmt = _cifar_files(directory, classes)
    label_key = "labels" if classes == 10 else "fine_labels"

    def read(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        if fmt == "python":
            parts = [read_cifar_batch(p, label_key) for p in files]
        else:
            parts = [read_cifar_bin(p, 1 if classes == 10 else 2) for p in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise DatasetError(files[0], f"labels outside 0..{classes - 1}")
        return images, labels

    name = f"cifar{classes}"
    return _bundle(
        name,
        name,
        read(train_files),
        read(test_files),
        classes,
        _cifar_class_names(directory, classes),
        hflip=True,
        crop_padding=4,
    )


def _cifar_class_names(directory: Path, classes: int) -> tuple[str, ...]:
    meta_name, key = (
        ("batches.meta", "label_names") if classes == 10 else ("meta", "fine_label_names")
    )
    meta = directory / meta_name
    if meta.is_file():
        try:
            names = _safe_unpickle(meta).get(key, [])
        except DatasetError:
            names = []
        if len(names) == classes:
            return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return tuple(str(i) for i in range(classes))


# ----------------------------------------------------------------------------- image folder

_PIL_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_NETPBM_SUFFIXES = {".pgm", ".ppm", ".pnm"}
IMAGE_SUFFIXES = _PIL_SUFFIXES | _NETPBM_SUFFIXES | {".npy"}


def read_netpbm(path: Path) -> np.ndarray:
    """A binary PGM (P5) or PPM (P6) image with maxval < 256, as HWC uint8."""
    data = path.read_bytes()
    tokens: list[bytes] = []
    pos = 0
    while len(tokens) < 4:
        while pos < len(data) and data[pos : pos + 1].isspace():
            pos += 1
        if data[pos : pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        start = pos
        while pos < len(data) and not data[pos : pos + 1].isspace():
            pos += 1
        if start == pos:
            raise DatasetError(path, "truncated PGM/PPM header")
        tokens.append(data[start:pos])
    magic = tokens[0]
    if magic not in (b"P5", b"P6"):
        raise DatasetError(path, f"only binary PGM (P5) / PPM (P6) are supported, got {magic!r}")
    try:
        width, height, maxval = (int(t) for t in tokens[1:])
    except ValueError as exc:
        raise DatasetError(path, "non-numeric PGM/PPM header") from exc
    if not 0 < maxval < 256:
        raise DatasetError(path, f"PGM/PPM maxval {maxval} unsupported (need 1..255)")
    channels = 1 if magic == b"P5" else 3
    pixels = data[pos + 1 : pos + 1 + width * height * channels]
    if len(pixels) != width * height * channels:
        raise DatasetError(path, "PGM/PPM pixel data truncated")
    img = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)
    if maxval != 255:
        img = np.clip(np.rint(img.astype(np.float32) * (255.0 / maxval)), 0, 255).astype(np.uint8)
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """One image file as HWC uint8 (Pillow for PNG/JPEG; own readers for PGM/PPM/NPY)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise DatasetError(
                path, f"NPY image must be uint8 HW or HWC, got {arr.dtype} {arr.shape}"
            )
        return arr[..., None] if arr.ndim == 2 else arr
    if suffix in _NETPBM_SUFFIXES:
        return read_netpbm(path)
    if suffix in _PIL_SUFFIXES:
        try:
            from PIL import Image
        except ImportError as exc:
            raise DatasetError(
                path, "reading PNG/JPEG needs Pillow (pip install pillow), or use PGM/PPM/NPY files"
            ) from exc
        try:
            with Image.open(path) as im:
                mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                arr = np.asarray(im.convert(mode), dtype=np.uint8)
        except OSError as exc:
            raise DatasetError(path, f"unreadable image ({exc})") from exc
        return arr[..., None] if arr.ndim == 2 else arr
    raise DatasetError(path, f"unsupported image type {suffix!r}")


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _stack_images(files: list[Path], root: Path) -> np.ndarray:
    images = [read_image(p) for p in files]
    channels = max(im.shape[-1] for im in images)
    if channels == 3:  # mixed grayscale/colour: promote grayscale
        images = [np.repeat(im, 3, axis=-1) if im.shape[-1] == 1 else im for im in images]
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise DatasetError(
            root, f"images differ in size {sorted(shapes)[:3]}...; resize them first"
        )
    return np.stack(images)


def load_image_folder(
    path: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0
) -> DataBundle:
    """``root/{train,test}/<class>/*`` or ``root/<class>/*`` (split per class, seeded)."""
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(root, "image folder not found")
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = [d.name for d in _class_dirs(root / "train")]
        test_classes = [d.name for d in _class_dirs(root / "test")]
        if not classes or not set(test_classes) <= set(classes):
            raise DatasetError(
                root, f"test classes {test_classes} not a subset of train classes {classes}"
            )
        splits = {}
        for split in ("train", "test"):
            files, labels = [], []
            for label, name in enumerate(classes):
                d = root / split / name
                found = _image_files(d) if d.is_dir() else []
                files += found
                labels += [label] * len(found)
            if not files:
                raise DatasetError(root / split, "no image files")
            splits[split] = (files, np.asarray(labels, dtype=np.int64))
    else:
        class_dirs = _class_dirs(root)
        if not class_dirs:
            raise DatasetError(
                root, "no class sub-directories (expected root/<class>/* or root/train|test)"
            )
        classes = [d.name for d in class_dirs]
        tr_files, tr_labels, te_files, te_labels = [], [], [], []
        for label, d in enumerate(class_dirs):
            found = _image_files(d)
            if len(found) < 2:
                raise DatasetError(d, "need at least 2 images per class to split train/test")
            tr, te = _split_indices(len(found), test_fraction, seed + label)
            tr_files += [found[i] for i in tr]
            te_files += [found[i] for i in te]
            tr_labels += [label] * len(tr)
            te_labels += [label] * len(te)
        splits = {
            "train": (tr_files, np.asarray(tr_labels, dtype=np.int64)),
            "test": (te_files, np.asarray(te_labels, dtype=np.int64)),
        }
    train_x = _stack_images(splits["train"][0], root)
    test_x = _stack_images(splits["test"][0], root)
    if train_x.shape[1:] != test_x.shape[1:]:
        if train_x.shape[1:3] == test_x.shape[1:3] and 3 in (train_x.shape[-1], test_x.shape[-1]):
            train_x, test_x = (
                np.repeat(x, 3, -1) if x.shape[-1] == 1 else x for x in (train_x, test_x)
            )
        else:
            raise DatasetError(
                root, f"train/test images differ: {train_x.shape[1:]} vs {test_x.shape[1:]}"
            )
    return _bundle(
        "folder",
        "folder",
        (train_x, splits["train"][1]),
        (test_x, splits["test"][1]),
        len(classes),
        classes,
        crop_padding=max(1, train_x.shape[1] // 8),
    )


# ----------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape and size of the synthetic dataset."""

    size: int = 16
    channels: int = 1
    classes: int = 4
    train: int = 1024
    test: int = 256
    seed: int = 0
    noise: float = 0.5  # noise std relative to the pattern contrast; higher is harder


def _synthetic_split(spec: SyntheticSpec, prototypes: np.ndarray, n: int,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, spec.classes, size=n)
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1, 1))
    shifts = rng.integers(-1, 2, size=(n, 2))
    x = prototypes[labels] * contrast
    x = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(x, shifts, strict=True)])
    x = x + rng.normal(0.0, spec.noise, size=x.shape)
    images = np.clip(np.rint((x * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def load_synthetic(spec: SyntheticSpec = SyntheticSpec()) -> DataBundle:
    """Deterministic, learnable data: each class is a smooth random pattern plus noise,
    small shifts and contrast changes, so a short training run beats chance clearly."""
    rng = np.random.default_rng(spec.seed)
    coarse = rng.normal(0.0, 1.0, size=(spec.classes, 4, 4, spec.channels))
    reps = -(-spec.size // 4)
    prototypes = np.kron(coarse, np.ones((1, reps, reps, 1)))[:, : spec.size, : spec.size]
    prototypes = np.tanh(prototypes)
    train = _synthetic_split(spec, prototypes, spec.train, spec.seed + 1)
    test = _synthetic_split(spec, prototypes, spec.test, spec.seed + 2)
    return _bundle(
        "synthetic",
        "synthetic",
        train,
        test,
        spec.classes,
        [f"class{i}" for i in range(spec.classes)],
    )


def parse_synthetic(options: str) -> SyntheticSpec:
    """``size=16,channels=1,classes=4,train=1024,test=256,seed=0,noise=0.5`` -> spec."""
    kwargs: dict[str, Any] = {}
    fields = SyntheticSpec.__dataclass_fields__
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"bad synthetic option {item!r}; use key=value with keys {sorted(fields)}"
            )
        kwargs[key] = float(value) if key == "noise" else int(value)
    return SyntheticSpec(**kwargs)


# ----------------------------------------------------------------------------- dispatch

DATASET_NAMES = ("fashion-mnist", "digits", "cifar10", "cifar100", "folder", "synthetic")


def detect_layout(path: str | os.PathLike) -> str:
    """Guess which loader reads the directory ``path``."""
    p = Path(path)
    if not p.is_dir():
        raise DatasetError(p, "dataset path is not a directory")
    names = {q.name for q in p.iterdir()}
    if any(n.startswith("train-images-idx3-ubyte") for n in names):
        return "fashion-mnist"
    if "data_batch_1" in names or "data_batch_1.bin" in names:
        return "cifar10"
    if {"train", "test", "meta"} <= names and (p / "train").is_file():
        return "cifar100"
    if {"train.bin", "test.bin"} <= names:
        return "cifar100"
    return "folder"


def load_dataset(spec: str) -> DataBundle:
    """Load the dataset named by ``spec`` (see the module docstring for the forms)."""
    name, sep, arg = spec.partition(":")
    key = name.lower()
    if key not in DATASET_NAMES:
        if Path(spec).exists():
            key, arg = detect_layout(spec), spec
        else:
            raise DatasetError(
                spec, f"unknown dataset (known: {', '.join(DATASET_NAMES)}, or a directory)"
            )
    if key == "fashion-mnist":
        return load_fashion_mnist(arg or None)
    if key == "digits":
        return load_digits()
    if key == "synthetic":
        return load_synthetic(parse_synthetic(arg))
    if not arg:
        raise DatasetError(None, f"dataset {key!r} needs a path: {key}:/path/to/data")
    if key in ("cifar10", "cifar100"):
        return load_cifar(arg, 10 if key == "cifar10" else 100)
    return load_image_folder(arg)
