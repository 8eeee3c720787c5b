"""The secure runtime: CrypTen's protocols between real processes over gRPC."""

from __future__ import annotations

import mpc_programs as progs
import pytest
import torch
from mpcvit.mpc.launcher import PartyFailure, run_parties

pytestmark = pytest.mark.slow

# CrypTen's fixed point has 16 fractional bits; its approximations add their own error.
TOLERANCE = {
    "exp": 2e-2, "reciprocal": 2e-2, "inv_sqrt": 3e-2, "erf": 3e-2, "softmax": 1e-2,
}


@pytest.fixture(scope="module", params=["tfp", "dealer"])
def grpc_results(request):
    return request.param, run_parties(progs.all_ops, provider=request.param, timeout=300)


def test_ops_match_plaintext(grpc_results):
    provider, results = grpc_results
    expected = progs.plaintext_ops()
    for rank, got in enumerate(results):
        for name, want in expected.items():
            tol = TOLERANCE.get(name, 1e-3)
            diff = (got[name].double() - want.double()).abs().max().item()
            rel = diff / max(1.0, want.double().abs().max().item())
            assert rel <= tol, f"{provider} rank {rank} {name}: error {diff} (tol {tol})"


def test_parties_see_the_same_revealed_values(grpc_results):
    _, (r0, r1) = grpc_results
    for name in progs.plaintext_ops():
        assert torch.equal(r0[name], r1[name]), name


def test_rounds_and_bytes_equal_gloo(grpc_results):
    provider = grpc_results[0]
    gloo = run_parties(progs.all_ops, provider=provider, backend="gloo", timeout=300)
    for rank in range(2):
        g, r = gloo[rank]["_stats"], grpc_results[1][rank]["_stats"]
        assert r["rounds"] == g["rounds"] > 0
        assert r["bytes"] == g["bytes"] > 0


@pytest.mark.parametrize("backend", ["grpc", "gloo"])
def test_session_figures_count_the_program_alone(backend):
    # crypten.init() syncs the PRNG seeds over the communicator with accounting on; the
    # session starts from zero anyway, so an idle session costs nothing ...
    for stats in run_parties(progs.idle_stats, backend=backend):
        assert stats["rounds"] == 0 and stats["bytes"] == 0
    # ... and one Beaver product is exactly one exchange (an all_reduce of x − a and
    # y − b: 2 x 8 ring elements of 8 bytes, counted sent and received, as CrypTen does).
    for stats in run_parties(progs.one_product_stats, backend=backend):
        assert stats["rounds"] == 1
        assert stats["bytes"] == 2 * (2 * progs.X.numel()) * 8


def test_dealer_results_equal_gloo_results_bit_for_bit_shape():
    # Same program under the dealer over gloo and over gRPC gives the same values
    # (up to CrypTen's probabilistic truncation, which differs with the randomness).
    grpc = run_parties(progs.small_mul, provider="dealer")
    gloo = run_parties(progs.small_mul, provider="dealer", backend="gloo")
    assert torch.allclose(grpc[0], gloo[0], atol=1e-3)
    assert torch.allclose(grpc[0], progs.X * progs.Y, atol=1e-3)


def test_killed_peer_fails_the_survivor_with_a_clear_error():
    with pytest.raises(PartyFailure) as info:
        run_parties(progs.die_midway, recv_timeout=120, timeout=200)
    errors = info.value.errors
    assert "exited with code 3" in errors[1]
    # The survivor learns from the closed stream (inbound, or its outbound link failing),
    # not from the 120 s timeout.
    assert "PeerDisconnected" in errors[0] and "party 1" in errors[0]
    assert "PeerTimeout" not in errors[0]


def test_failed_party_aborts_the_session_for_its_peer():
    with pytest.raises(PartyFailure) as info:
        run_parties(progs.fail_midway, 0, recv_timeout=120, timeout=200)
    errors = info.value.errors
    assert "this party's part failed" in errors[0]
    # The peer hears the abort (and the error's type, never its message) at once,
    # instead of waiting 120 s for a message that will not come.
    assert "PeerAborted" in errors[1] and "aborted session" in errors[1]
    assert "RuntimeError" in errors[1] and "this party's part failed" not in errors[1]
    assert "PeerTimeout" not in errors[1]


