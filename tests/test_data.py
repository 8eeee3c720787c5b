"""Dataset loaders: real Fashion-MNIST IDX files, malformed inputs, CIFAR batches,
image folders, synthetic data and the numpy preprocessing a client reuses."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from mpcvit.models import data as D

FMNIST = Path(D.FASHION_MNIST_DIR)


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format (test fixture, written independently)."""
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_tiny_idx_dir(root: Path, n_train: int = 12, n_test: int = 6, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{prefix}-labels-idx1-ubyte": (np.arange(n) % 10).astype(np.uint8),
        }
        for name, arr in files.items():
            raw = idx_bytes(arr)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)


# ----------------------------------------------------------------------------- IDX


def test_real_fashion_mnist_full_splits():
    bundle = D.load_fashion_mnist(FMNIST)
    assert bundle.train.images.shape == (60000, 1, 28, 28)
    assert bundle.test.images.shape == (10000, 1, 28, 28)
    assert bundle.train.images.dtype == np.float32
    assert np.bincount(bundle.train.labels).tolist() == [6000] * 10
    assert np.bincount(bundle.test.labels).tolist() == [1000] * 10
    # the shipped constants really normalise the training split
    assert abs(float(bundle.train.images.mean())) < 1e-2
    assert abs(float(bundle.train.images.std()) - 1.0) < 1e-2
    assert bundle.num_classes == 10 and bundle.image_shape == (1, 28, 28)


def test_read_idx_real_labels_file():
    labels = D.read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert labels.max() == 9


def test_parse_idx_roundtrip_wider_dtype():
    arr = np.arange(12, dtype=">i4").reshape(3, 4)
    raw = struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 3, 4) + arr.tobytes()
    out = D.parse_idx(raw)
    assert out.tolist() == arr.tolist()


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "header truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00\x00", "payload"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x00", "payload"),
    ],
)
def test_parse_idx_rejects_malformed(raw, message):
    with pytest.raises(D.DatasetError, match=message) as info:
        D.parse_idx(raw, "bad.idx")
    assert info.value.path == "bad.idx"


def test_read_idx_corrupt_gzip_names_the_file(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3, 3), np.uint8)))[:-6])
    with pytest.raises(D.DatasetError, match="gzip") as info:
        D.read_idx(bad)
    assert str(bad) in str(info.value)


def test_fashion_mnist_missing_dir_and_file(tmp_path):
    with pytest.raises(D.DatasetError, match="not found"):
        D.load_fashion_mnist(tmp_path / "nope")
    with pytest.raises(D.DatasetError, match="missing train-images"):
        D.load_fashion_mnist(tmp_path)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    write_tiny_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(5, np.uint8)))
    )
    with pytest.raises(D.DatasetError, match="5 labels for 6 images"):
        D.load_fashion_mnist(tmp_path)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_env_override_gzip_or_raw(tmp_path, monkeypatch, gz):
    write_tiny_idx_dir(tmp_path, gz=gz)
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    bundle = D.load_dataset("fashion-mnist")
    assert len(bundle.train) == 12 and len(bundle.test) == 6
    assert bundle.test.labels.tolist() == [0, 1, 2, 3, 4, 5]


# ----------------------------------------------------------------------------- preprocess


def test_preprocess_is_numpy_and_matches_loader(tmp_path):
    write_tiny_idx_dir(tmp_path)
    raw = D.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    bundle = D.load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(D.preprocess(raw, "fashion-mnist"), bundle.train.images)
    one = D.preprocess(raw[3], "fashion-mnist")  # a single HW image
    assert one.shape == (1, 1, 28, 28) and one.dtype == np.float32
    np.testing.assert_array_equal(one[0], bundle.train.images[3])
    black = D.preprocess(np.zeros((2, 2), np.uint8), "fashion-mnist")
    assert np.allclose(black, -0.2860 / 0.3530)


