"""What a party receives is independent of the image.

Two recording InferenceService servers stand in for the parties (real gRPC, in this
process); the real client SDK sends them two very different images many times.  The share
values each party receives must be indistinguishable between the two images (two-sample
Kolmogorov-Smirnov and chi-square tests), and uniform over the ring.  A control shows the
same tests do catch a sharing that leaks.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from mpcvit.party import shares
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc
from scipy import stats

REQUESTS_PER_IMAGE = 40


class RecordingParty(inference_pb2_grpc.InferenceServiceServicer):
    """Keeps every share it receives; answers zeros (there is no model behind it)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.received: list[np.ndarray] = []
        self.lock = threading.Lock()

    def GetModelInfo(self, request, context):  # noqa: N802
        return inference_pb2.ModelInfo(
            name="m", input_shape=[1, 28, 28], num_classes=10, precision_bits=16,
            mean=[0.2860], std=[0.3530], class_names=[str(i) for i in range(10)],
            max_request_bytes=1 << 20, max_inputs_per_request=8, party=self.rank, ready=True,
            models=["m"])

    def Infer(self, request, context):  # noqa: N802
        with self.lock:
            for it in request.inputs:
                self.received.append(shares.from_bytes(it.share, tuple(it.shape)))
        # Answer with a zero output share so the client never cancels the other call.
        return inference_pb2.InferResponse(party=self.rank, outputs=[
            inference_pb2.OutputShare(request_id=it.request_id, shape=[10],
                                      share=bytes(80), precision_bits=16)
            for it in request.inputs])


@pytest.fixture
def recorders():
    parties, servers, addrs = [], [], []
    for rank in (0, 1):
        party = RecordingParty(rank)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(party, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        parties.append(party)
        servers.append(server)
        addrs.append(f"127.0.0.1:{port}")
    yield parties, addrs
    for s in servers:
        s.stop(0)


def collect(parties, addrs, image: np.ndarray) -> list[np.ndarray]:
    for p in parties:
        p.received.clear()
    with PrivateInferenceClient(addrs, timeout=10) as client:
        for _ in range(REQUESTS_PER_IMAGE):
            client.infer(image)
    return [np.stack(p.received).reshape(-1).view(np.uint64) for p in parties]


def unit_interval(values: np.ndarray) -> np.ndarray:
    return (values >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def top_byte_counts(values: np.ndarray) -> np.ndarray:
    return np.bincount((values >> np.uint64(56)).astype(np.int64), minlength=256)


def indistinguishable(a: np.ndarray, b: np.ndarray) -> bool:
    """Neither KS nor a chi-square on the top byte tells the two samples apart (alpha 1e-4)."""
    ks = stats.ks_2samp(unit_interval(a), unit_interval(b)).pvalue
    table = np.stack([top_byte_counts(a), top_byte_counts(b)])
    chi = stats.chi2_contingency(table[:, table.sum(axis=0) > 0]).pvalue
    return ks > 1e-4 and chi > 1e-4


def test_shares_a_party_receives_do_not_depend_on_the_image(recorders) -> None:
    parties, addrs = recorders
    black = np.zeros((28, 28), np.uint8)
    white = np.full((28, 28), 255, np.uint8)
    seen_black = collect(parties, addrs, black)
    seen_white = collect(parties, addrs, white)
    for rank in (0, 1):
        a, b = seen_black[rank], seen_white[rank]
        assert len(a) == len(b) == REQUESTS_PER_IMAGE * 784
        assert indistinguishable(a, b), f"party {rank}'s shares depend on the image"
        uniform = stats.kstest(unit_interval(a), "uniform").pvalue
        assert uniform > 1e-4, f"party {rank}'s shares are not uniform"
    # The two halves do reconstruct the (very different) encoded images.
    info_black = shares.decode(shares.reconstruct(
        [seen_black[0][:784].view(np.int64), seen_black[1][:784].view(np.int64)]))
    info_white = shares.decode(shares.reconstruct(
        [seen_white[0][:784].view(np.int64), seen_white[1][:784].view(np.int64)]))
    assert np.allclose(info_black, (0 - 0.2860) / 0.3530, atol=1e-4)
    assert np.allclose(info_white, (1 - 0.2860) / 0.3530, atol=1e-4)


def test_the_same_tests_catch_a_leaky_sharing() -> None:
    """Control: 'shares' masked with too little randomness (20 bits, a plausible bug such
    as reading 3 random bytes) are detected by the same tests."""
    rng = np.random.default_rng(0)
    n = REQUESTS_PER_IMAGE * 784

    def leaky(secret: int) -> np.ndarray:
        mask = rng.integers(0, 1 << 20, n, dtype=np.uint64)
        return mask + np.uint64(secret)

    black = shares.encode(np.array((0 - 0.2860) / 0.3530)).view(np.uint64)
    white = shares.encode(np.array((1 - 0.2860) / 0.3530)).view(np.uint64)
    assert not indistinguishable(leaky(int(black)), leaky(int(white)))
