"""Client SDK: fixed-point encoding, secret sharing, error mapping, and no torch import."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from mpcvit.party import shares
from mpcvit.party.client import (
    ClientError,
    InvalidInput,
    ModelInfo,
    ModelNotFound,
    PartyStats,
    PartyUnavailable,
    Prediction,
    RequestTimeout,
    RequestTooLarge,
    error_from_rpc,
)


def test_client_sdk_never_imports_torch_or_crypten() -> None:
    code = (
        "import sys, mpcvit.party.client, mpcvit.commands.infer; "
        "from mpcvit.party.images import load_images; "
        "from mpcvit.party.client_config import ClientConfig; "
        "load_images(['fashion-mnist:test:0']); "
        "ClientConfig.from_dict({'parties': ['a:1', 'b:2']}).client().close(); "
        "bad = [m for m in ('torch', 'crypten') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encoding_matches_crypten_within_one_unit() -> None:
    from mpcvit.mpc.compat import import_crypten

    crypten = import_crypten()
    import torch

    x = np.random.default_rng(0).normal(0, 3, size=1000).astype(np.float32)
    ours = shares.encode(x)
    theirs = crypten.encoder.FixedPointEncoder().encode(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ours - theirs)) <= 1
    decoded = crypten.encoder.FixedPointEncoder().decode(torch.from_numpy(ours)).numpy()
    np.testing.assert_allclose(decoded, shares.decode(ours), atol=1e-6)


def test_round_to_nearest_and_limits() -> None:
    scale = 1 << 16
    assert shares.encode(np.array([1.0, -1.0, 0.5 / scale * 1.01, -2.6 / scale])).tolist() == [
        scale, -scale, 1, -3]
    for bad in (np.nan, np.inf, 2.0**50):
        with pytest.raises(ValueError):
            shares.encode(np.array([bad]))


def test_shares_reconstruct_with_wraparound() -> None:
    x = np.array([[0, 1, -1, 2**62, -(2**62)]], dtype=np.int64)
    s0, s1 = shares.split(x)
    assert s0.dtype == s1.dtype == np.int64
    assert np.array_equal(shares.reconstruct([s0, s1]), x)
    # Each share alone looks random: not equal to the secret, and fresh every time.
    t0, _ = shares.split(x)
    assert not np.array_equal(s0, t0)
    assert not np.array_equal(s1, x)


def test_share_wire_format_roundtrip_and_length_check() -> None:
    s = np.arange(12, dtype=np.int64).reshape(1, 3, 4) - 6
    data = shares.to_bytes(s)
    assert len(data) == 96
    assert np.array_equal(shares.from_bytes(data, (1, 3, 4)), s)
    with pytest.raises(ValueError):
        shares.from_bytes(data[:-1], (1, 3, 4))
    with pytest.raises(ValueError):
        shares.from_bytes(data, (0, 3, 4))


def test_share_bits_are_uniform() -> None:
    # Chi-square on the top byte of many shares of a constant secret.
    s0, _ = shares.split(np.full(20000, 12345, dtype=np.int64))
    top = (s0.view(np.uint64) >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = len(top) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 dof: p(chi2 > 400) < 1e-7


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, RequestTooLarge),
    (grpc.StatusCode.NOT_FOUND, ModelNotFound),
    (grpc.StatusCode.UNAVAILABLE, PartyUnavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, RequestTimeout),
    (grpc.StatusCode.INTERNAL, ClientError),
])
def test_status_mapping(code, cls) -> None:
    err = error_from_rpc(FakeRpcError(code, "why"), party=1)
    assert type(err) is cls and err.party == 1 and err.code == code
    assert "party 1" in str(err) and "why" in str(err)


def test_preprocess_and_topk() -> None:
    info = ModelInfo("m", (1, 2, 2), 3, ("a", "b", "c"), 16, (0.5,), (0.5,), 1000, 1, ("m",))
    x = info.preprocess(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    assert x.shape == (1, 2, 2) and x.dtype == np.float32
    assert x.ravel().tolist() == [-1.0, 1.0, 1.0, -1.0]
    with pytest.raises(ValueError):
        info.preprocess(np.zeros((3, 3), np.uint8))
    stats = PartyStats(0, 1.0, 0.0, 5, 2_000_000, 1, "s")
    stats1 = PartyStats(1, 1.0, 0.0, 5, 2_100_000, 1, "s")
    p = Prediction("r", np.array([0.0, 2.0, 1.0]), info.class_names, (stats, stats1), 1.0)
    top = p.top_k(2)
    assert [t[1] for t in top] == ["b", "c"] and p.label == 1
    assert abs(sum(p.probabilities()) - 1) < 1e-12
    assert p.megabytes == 2.0 and p.rounds == 5  # party 0's count, not the sum


def test_image_files_and_fashion_mnist_specs(tmp_path) -> None:
    from mpcvit.party.images import load_images, read_image

    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    (tmp_path / "a.pgm").write_bytes(b"P5\n# comment\n28 28\n255\n" + img.tobytes())
    np.save(tmp_path / "a.npy", img)
    assert np.array_equal(read_image(tmp_path / "a.pgm"), img)
    assert np.array_equal(read_image(tmp_path / "a.npy"), img)
    with pytest.raises(ValueError):
        read_image(tmp_path / "a.txt")
    ims = load_images(["fashion-mnist:test:0-2", str(tmp_path / "a.pgm")])
    assert [im.label for im in ims] == [9, 2, 1, None]  # Ankle boot, Pullover, Trouser
    assert ims[0].pixels.shape == (28, 28) and ims[0].pixels.dtype == np.uint8
    for bad in ("fashion-mnist:test:10000", "fashion-mnist:val:1", "fashion-mnist:test:x"):
        with pytest.raises(ValueError):
            load_images([bad])
