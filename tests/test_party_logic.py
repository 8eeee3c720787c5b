"""Plain-logic tests of the party service: pairing queue and leader/follower protocol.

No network and no CrypTen here: the coordinator runs over an in-memory control channel
and a stand-in backend that adds a public offset to each share (the real protocol is
covered by the multi-process tests in test_party_service.py).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pytest
from mpcvit.party.coordinator import ChannelDown, ChannelTimeout, Follower, Leader
from mpcvit.party.pairing import (
    InferenceQueue,
    PendingRequest,
    ServiceError,
    SessionStats,
    check_request_id,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def half(rid: str, value: int = 0, model: str = "m", shape=(1, 2, 2)) -> PendingRequest:
    return PendingRequest(rid, model, np.full(shape, value, dtype=np.int64))


def test_request_id_rules() -> None:
    check_request_id("abc-123_x.y:z")
    for bad in ("", "a" * 129, "white space", "é", "a/b"):
        with pytest.raises(ServiceError) as err:
            check_request_id(bad)
        assert err.value.status == "INVALID_ARGUMENT"


def test_submit_rejects_duplicates_and_overflow() -> None:
    q = InferenceQueue(request_timeout=10, max_pending=3)
    q.submit([half("a")])
    with pytest.raises(ServiceError) as err:
        q.submit([half("a")])
    assert err.value.status == "ALREADY_EXISTS"
    with pytest.raises(ServiceError) as err:
        q.submit([half("b"), half("b")])
    assert err.value.status == "INVALID_ARGUMENT"
    with pytest.raises(ServiceError) as err:
        q.submit([half("c"), half("d"), half("e")])
    assert err.value.status == "RESOURCE_EXHAUSTED"
    assert len(q) == 1  # all-or-nothing


def test_next_batch_is_fifo_and_groups_one_model() -> None:
    q = InferenceQueue(request_timeout=10)
    q.submit([half("a"), half("b", model="other"), half("c"), half("d")])
    batch = q.next_batch(max_batch=2, max_wait=0, timeout=0.1)
    assert [it.request_id for it in batch] == ["a", "c"]
    batch = q.next_batch(max_batch=8, max_wait=0, timeout=0.1)
    assert [it.request_id for it in batch] == ["b"]
    assert [it.request_id for it in q.next_batch(8, 0, 0.1)] == ["d"]
    assert q.next_batch(8, 0, 0.05) == []


def test_next_batch_waits_for_fill() -> None:
    q = InferenceQueue(request_timeout=10)
    q.submit([half("a")])
    threading.Timer(0.05, lambda: q.submit([half("b")])).start()
    batch = q.next_batch(max_batch=2, max_wait=5.0, timeout=0.1)
    assert [it.request_id for it in batch] == ["a", "b"]


def test_take_waits_for_late_half_and_reports_missing() -> None:
    q = InferenceQueue(request_timeout=10)
    q.submit([half("a")])
    threading.Timer(0.05, lambda: q.submit([half("b")])).start()
    found, missing = q.take(["a", "b", "zz"], timeout=0.5)
    assert [it.request_id for it in found] == ["a", "b"]
    assert missing == ["zz"]
    assert len(q) == 0


def test_expire_and_cancel_fail_futures_with_status() -> None:
    clock = FakeClock()
    q = InferenceQueue(request_timeout=5, clock=clock)
    a, b = half("a"), half("b")
    q.submit([a])
    clock.now = 3
    q.submit([b])
    clock.now = 6
    assert q.expire() == 1
    assert a.future.exception().status == "DEADLINE_EXCEEDED"
    assert not b.future.done()
    q.cancel(["b"])
    assert b.future.exception().status == "CANCELLED"
    assert len(q) == 0


def test_requeue_front_keeps_order() -> None:
    q = InferenceQueue(request_timeout=10)
    q.submit([half("a"), half("b"), half("c")])
    batch = q.next_batch(2, 0, 0.1)
    q.requeue_front(batch)
    assert [it.request_id for it in q.next_batch(3, 0, 0.1)] == ["a", "b", "c"]


# --------------------------------------------------------------- leader/follower protocol


class Pipe:
    """One direction of an in-memory control link."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.down = False


class Channel:
    def __init__(self, out: Pipe, inp: Pipe) -> None:
        self.out, self.inp = out, inp

    def send(self, msg):
        if self.out.down:
            raise ChannelDown("link down")
        self.out.q.put(dict(msg))

    def recv(self, timeout):
        if self.inp.down:
            raise ChannelDown("link down")
        try:
            return self.inp.q.get(timeout=timeout)
        except queue.Empty:
            raise ChannelTimeout("idle") from None


