"""The client's pair pool: pair lists, DNS enumeration, health over real gRPC, and
fail-over before any share is sent.  Pools over real party pairs run in
tests/test_k8s_pairs.py (slow)."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from mpcvit.party.client import NotAParty, PartyUnreachable, health_check
from mpcvit.party.client_config import ClientConfig
from mpcvit.party.local import free_port
from mpcvit.party.metrics import ServerMetrics
from mpcvit.party.pool import NoPairServing, PairPool, PairSource, parse_pairs


def test_pair_lists_parse() -> None:
    assert parse_pairs("a:1,b:2; c:3,d:4;") == [("a:1", "b:2"), ("c:3", "d:4")]
    for bad in ("a:1", "a:1,b:2,c:3", "a:1,;c:3,d:4", " ; "):
        with pytest.raises(ValueError):
            parse_pairs(bad)
    source = PairSource.parse([["a:1", "b:2"], ("c:3", "d:4")])
    assert source.fixed == (("a:1", "b:2"), ("c:3", "d:4")) and not source.dynamic
    assert source.resolve() == [(0, ("a:1", "b:2")), (1, ("c:3", "d:4"))]
    with pytest.raises(ValueError):
        PairSource.parse(["a:1", "b:2"])  # one pair written flat
    with pytest.raises(ValueError, match="ordinal"):
        PairSource.parse("dns:p0-0.x:1,p1-{ordinal}.x:1")
    assert PairSource.parse("dns:a-{ordinal}:1,b-{ordinal}:2").describe() == \
        "dns:a-{ordinal}:1,b-{ordinal}:2"


def test_dns_pattern_enumerates_the_replicas_that_resolve() -> None:
    """Pair k exists while both names resolve; one missing ordinal (a replica being
    recreated) does not end the list, two in a row do."""
    p0 = "mpcvit-party0-{ordinal}.mpcvit-party0.mpcvit-party0.svc.cluster.local:50051"
    p1 = "mpcvit-party1-{ordinal}.mpcvit-party1.mpcvit-party1.svc.cluster.local:50051"
    source = PairSource.parse(f"dns:{p0},{p1}")
    live = {"mpcvit-party0-0", "mpcvit-party1-0", "mpcvit-party0-2", "mpcvit-party1-2",
            "mpcvit-party0-1", "mpcvit-party0-3", "mpcvit-party1-3", "mpcvit-party0-6",
            "mpcvit-party1-6"}
    asked = []

    def resolver(host: str) -> bool:
        asked.append(host)
        return host.split(".", 1)[0] in live

    found = source.resolve(resolver)
    assert [k for k, _ in found] == [0, 2, 3]  # 1 lacks party 1; 4 and 5 end it
    assert found[1][1] == (p0.replace("{ordinal}", "2"), p1.replace("{ordinal}", "2"))
    assert not any("-6." in h for h in asked)
    # The system resolver, capped by max_pairs: numeric and local names always resolve.
    local = PairSource(pattern=("localhost:1{ordinal}", "127.0.0.1:2{ordinal}"), max_pairs=3)
    assert [pair for _, pair in local.resolve()][-1] == ("localhost:12", "127.0.0.1:22")


@pytest.fixture
def health_server():
    """A real gRPC server with the standard health service and a metrics interceptor
    that counts every call it gets (by method)."""
    servicer = health.HealthServicer()
    metrics = ServerMetrics("party0")
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[metrics.interceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer, metrics
    server.stop(0)


def calls(metrics: ServerMetrics, method: str) -> float:
    return sum(metrics.registry.get_sample_value(
        "mpcvit_requests_total", {"method": method, "status": s}) or 0.0
        for s in ("OK", "UNIMPLEMENTED", "NOT_FOUND"))


def test_hand_encoded_health_check_reads_the_standard_service(health_server) -> None:
    address, servicer, _ = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("mpcvit.v1.InferenceService", health_pb2.HealthCheckResponse.NOT_SERVING)
    with grpc.insecure_channel(address) as channel:
        assert health_check(channel) == "SERVING"
        assert health_check(channel, "mpcvit.v1.InferenceService") == "NOT_SERVING"
        assert health_check(channel, "no.such.Service") == "NOT_FOUND"
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as channel:
        assert health_check(channel, timeout=5) == "UNAVAILABLE"


def test_pool_skips_pairs_that_do_not_serve_before_sending_shares(health_server) -> None:
    """A pair whose party reports NOT_SERVING and a pair where nothing listens are both
    skipped: the request fails with NoPairServing naming each, and no Infer reached the
    server that answered health."""
    address, servicer, metrics = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    dead = f"127.0.0.1:{free_port()}"
    with PairPool([[address, address], [dead, dead]], recheck=60) as pool:
        with pytest.raises(NoPairServing) as err:
            pool.infer(b"P5\n1 1\n255\n\x00")
        message = str(err.value)
        assert "pair 0" in message and "NOT_SERVING" in message
        assert "pair 1" in message and "UNAVAILABLE" in message
        assert all(p["down"] for p in pool.pairs())
        assert all(p["in_flight"] == 0 and p["served"] == 0 for p in pool.pairs())
    assert calls(metrics, "Check") >= 2 and calls(metrics, "Infer") == 0
    assert calls(metrics, "GetModelInfo") == 0


def test_pool_wait_ready_names_unreachable_pairs_and_foreign_servers(health_server) -> None:
    address, servicer, _ = health_server
    dead = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    with PairPool(f"{dead[0]},{dead[1]};{dead[2]},{dead[3]}") as pool:
        with pytest.raises(PartyUnreachable) as err:
            pool.wait_ready(600, connect_timeout=2)
    assert "pair 0" in str(err.value) and "pair 1" in str(err.value)
    assert "Connection refused" in str(err.value)
    # A gRPC server that is not a party (no InferenceService) is named at once.
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    with PairPool([[dead[0], dead[1]], [address, address]]) as pool:
        with pytest.raises(NotAParty):
            pool.wait_ready(600, connect_timeout=2)


def test_client_config_pairs() -> None:
    env: dict[str, str] = {}
    config = ClientConfig.from_dict({"pairs": [["a:1", "b:2"], ["c:3", "d:4"]]}, env)
    assert config.parties == () and config.pairs.fixed == (("a:1", "b:2"), ("c:3", "d:4"))
    config = ClientConfig.from_dict({"pairs": "dns:a-{ordinal}:1,b-{ordinal}:2"}, env)
    assert config.pairs.pattern == ("a-{ordinal}:1", "b-{ordinal}:2")
    single = ClientConfig.from_dict({"parties": ["a:1", "b:2"]}, env)
    assert single.pairs is None and single.parties == ("a:1", "b:2")
    assert single.with_pairs("e:5,f:6").pairs.fixed == (("e:5", "f:6"),)
    assert single.with_pairs(None) is single
    over = ClientConfig.from_dict({"parties": ["a:1", "b:2"]}, {"MPCVIT_PAIRS": "e:5,f:6"})
    assert over.parties == () and over.pairs.fixed == (("e:5", "f:6"),)
    for bad in ({"parties": ["a:1", "b:2"], "pairs": [["c:3", "d:4"]]}, {"pairs": "a:1"},
                {"pairs": 7}, {}):
        with pytest.raises(ValueError):
            ClientConfig.from_dict(bad, env)
    with pytest.raises(ValueError):
        ClientConfig.from_dict({}, {"MPCVIT_PAIRS": "a:1,b:2", "MPCVIT_PARTIES": "a:1,b:2"})


def test_pool_is_torch_free_and_built_from_the_config() -> None:
    code = (
        "import sys; from mpcvit.party.client_config import ClientConfig; "
        "from mpcvit.party.pool import PairPool; "
        "pool = ClientConfig.from_dict({'pairs': 'a:1,b:2;c:3,d:4'}, env={}).client(); "
        "assert isinstance(pool, PairPool) and len(pool.pairs()) == 2; pool.close(); "
        "bad = [m for m in ('torch', 'crypten') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_infer_cli_pairs(tmp_path) -> None:
    from mpcvit.commands.infer import EXIT_PARTIES, EXIT_USAGE

    cli = [sys.executable, "-m", "mpcvit.commands", "infer"]
    dead = [f"127.0.0.1:{free_port()}" for _ in range(4)]
    config = tmp_path / "client.yaml"
    config.write_text("parties: [x:1, y:2]\nconnect_timeout: 1\nwait_ready: 600\n")
    pairs = f"{dead[0]},{dead[1]};{dead[2]},{dead[3]}"
    proc = subprocess.run([*cli, "--config", str(config), "--pairs", pairs,
                           "fashion-mnist:test:0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_PARTIES, proc.stderr
    assert "Traceback" not in proc.stderr and dead[0] in proc.stderr and dead[2] in proc.stderr
    assert "x:1" not in proc.stderr  # --pairs replaced the config's parties
    for argv in (["--pairs", "a:1", "x.png"], ["x.png"]):
        proc = subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr, proc.stderr


def test_bench_throughput_pairs_needs_the_one_pair_baseline(capsys) -> None:
    from mpcvit.commands import main

    assert main(["bench", "throughput", "--pairs", "2,4"]) == 2
    assert "--pairs needs 1" in capsys.readouterr().err
