"""Roles between real processes: dealer + party 0 + party 1 over mutual TLS, called with
each kind of certificate of the deployment's own PKI, as a hostile holder would.

A client certificate can neither get seeds from the dealer nor open a peer stream; a
party can act only as its own rank; parties and dealer cannot call Infer; a client
outside a party's allow-list is refused; one caller over its dealer session cap is
refused alone.  After each refusal the service still classifies.
"""

from __future__ import annotations

import re
import secrets

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from mpcvit.mpc.certs import generate_pki
from mpcvit.party.client import ClientTls, PrivateInferenceClient
from mpcvit.party.local import LocalCluster, health_status
from mpcvit.proto.generated import (
    dealer_pb2,
    dealer_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    peer_pb2,
    peer_pb2_grpc,
)

pytestmark = pytest.mark.slow

ALLOWED_CLIENTS = ["client", "alice"]
SESSIONS_PER_CALLER = 4


def tls_dict(cfg, **extra) -> dict:
    out = {k: getattr(cfg, k) for k in ("ca", "cert", "key", "client_ca") if getattr(cfg, k)}
    return {**out, **extra}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ONE CA for every certificate, as in the attack this guards against: the TLS
    handshake then admits everyone and only the roles tell them apart.  (With a client
    CA apart, `mpcvit certs`' default, a client cannot even finish a handshake with the
    dealer or as a party: tests/test_roles.py.)"""
    out = tmp_path_factory.mktemp("pki")
    configs = generate_pki(out, ["dealer", "party0", "party1", "client", "client-alice",
                                 "client-mallory"], client_ca=False)
    configs["alice"], configs["mallory"] = configs["client-alice"], configs["client-mallory"]
    return configs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki):
    c = LocalCluster(
        tmp_path_factory.mktemp("roles"), model="random:demo:0",
        # No offline preparation: between requests the parties hold no dealer session,
        # so the cap test knows what party 1 holds.
        party_overrides={"timeouts": {"pairing": 2, "request": 30, "recv": 20},
                         "limits": {"offline_sessions": 0}},
        per_party={r: {"tls": tls_dict(pki[f"party{r}"], allowed_clients=ALLOWED_CLIENTS)}
                   for r in (0, 1)},
        dealer_overrides={"tls": tls_dict(pki["dealer"]),
                          "limits": {"sessions_per_caller": SESSIONS_PER_CALLER}},
    )
    c.start()
    try:
        c.wait_ready(180, credentials=pki["client"].channel_credentials())
        yield c
    finally:
        c.stop()


def channel(cluster, who, cfg) -> grpc.Channel:
    return grpc.secure_channel(cluster.address(who), cfg.channel_credentials())


def denied(call) -> str:
    """Run ``call``; it must fail with PERMISSION_DENIED. Returns the status details."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
    return info.value.details()


def classify(cluster, cfg):
    """One private inference with ``cfg``'s client certificate."""
    tls = ClientTls(ca=cfg.ca, cert=cfg.cert, key=cfg.key)
    image = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    with PrivateInferenceClient(cluster.party_addresses, tls=tls, timeout=120) as client:
        return client.infer(image)


def fresh_session() -> str:
    return f"infer-{secrets.token_hex(16)}"


def test_a_client_certificate_gets_no_seed_and_the_service_keeps_working(cluster, pki) -> None:
    first = classify(cluster, pki["client"])
    sessions = {s.session for s in first.stats}
    assert len(sessions) == 1, sessions  # both parties ran the same session
    (seen,) = sessions
    assert re.fullmatch(r"infer-[0-9a-f]{32}", seen), seen  # 128 random bits
    with channel(cluster, "dealer", pki["client"]) as ch:
        dealer = dealer_pb2_grpc.DealerServiceStub(ch)
        # Neither a session the client just saw, nor one it names itself.
        for session in (seen, fresh_session()):
            for rank in (0, 1):
                details = denied(lambda s=session, r=rank: dealer.OpenSession(
                    dealer_pb2.OpenSessionRequest(session=s, rank=r, world_size=2),
                    timeout=10))
                assert "expected party/*" in details and "client/client" in details, details
        denied(lambda: dealer.Correction(dealer_pb2.CorrectionRequest(
            session=seen, kind="square", size0=[2]), timeout=10))
        denied(lambda: dealer.CloseSession(
            dealer_pb2.CloseSessionRequest(session=seen, rank=1), timeout=10))
    second = classify(cluster, pki["client"])
    assert second.stats[0].session != seen
    assert second.logits.shape == (10,)