class OffsetBackend:
    """Party p returns share + p*1000 per element: their sum is input + 1000 (checkable)."""

    precision_bits = 16

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.weights_sessions: list[str] = []
        self.infer_sessions: list[tuple[str, int]] = []
        self.fail_next = False
        self.refuse = False

    def public_model(self):
        return {"name": "m"}

    def load_public_model(self, meta):
        if self.refuse:
            raise ValueError("different code")
        assert meta == {"name": "m"}

    def share_weights(self, session):
        self.weights_sessions.append(session)

    def infer(self, session, inputs):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("secret details must not leak")
        self.infer_sessions.append((session, len(inputs)))
        out = inputs.reshape(len(inputs), -1)[:, :3] + self.rank * 1000
        return out, SessionStats(session, 0.01, 7, 100, len(inputs))


def make_pair(max_batch=4, pairing_timeout=0.5):
    a, b = Pipe(), Pipe()
    q0, q1 = InferenceQueue(request_timeout=30), InferenceQueue(request_timeout=30)
    b0, b1 = OffsetBackend(0), OffsetBackend(1)
    leader = Leader(q0, Channel(a, b), b0, pairing_timeout=pairing_timeout,
                    max_batch=max_batch, poll_interval=0.05, retry_interval=0.05)
    follower = Follower(q1, Channel(b, a), b1, pairing_timeout=pairing_timeout,
                        poll_interval=0.05, hello_interval=0.05)
    threads = [threading.Thread(target=x.run_forever, daemon=True) for x in (leader, follower)]
    for t in threads:
        t.start()
    return leader, follower, (a, b), threads


def stop(leader, follower, threads):
    leader.stop()
    follower.stop()
    for t in threads:
        t.join(5)


def test_protocol_pairs_halves_and_batches() -> None:
    leader, follower, _, threads = make_pair()
    try:
        halves0 = [half(f"r{i}", value=i) for i in range(3)]
        halves1 = [half(f"r{i}", value=10 * i) for i in range(3)]
        follower.queue.submit(halves1)  # follower's halves may arrive first
        leader.queue.submit(halves0)
        for h0, h1, i in zip(halves0, halves1, range(3), strict=True):
            r0, r1 = h0.future.result(5), h1.future.result(5)
            assert r0.request_id == r1.request_id == f"r{i}"
            assert (r0.share + r1.share).tolist() == [11 * i + 1000] * 3
            assert r0.stats.session == r1.stats.session
        assert len(follower.backend.weights_sessions) == 1
        assert follower.backend.weights_sessions == leader.backend.weights_sessions
        assert leader.backend.infer_sessions == follower.backend.infer_sessions
        assert leader.ready and follower.ready
    finally:
        stop(leader, follower, threads)


def test_half_sent_to_leader_only_times_out_and_next_request_works() -> None:
    leader, follower, _, threads = make_pair(max_batch=1, pairing_timeout=0.2)
    try:
        lonely = half("lonely")
        leader.queue.submit([lonely])
        err = lonely.future.exception(5)
        assert isinstance(err, ServiceError) and err.status == "DEADLINE_EXCEEDED"
        h0, h1 = half("next", 1), half("next", 2)
        follower.queue.submit([h1])
        leader.queue.submit([h0])
        assert (h0.future.result(5).share + h1.future.result(5).share).tolist() == [1003] * 3
    finally:
        stop(leader, follower, threads)


def test_mismatched_model_is_invalid_at_both_parties() -> None:
    leader, follower, _, threads = make_pair(max_batch=1)
    try:
        h0, h1 = half("x", model="m"), half("x", model="other")
        follower.queue.submit([h1])
        leader.queue.submit([h0])
        assert h0.future.exception(5).status == "INVALID_ARGUMENT"
        assert h1.future.exception(5).status == "INVALID_ARGUMENT"
    finally:
        stop(leader, follower, threads)


def test_session_error_reaches_both_clients_without_details() -> None:
    leader, follower, _, threads = make_pair(max_batch=1)
    try:
        leader.backend.fail_next = True
        follower.backend.fail_next = True
        h0, h1 = half("x"), half("x")
        follower.queue.submit([h1])
        leader.queue.submit([h0])
        for h in (h0, h1):
            err = h.future.exception(5)
            assert err.status == "ABORTED"
            assert "secret" not in err.message
        # The service keeps going.
        g0, g1 = half("y"), half("y")
        follower.queue.submit([g1])
        leader.queue.submit([g0])
        assert g0.future.result(5).share.tolist() == [0, 0, 0]
    finally:
        stop(leader, follower, threads)