def test_silent_peer_times_out_with_a_clear_error():
    with pytest.raises(PartyFailure) as info:
        run_parties(progs.stall, 1, 8.0, recv_timeout=2.0, timeout=120)
    assert "PeerTimeout" in info.value.errors[0]
    assert "sent nothing" in info.value.errors[0]


def test_mutual_tls(tmp_path):
    from mpcvit.mpc.certs import generate_pki

    good = generate_pki(tmp_path / "good", ["party0", "party1"])
    out = run_parties(progs.small_mul, tls=[good["party0"], good["party1"]])
    assert torch.allclose(out[0], progs.X * progs.Y, atol=1e-3)

    # A party whose certificate comes from another CA is refused.
    rogue = generate_pki(tmp_path / "rogue", ["party1"])
    with pytest.raises(PartyFailure) as info:
        run_parties(progs.small_mul, tls=[good["party0"], rogue["party1"]],
                    connect_timeout=5.0, timeout=60)
    assert "PeerTimeout" in str(info.value) or "cannot reach" in str(info.value)


def test_offline_dealer_phase_removes_online_dealer_calls():
    r0, r1 = run_parties(progs.offline_phase, provider="dealer")
    want = progs.plain_mixed_work()
    for r in (r0, r1):
        assert torch.allclose(r["first"], want, atol=2e-2)
        assert torch.allclose(r["second"], want, atol=2e-2)
        assert r["online_calls"] == 0
    assert r0["tuples"] > 10
    # party 0 fetched every correction in a few batched calls; party 1 made none
    assert 1 <= r0["offline_calls"] < r0["tuples"]
    assert r1["offline_calls"] == 0


@pytest.mark.parametrize("prepared_rank", [0, 1])
def test_one_party_may_prepare_a_session_the_other_runs_online(prepared_rank):
    # The service lets each party decide alone whether to bulk-fetch a session's tuples
    # before it (party.backend): a party's tuples must not depend on that choice.
    r0, r1 = run_parties(progs.offline_phase_one_party, prepared_rank, provider="dealer")
    want = progs.plain_mixed_work()
    for r in (r0, r1):
        assert torch.allclose(r, want, atol=2e-2)


def test_launch_from_yaml_with_fixed_ports_and_mutual_tls_to_parties_and_dealer(tmp_path):
    import socket

    import yaml
    from mpcvit.mpc.certs import generate_pki
    from mpcvit.mpc.config import LaunchConfig
    from mpcvit.mpc.launcher import run_parties_from_config

    pki = generate_pki(tmp_path / "pki", ["party0", "party1", "dealer"])

    def free() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ports = [free(), free()]
    as_dict = lambda t: {"ca": t.ca, "cert": t.cert, "key": t.key}  # noqa: E731
    cfg = {
        "world_size": 2, "provider": "dealer", "host": "127.0.0.1", "ports": ports,
        "timeouts": {"connect": 20, "recv": 30, "dealer": 30},
        "tls": {"parties": [as_dict(pki["party0"]), as_dict(pki["party1"])],
                "dealer": as_dict(pki["dealer"])},
    }
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert LaunchConfig.from_yaml(path).ports == tuple(ports)
    out = run_parties_from_config(progs.ports_and_product, config=path, timeout=120)
    assert [o["port"] for o in out] == ports  # the configured ports were used
    for o in out:
        assert torch.allclose(o["product"], progs.X * progs.Y, atol=1e-3)


def test_launch_config_rejects_bad_files(tmp_path):
    from mpcvit.mpc.config import LaunchConfig
    from mpcvit.mpc.errors import ConfigError

    for text in ("provider: magic\n", "ports: [1]\n", "bogus: 1\n", "- a list\n",
                 "timeouts: {recv: -1}\n"):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError):
            LaunchConfig.from_yaml(path)
