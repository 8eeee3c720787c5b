"""Health, probes and Prometheus metrics of real dealer and party processes.

One LocalCluster (dealer + party 0 + party 1, each its own process) with every side port
on: the plaintext probe port (grpc.health.v1 only) and the /metrics endpoint.  The
metrics are scraped over HTTP before and after requests; the health of a party whose
peer is killed must go NOT_SERVING (readiness) while its liveness stays SERVING.
"""

from __future__ import annotations

import time
import urllib.request
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.party.local import LocalCluster, free_port, health_status
from mpcvit.party.metrics import ServerMetrics
from mpcvit.party.probes import LIVENESS, mark_alive, serve_probe_port
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

WHO = ("dealer", 0, 1)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples}


def sample(page: dict, name: str, **labels: str) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


def check(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_for(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_interceptor_counts_calls_by_status_in_process() -> None:
    """A real gRPC server in this process: OK and NOT_FOUND calls are counted apart."""
    metrics = ServerMetrics("party0")
    servicer = health.HealthServicer()
    mark_alive(servicer)
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[metrics.interceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    http_port = metrics.serve("127.0.0.1", 0)
    try:
        assert check(f"127.0.0.1:{port}", LIVENESS) == "SERVING"
        assert check(f"127.0.0.1:{port}", "no.such.Service") == "NOT_FOUND"
        page = scrape(http_port)
    finally:
        metrics.stop()
        server.stop(0)
    assert sample(page, "mpcvit_requests_total", method="Check", status="OK") == 1
    assert sample(page, "mpcvit_requests_total", method="Check", status="NOT_FOUND") == 1
    assert sample(page, "mpcvit_request_seconds_count", method="Check") == 2
    assert sample(page, "mpcvit_info", role="party0") == 1


def test_probe_port_serves_only_health() -> None:
    servicer = health.HealthServicer()
    mark_alive(servicer)
    port = free_port()
    server = serve_probe_port(servicer, "127.0.0.1", port)
    try:
        assert check(f"127.0.0.1:{port}", LIVENESS) == "SERVING"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/mpcvit.v1.InferenceService/GetModelInfo")
            with pytest.raises(grpc.RpcError) as err:
                call(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ports = {who: {"metrics": free_port(), "health": free_port()} for who in WHO}

    def side(who) -> dict:
        return {"metrics": {"enabled": True, "port": ports[who]["metrics"]},
                "health_port": ports[who]["health"]}

    c = LocalCluster(tmp_path_factory.mktemp("observability"), model="random:demo:0",
                     party_overrides={"timeouts": {"pairing": 2, "request": 30}},
                     per_party={0: side(0), 1: side(1)}, dealer_overrides=side("dealer"))
    c.side_ports = ports
    c.start()
    try:
        c.wait_ready(240)
        yield c
    finally:
        c.stop()


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


@pytest.mark.slow
def test_dealer_serves_health_and_reflection(cluster) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    assert health_status(cluster.address("dealer")) == "SERVING"
    assert check(f"127.0.0.1:{cluster.side_ports['dealer']['health']}") == "SERVING"
    with grpc.insecure_channel(cluster.address("dealer")) as channel:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"mpcvit.v1.DealerService", "grpc.health.v1.Health"} <= names


@pytest.mark.slow
def test_metrics_move_after_requests(cluster) -> None:
    port = {who: cluster.side_ports[who]["metrics"] for who in WHO}
    before = {who: scrape(port[who]) for who in WHO}
    with PrivateInferenceClient(cluster.party_addresses, timeout=120) as client:
        client.infer(image())
    wrong_shape = inference_pb2.InferRequest(inputs=[inference_pb2.InputShare(
        request_id="bad-shape", shape=[3, 28, 28], share=bytes(3 * 28 * 28 * 8))])
    for address in cluster.party_addresses:
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as err:
                inference_pb2_grpc.InferenceServiceStub(channel).Infer(wrong_shape, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {who: scrape(port[who]) for who in WHO}
    for rank in (0, 1):
        b, a = before[rank], after[rank]
        ok = ("mpcvit_requests_total", {"method": "Infer", "status": "OK"})
        bad = ("mpcvit_requests_total", {"method": "Infer", "status": "INVALID_ARGUMENT"})
        assert sample(a, ok[0], **ok[1]) == sample(b, ok[0], **ok[1]) + 1, rank
        assert sample(a, bad[0], **bad[1]) == sample(b, bad[0], **bad[1]) + 1, rank
        assert (sample(a, "mpcvit_request_seconds_count", method="Infer")
                == sample(b, "mpcvit_request_seconds_count", method="Infer") + 2)
        assert (sample(a, "mpcvit_request_rounds_count")
                == sample(b, "mpcvit_request_rounds_count") + 1)
        assert sample(a, "mpcvit_request_rounds_sum") > sample(b, "mpcvit_request_rounds_sum")
        assert sample(a, "mpcvit_request_bytes_sum") > sample(b, "mpcvit_request_bytes_sum")
        assert sample(a, "mpcvit_ready") == 1 and sample(a, "mpcvit_queue_depth") == 0
        assert ("mpcvit_prepared_sessions", ()) in a
    d_before, d_after = before["dealer"], after["dealer"]
    assert (sample(d_after, "mpcvit_requests_total", method="OpenSession", status="OK")
            > sample(d_before, "mpcvit_requests_total", method="OpenSession", status="OK"))
    assert sample(d_after, "mpcvit_dealer_weight_masks") > 0
    assert ("mpcvit_dealer_open_sessions", ()) in d_after


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_party_without_its_peer_is_not_serving_but_alive(cluster, victim) -> None:
    survivor = 1 - victim
    probe = f"127.0.0.1:{cluster.side_ports[survivor]['health']}"
    assert health_status(cluster.address(survivor)) == "SERVING"
    cluster.kill(victim)
    try:
        assert wait_for(lambda: health_status(cluster.address(survivor)) == "NOT_SERVING"), \
            cluster.logs(survivor)
        # The same status on the plaintext probe port; liveness is unaffected.
        assert check(probe) == "NOT_SERVING"
        assert check(probe, "mpcvit.v1.InferenceService") == "NOT_SERVING"
        assert check(probe, LIVENESS) == "SERVING"
        page = scrape(cluster.side_ports[survivor]["metrics"])
        assert sample(page, "mpcvit_ready") == 0
    finally:
        cluster.restart(victim)
    cluster.wait_ready(240)
    assert check(probe) == "SERVING"
    with PrivateInferenceClient(cluster.party_addresses, timeout=120) as client:
        assert client.infer(image()).logits.shape == (10,)