def test_restarted_follower_gets_weights_again() -> None:
    leader, follower, pipes, threads = make_pair(max_batch=1)
    try:
        h0, h1 = half("a"), half("a")
        follower.queue.submit([h1])
        leader.queue.submit([h0])
        h0.future.result(5)
        # Replace the follower with a fresh one (no weights), as after a restart.
        follower.stop()
        threads[1].join(5)
        a, b = pipes
        fresh = Follower(InferenceQueue(request_timeout=30), Channel(b, a), OffsetBackend(1),
                         pairing_timeout=0.5, poll_interval=0.05, hello_interval=0.05)
        t = threading.Thread(target=fresh.run_forever, daemon=True)
        t.start()
        threads[1] = t
        # The fresh follower says hello; the idle leader re-shares without any request.
        for _ in range(500):
            if fresh.ready:
                break
            threading.Event().wait(0.01)
        assert fresh.ready and len(fresh.backend.weights_sessions) == 1
        g0, g1 = half("b", 5), half("b", 6)
        fresh.queue.submit([g1])
        leader.queue.submit([g0])
        assert (g0.future.result(5).share + g1.future.result(5).share).tolist() == [1011] * 3
        assert len(fresh.backend.weights_sessions) == 1
        assert len(leader.backend.weights_sessions) == 2
        follower = fresh
    finally:
        stop(leader, follower, threads)


def test_peer_down_fails_queued_requests_as_unavailable() -> None:
    leader, follower, pipes, threads = make_pair(max_batch=1)
    try:
        h0, h1 = half("a"), half("a")
        follower.queue.submit([h1])
        leader.queue.submit([h0])
        h0.future.result(5)
        pipes[0].down = True  # leader -> follower link breaks
        lost = half("lost")
        leader.queue.submit([lost])
        assert lost.future.exception(5).status == "UNAVAILABLE"
        pipes[0].down = False
        for _ in range(500):  # the leader re-shares the weights once the link is back
            if leader.ready:
                break
            threading.Event().wait(0.01)
        assert leader.ready
        g0, g1 = half("c"), half("c")
        follower.queue.submit([g1])
        leader.queue.submit([g0])
        assert g0.future.result(5).request_id == "c"
    finally:
        stop(leader, follower, threads)


def test_follower_refusing_the_model_fails_requests_clearly() -> None:
    a, b = Pipe(), Pipe()
    q0 = InferenceQueue(request_timeout=30)
    refusing = OffsetBackend(1)
    refusing.refuse = True
    leader = Leader(q0, Channel(a, b), OffsetBackend(0), pairing_timeout=0.5, max_batch=1,
                    poll_interval=0.05, retry_interval=0.05)
    follower = Follower(InferenceQueue(request_timeout=30), Channel(b, a), refusing,
                        pairing_timeout=0.5, poll_interval=0.05, hello_interval=0.05)
    threads = [threading.Thread(target=x.run_forever, daemon=True) for x in (leader, follower)]
    for t in threads:
        t.start()
    try:
        h = half("x")
        leader.queue.submit([h])
        err = h.future.exception(5)
        assert err.status == "UNAVAILABLE" and "refused" in err.message
        assert "different code" in err.message
        assert not leader.ready and not follower.ready
        assert leader.backend.weights_sessions == [] == refusing.weights_sessions
    finally:
        stop(leader, follower, threads)


def test_party_config_from_yaml_env_and_errors(tmp_path) -> None:
    from mpcvit.mpc.errors import ConfigError
    from mpcvit.party.config import DealerConfig, PartyConfig

    base = PartyConfig.from_yaml(DEPLOY / "party0.yaml", env={})
    assert base.rank == 0 and base.peer == "party1:50052" and base.provider.kind == "dealer"
    assert base.provider.address == "dealer:50050" and base.tls is None
    assert base.limits.max_concurrent_rpcs == 64 and base.service_timeouts.pairing == 10
    assert base.timeouts.recv == 120 and base.served_name == "demo"
    env = {"MPCVIT_LISTEN": "127.0.0.1:1", "MPCVIT_PEER": "127.0.0.1:2",
           "MPCVIT_DEALER": "127.0.0.1:3", "MPCVIT_TLS_DIR": str(tmp_path)}
    cfg = PartyConfig.from_yaml(DEPLOY / "party1.yaml", env=env)
    assert (cfg.rank, cfg.listen, cfg.peer, cfg.provider.address) == (
        1, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert cfg.tls.cert == str(tmp_path / "party1.pem") and cfg.provider.tls == cfg.tls
    assert DealerConfig.from_yaml(DEPLOY / "dealer.yaml", env=env).tls.key.endswith("dealer.key")
    for bad in ({"rank": 2, "listen": "a:1", "peer": "b:2"},
                {"rank": 0, "listen": "a:1", "peer": "b:2", "colour": "red"},
                {"rank": 0, "listen": "a:1", "peer": "b:2", "limits": {"max_batch": 0}},
                {"rank": 0, "listen": "a:1", "peer": "b:2", "timeouts": {"pairing": -1}},
                {"rank": 0, "listen": "a:1", "peer": "b:2", "provider": "ttp"}):
        with pytest.raises(ConfigError):
            PartyConfig.from_dict(bad, env={})