def test_preprocess_colour_and_errors():
    img = np.full((32, 32, 3), 255, np.uint8)
    out = D.preprocess(img, "cifar10")
    assert out.shape == (1, 3, 32, 32)
    expected = (1 - np.array(D.NORMALIZATION["cifar10"].mean)) / np.array(
        D.NORMALIZATION["cifar10"].std
    )
    np.testing.assert_allclose(out[0, :, 0, 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        D.preprocess(img.astype(np.float32), "cifar10")
    with pytest.raises(KeyError, match="no normalisation"):
        D.preprocess(img, "imagenet")


def test_data_module_does_not_import_torch():
    """data.py itself must stay importable without torch (a client reuses preprocess)."""
    import subprocess

    code = (
        "import sys, importlib.util, numpy as np\n"
        "sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"
        f"spec = importlib.util.spec_from_file_location('standalone_data', {D.__file__!r})\n"
        "mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "print(mod.preprocess(np.zeros((28, 28), np.uint8), 'fashion-mnist').shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(1, 1, 28, 28)"


# ----------------------------------------------------------------------------- CIFAR


def write_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    """Official python-version layout: data_batch_1..5 + test_batch + batches.meta."""
    rng = np.random.default_rng(1)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [b"x.png"] * per_batch}  # fmt: skip
        with (root / name).open("wb") as f:
            pickle.dump(batch, f, protocol=2)
        written[name] = data
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
    with (root / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return written


def test_cifar10_python_batches(tmp_path):
    written = write_cifar10(tmp_path)
    bundle = D.load_dataset(f"cifar10:{tmp_path}")
    assert bundle.train.images.shape == (20, 3, 32, 32)
    assert bundle.test.images.shape == (4, 3, 32, 32)
    assert bundle.class_names[3] == "c3"
    # channel-major rows: the first 1024 bytes are the red plane, row by row
    red = written["data_batch_1"][0, :1024].reshape(32, 32)
    expect = D.preprocess(np.stack([red] * 3, axis=-1), "cifar10")[0, 0]
    np.testing.assert_allclose(bundle.train.images[0, 0], expect, rtol=1e-6)
    assert D.detect_layout(tmp_path) == "cifar10"


def test_cifar_binary_batches(tmp_path):
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rows = rng.integers(0, 256, (3, 3073), dtype=np.uint8)
        rows[:, 0] = [1, 7, 9]
        (tmp_path / name).write_bytes(rows.tobytes())
    bundle = D.load_cifar(tmp_path, 10)
    assert len(bundle.train) == 15 and bundle.test.labels.tolist() == [1, 7, 9]


def test_cifar_rejects_code_in_pickle(tmp_path):
    write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(D.DatasetError, match="refusing") as info:
        D.load_cifar(tmp_path, 10)
    assert "test_batch" in str(info.value)
    assert not marker.exists()


def test_cifar_malformed_and_missing(tmp_path):
    with pytest.raises(D.DatasetError, match="no CIFAR-10 batches"):
        D.load_cifar(tmp_path, 10)
    write_cifar10(tmp_path)
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(D.DatasetError, match="3072"):
        D.load_cifar(tmp_path, 10)
    with pytest.raises(D.DatasetError, match="needs a path"):
        D.load_dataset("cifar100")


# ----------------------------------------------------------------------------- image folder


def write_pgm(path: Path, img: np.ndarray) -> None:
    h, w = img.shape
    path.write_bytes(b"P5\n# test\n%d %d\n255\n" % (w, h) + img.tobytes())


def test_image_folder_train_test_layout_png_pgm_npy(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
                kind = ("png", "pgm", "npy")[i % 3]
                if kind == "png":
                    Image.fromarray(img).save(d / f"{i}.png")
                elif kind == "pgm":
                    write_pgm(d / f"{i}.pgm", img)
                else:
                    np.save(d / f"{i}.npy", img)
                expected[(split, cls, i)] = img
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    bundle = D.load_dataset(str(tmp_path))  # bare path: layout detected
    assert bundle.name == "folder" and bundle.class_names == ("cat", "dog")
    assert bundle.train.images.shape == (6, 1, 8, 8)
    assert bundle.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(
        bundle.test.images[3], D.preprocess(expected[("test", "dog", 1)], "folder")[0]
    )


def test_image_folder_single_root_split_is_deterministic(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            np.save(tmp_path / cls / f"{i}.npy", np.full((4, 4, 3), i * 10, np.uint8))
    first = D.load_image_folder(tmp_path)
    second = D.load_image_folder(tmp_path)
    assert len(first.train) == 8 and len(first.test) == 2
    np.testing.assert_array_equal(first.test.images, second.test.images)
    assert first.image_shape == (3, 4, 4)


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="no class sub-directories"):
        D.load_image_folder(tmp_path)
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        np.save(tmp_path / split / "a" / "0.npy", np.zeros((4, 4), np.uint8))
    np.save(tmp_path / "train" / "a" / "1.npy", np.zeros((5, 4), np.uint8))
    with pytest.raises(D.DatasetError, match="differ in size"):
        D.load_image_folder(tmp_path)
    bad = tmp_path / "x.pgm"
    bad.write_bytes(b"P2\n1 1\n255\n0")
    with pytest.raises(D.DatasetError, match="P5"):
        D.read_image(bad)


# ----------------------------------------------------------------------------- synthetic etc.


def test_synthetic_deterministic_and_configurable():
    spec = D.parse_synthetic("size=12,channels=3,classes=5,train=40,test=20,seed=7")
    a, b = D.load_synthetic(spec), D.load_synthetic(spec)
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert a.train.images.shape == (40, 3, 12, 12) and a.num_classes == 5
    assert set(np.unique(a.train.labels)) <= set(range(5))
    other = D.load_synthetic(D.SyntheticSpec(size=12, channels=3, classes=5, train=40, seed=8))
    assert not np.array_equal(a.train.images, other.train.images)
    with pytest.raises(ValueError, match="bad synthetic option"):
        D.parse_synthetic("colour=3")


def test_synthetic_classes_are_separable_by_nearest_mean():
    bundle = D.load_synthetic()
    x = bundle.train.images.reshape(len(bundle.train), -1)
    means = np.stack([x[bundle.train.labels == k].mean(0) for k in range(bundle.num_classes)])
    t = bundle.test.images.reshape(len(bundle.test), -1)
    pred = ((t[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == bundle.test.labels).mean() > 0.6  # chance is 0.25


def test_limit_is_deterministic_subset():
    bundle = D.load_synthetic()
    small = D.limit_bundle(bundle, 100, 30, seed=1)
    again = D.limit_bundle(bundle, 100, 30, seed=1)
    assert len(small.train) == 100 and len(small.test) == 30
    np.testing.assert_array_equal(small.train.labels, again.train.labels)
    assert D.limit_split(bundle.train, None) is bundle.train
    with pytest.raises(ValueError):
        D.limit_split(bundle.train, 0)


def test_unknown_dataset_and_digits():
    with pytest.raises(D.DatasetError, match="unknown dataset"):
        D.load_dataset("mnist-but-not-here")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(D.DatasetError, match="scikit-learn"):
            D.load_dataset("digits")
    else:
        bundle = D.load_dataset("digits")
        assert len(bundle.train) + len(bundle.test) == 1797
        assert bundle.image_shape == (1, 8, 8)