def test_party_1_cannot_act_as_rank_0_at_the_dealer(cluster, pki) -> None:
    session = fresh_session()
    with channel(cluster, "dealer", pki["party1"]) as ch:
        dealer = dealer_pb2_grpc.DealerServiceStub(ch)
        details = denied(lambda: dealer.OpenSession(
            dealer_pb2.OpenSessionRequest(session=session, rank=0, world_size=2), timeout=10))
        assert "party/1, which cannot act as party/0" in details, details
        details = denied(lambda: dealer.CorrectionBatch(dealer_pb2.PrepareRequest(
            session=session, requests=[dealer_pb2.CorrectionRequest(
                session=session, kind="square", size0=[2])]), timeout=10))
        assert "party/1, which cannot act as party/0" in details, details
        denied(lambda: dealer.CloseSession(
            dealer_pb2.CloseSessionRequest(session=session, rank=0), timeout=10))
        # Control: as its own rank the same certificate is served.
        reply = dealer.OpenSession(
            dealer_pb2.OpenSessionRequest(session=session, rank=1, world_size=2), timeout=10)
        assert len(reply.seed) == 8
        # As itself it may fetch only what every party fetches (FSS keys), never party 0's
        # corrections, which complete the other parties' streams.
        details = denied(lambda: dealer.Correction(dealer_pb2.CorrectionRequest(
            session=session, kind="square", size0=[2], rank=1), timeout=10))
        assert "only party 0 receives square corrections" in details, details
        dealer.CloseSession(dealer_pb2.CloseSessionRequest(session=session, rank=1),
                            timeout=10)


def test_only_the_other_party_may_open_a_peer_stream(cluster, pki) -> None:
    hello = peer_pb2.PeerFrame(kind=peer_pb2.PeerFrame.Kind.HELLO, src=1, cluster="mpcvit",
                               incarnation="intruder")
    cases = [(0, "client", "expected party/1, the caller's certificate is client/client"),
             (1, "client", "expected party/0, the caller's certificate is client/client"),
             (1, "dealer", "expected party/0, the caller's certificate is dealer"),
             (0, "party0", "expected party/1, the caller's certificate is party/0")]
    for target, holder, message in cases:
        with channel(cluster, target, pki[holder]) as ch:
            stub = peer_pb2_grpc.PeerServiceStub(ch)
            details = denied(lambda s=stub: s.Stream(iter([hello]), timeout=10))
            assert message in details, (target, holder, details)
    assert classify(cluster, pki["client"]).logits.shape == (10,)  # the real link is intact


def test_parties_and_dealer_cannot_call_infer(cluster, pki) -> None:
    request = inference_pb2.InferRequest(inputs=[inference_pb2.InputShare(
        request_id="r" * 32, shape=[1, 28, 28], share=bytes(28 * 28 * 8))])
    for holder in ("party0", "party1", "dealer"):
        for target in (0, 1):
            with channel(cluster, target, pki[holder]) as ch:
                stub = inference_pb2_grpc.InferenceServiceStub(ch)
                details = denied(lambda s=stub: s.GetModelInfo(
                    inference_pb2.ModelInfoRequest(), timeout=10))
                assert "expected client/alice or client/client" in details, details
                denied(lambda s=stub: s.Infer(request, timeout=10))
                # Health and reflection stay open: they reveal nothing.
                services = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                    timeout=10)
                names = {s.name for r in services for s in r.list_services_response.service}
                assert "mpcvit.v1.InferenceService" in names
            assert health_status(cluster.address(target),
                                 credentials=pki[holder].channel_credentials()) == "SERVING"


def test_a_client_outside_the_allow_list_is_refused(cluster, pki) -> None:
    with channel(cluster, 0, pki["mallory"]) as ch:
        details = denied(lambda: inference_pb2_grpc.InferenceServiceStub(ch).GetModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=10))
    assert "expected client/alice or client/client, the caller's certificate is " \
           "client/mallory" in details, details
    assert classify(cluster, pki["alice"]).logits.shape == (10,)


def test_a_caller_over_its_dealer_session_cap_is_refused_alone(cluster, pki) -> None:
    opened: list[tuple[str, str]] = []
    try:
        with channel(cluster, "dealer", pki["party1"]) as ch:
            dealer = dealer_pb2_grpc.DealerServiceStub(ch)
            for _ in range(SESSIONS_PER_CALLER + 1):
                session = fresh_session()
                try:
                    dealer.OpenSession(dealer_pb2.OpenSessionRequest(
                        session=session, rank=1, world_size=2), timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                    assert "party/1@127.0.0.1 holds" in exc.details(), exc.details()
                    break
                opened.append(("party1", session))
            else:
                pytest.fail(f"the dealer let one caller open {len(opened)} sessions")
        assert 1 <= len(opened) <= SESSIONS_PER_CALLER
        # Another caller is unaffected: the table is not full, only party/1's share of it.
        with channel(cluster, "dealer", pki["party0"]) as ch:
            session = fresh_session()
            dealer_pb2_grpc.DealerServiceStub(ch).OpenSession(dealer_pb2.OpenSessionRequest(
                session=session, rank=0, world_size=2), timeout=10)
            opened.append(("party0", session))
    finally:
        for holder, session in opened:
            with channel(cluster, "dealer", pki[holder]) as ch:
                dealer_pb2_grpc.DealerServiceStub(ch).CloseSession(
                    dealer_pb2.CloseSessionRequest(session=session,
                                                   rank=int(holder[-1])), timeout=10)
    # Closed again: party 1's own sessions fit, and the service classifies.
    assert classify(cluster, pki["client"]).logits.shape == (10,)
