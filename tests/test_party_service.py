"""End-to-end tests of the two-party service: real processes, real gRPC, real CrypTen.

One cluster (dealer + party 0 + party 1, each its own process) serves most tests; it
runs an untrained demo ViT (saved as a checkpoint here) so the expected logits can be
recomputed in plaintext.  Bad input and a request sent to only one party must produce clear statuses
and leave both parties serving.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
from mpcvit.party.client import (
    InvalidInput,
    ModelNotFound,
    PrivateInferenceClient,
    RequestTooLarge,
)
from mpcvit.party.local import LocalCluster, health_status
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

IMAGE_BYTES = 28 * 28 * 8


HEAD_GAIN = 40.0  # spreads an untrained model's logits so that images are told apart
ATOL = 0.1


def make_model():
    """An untrained demo ViT whose logits differ clearly between images."""
    import torch
    from mpcvit.models.vit import build_model

    torch.manual_seed(0)
    model = build_model("demo").eval()
    with torch.no_grad():
        model.head.weight.mul_(HEAD_GAIN)
    return model


@pytest.fixture(scope="module")
def plain_model():
    return make_model()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, plain_model):
    from mpcvit.models.checkpoint import save_checkpoint

    work = tmp_path_factory.mktemp("cluster")
    save_checkpoint(plain_model, work / "model.pt", extra={"dataset": "fashion-mnist"})
    c = LocalCluster(
        work, model=str(work / "model.pt"),
        party_overrides={
            "model_name": "demo",
            "timeouts": {"pairing": 2, "request": 20},
            "limits": {"max_request_bytes": 2 * IMAGE_BYTES + 100, "max_batch": 2},
        },
    )
    c.start()
    try:
        c.wait_ready(180)
        yield c
    finally:
        codes = c.stop()
        # Graceful shutdown on SIGTERM: every process exits cleanly.
        assert codes == {"dealer": 0, 0: 0, 1: 0}, codes


def fashion_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    from mpcvit.party.images import load_images

    ims = load_images([f"fashion-mnist:test:0-{n - 1}"])
    return np.stack([im.pixels for im in ims]), np.array([im.label for im in ims])


def plaintext_logits(model, info, pixels: np.ndarray) -> np.ndarray:
    import torch

    x = np.stack([info.preprocess(p) for p in pixels])
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def stub(address: str) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))


def raw_request(rid: str, shape=(1, 28, 28), nbytes: int | None = None, model: str = ""):
    n = int(np.prod(shape)) * 8 if nbytes is None else nbytes
    return inference_pb2.InferRequest(model=model, inputs=[
        inference_pb2.InputShare(request_id=rid, shape=list(shape), share=bytes(n))])


def status_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_health_reflection_and_model_info(cluster) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for addr in cluster.party_addresses:
        assert health_status(addr) == "SERVING"
        channel = grpc.insecure_channel(addr)
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert "mpcvit.v1.InferenceService" in names and "grpc.health.v1.Health" in names
    with PrivateInferenceClient(cluster.party_addresses) as client:
        info = client.model_info()
    assert info.input_shape == (1, 28, 28) and info.num_classes == 10
    assert info.precision_bits == 16 and info.class_names[9] == "Ankle boot"


def test_private_inference_matches_plaintext(cluster, plain_model) -> None:
    pixels, _ = fashion_images(3)
    with PrivateInferenceClient(cluster.party_addresses, timeout=120) as client:
        info = client.model_info()
        single = client.infer(pixels[0])
        batch = client.infer_batch(list(pixels[1:3]))
    expected = plaintext_logits(plain_model, info, pixels)
    got = np.stack([single.logits] + [p.logits for p in batch])
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    assert single.rounds > 0 and single.megabytes > 0
    assert {s.batch_size for p in batch for s in p.stats} == {2}  # one session, two images
    assert single.stats[0].session == single.stats[1].session


@pytest.mark.parametrize("shape, nbytes, code", [
    ((1, 28, 27), None, grpc.StatusCode.INVALID_ARGUMENT),      # wrong shape
    ((1, 28, 28), IMAGE_BYTES - 8, grpc.StatusCode.INVALID_ARGUMENT),  # truncated share
    ((1, 28, 28), IMAGE_BYTES + 4, grpc.StatusCode.INVALID_ARGUMENT),  # not int64-sized
    ((3, 28, 28), None, grpc.StatusCode.RESOURCE_EXHAUSTED),    # over the size limit
])
def test_malformed_shares_are_rejected(cluster, shape, nbytes, code) -> None:
    for addr in cluster.party_addresses:
        assert status_of(lambda a=addr: stub(a).Infer(raw_request("bad1", shape, nbytes),
                                                      timeout=10)) == code


def test_bad_request_id_unknown_model_and_too_many_inputs(cluster) -> None:
    p0 = stub(cluster.address(0))
    assert status_of(lambda: p0.Infer(raw_request("no spaces"), timeout=10)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: p0.Infer(raw_request("x", model="resnet"), timeout=10)) == \
        grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: p0.GetModelInfo(inference_pb2.ModelInfoRequest(model="resnet"),
                                             timeout=10)) == grpc.StatusCode.NOT_FOUND
    req = inference_pb2.InferRequest(inputs=[])
    assert status_of(lambda: p0.Infer(req, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    with PrivateInferenceClient(cluster.party_addresses, model="resnet") as client:
        with pytest.raises(ModelNotFound):
            client.model_info()
    with PrivateInferenceClient(cluster.party_addresses) as client:
        # The SDK splits a batch larger than the advertised request limit into calls.
        preds = client.infer_batch([np.zeros((28, 28), np.uint8)] * 3)
        assert [p.stats[0].batch_size for p in preds] == [2, 2, 1]
        # ModelInfo reports both image limits: per request, and per secure session.
        info = client.model_info()
        assert (info.max_inputs_per_request, info.max_session_batch) == (64, 2)
        # A picture of another size is converted locally; one that cannot be is refused
        # locally (InvalidInput) before anything is sent.
        assert client.infer(np.zeros((27, 28), np.uint8)).logits.shape == (10,)
        with pytest.raises(InvalidInput, match="shape"):
            client.infer(np.zeros((2, 3, 4, 5), np.uint8))
    with PrivateInferenceClient(cluster.party_addresses) as client:
        client.model_info()
        client._info[""] = replace(client._info[""], max_request_bytes=0,
                                   max_inputs_per_request=0)
        with pytest.raises(RequestTooLarge):  # a client ignoring the limits is refused
            client.infer_batch([np.zeros((28, 28), np.uint8)] * 3)


def test_half_sent_to_one_party_times_out_and_service_continues(cluster, plain_model) -> None:
    p0, p1 = stub(cluster.address(0)), stub(cluster.address(1))
    # Only party 0 gets it: party 1 never finds its half within the pairing timeout.
    assert status_of(lambda: p0.Infer(raw_request("only-p0"), timeout=30)) == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    # Only party 1 gets it: the client's own deadline ends the wait.
    assert status_of(lambda: p1.Infer(raw_request("only-p1"), timeout=3)) == \
        grpc.StatusCode.DEADLINE_EXCEEDED
    # Mismatched ids: each party holds a half nobody pairs with.
    codes = {}

    def send(name, s, rid, timeout):
        try:
            s.Infer(raw_request(rid), timeout=timeout)
        except grpc.RpcError as exc:
            codes[name] = exc.code()

    threads = [threading.Thread(target=send, args=("p0", p0, "id-a", 30)),
               threading.Thread(target=send, args=("p1", p1, "id-b", 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == {"p0": grpc.StatusCode.DEADLINE_EXCEEDED,
                     "p1": grpc.StatusCode.DEADLINE_EXCEEDED}
    # Both parties still serve a proper request.
    pixels, _ = fashion_images(1)
    with PrivateInferenceClient(cluster.party_addresses) as client:
        got = client.infer(pixels[0]).logits
        expected = plaintext_logits(plain_model, client.model_info(), pixels)[0]
    np.testing.assert_allclose(got, expected, atol=ATOL)


def test_duplicate_pending_id_is_rejected(cluster) -> None:
    p1 = stub(cluster.address(1))
    first = p1.Infer.future(raw_request("dup-id"), timeout=4)
    try:
        import time

        time.sleep(0.5)  # let the first half be queued (its own deadline ends it)
        assert status_of(lambda: p1.Infer(raw_request("dup-id"), timeout=10)) == \
            grpc.StatusCode.ALREADY_EXISTS
    finally:
        with pytest.raises(grpc.RpcError):
            first.result()


def test_logs_never_contain_share_or_output_values(cluster) -> None:
    import re

    with PrivateInferenceClient(cluster.party_addresses) as client:
        pred = client.infer(np.full((1, 28, 28), 0.123456, dtype=np.float64))
    text = cluster.logs(0, tail=10_000) + cluster.logs(1, tail=10_000)
    assert "event=session_done" in text and "event=infer_done" in text
    # Shares are uniform int64s (about 19 digits); no such number may appear in a log.
    assert not re.search(r"\d{15,}", text)
    for v in pred.logits:
        assert f"{v:.5f}" not in text


def test_concurrent_clients_are_queued_and_never_mixed(cluster, plain_model) -> None:
    pixels, _ = fashion_images(4)
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            with PrivateInferenceClient(cluster.party_addresses, timeout=120) as client:
                results[i] = client.infer(pixels[i]).logits
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    with PrivateInferenceClient(cluster.party_addresses) as client:
        expected = plaintext_logits(plain_model, client.model_info(), pixels)
    # The images' logits differ by far more than the tolerance, so a mix-up would show.
    assert min(np.abs(expected[i] - expected[j]).max()
               for i in range(4) for j in range(i + 1, 4)) > 2 * ATOL
    for i in range(4):
        np.testing.assert_allclose(results[i], expected[i], atol=ATOL)
