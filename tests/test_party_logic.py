"""Plain-logic tests of the party service: the pairing table and the leader/follower
protocol.

No network and no CrypTen here: the coordinator runs over an in-memory control link
(typed ``Control`` messages, serialised as on the wire) and a stand-in backend that adds a
public offset to each share (the real protocol is covered by the multi-process tests in
test_party_service.py and test_party_reliability.py).
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mpcvit.party.coordinator import ChannelDown, ChannelTimeout, Follower, Leader
from mpcvit.party.pairing import (
    Announcement,
    PairingTable,
    PendingRequest,
    ServiceError,
    SessionStats,
    check_request_id,
)
from mpcvit.proto.generated import peer_pb2

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def half(rid: str, value: int = 0, model: str = "m", shape=(1, 2, 2)) -> PendingRequest:
    return PendingRequest(rid, model, np.full(shape, value, dtype=np.int64))


def ann(rid: str, model: str = "m", shape=(1, 2, 2)) -> Announcement:
    return Announcement(rid, model, shape)


def table(clock=None, pairing=5.0, request=30.0, max_pending=1024, peer=1) -> PairingTable:
    kw = {"clock": clock} if clock is not None else {}
    return PairingTable(peer=peer, pairing_timeout=pairing, request_timeout=request,
                        max_pending=max_pending, **kw)


def ids(items) -> list[str]:
    return [it.request_id for it in items]


def test_request_id_rules() -> None:
    check_request_id("abc-123_x.y:z")
    for bad in ("", "a" * 129, "white space", "é", "a/b"):
        with pytest.raises(ServiceError) as err:
            check_request_id(bad)
        assert err.value.status == "INVALID_ARGUMENT"


def test_submit_rejects_duplicates_and_overflow() -> None:
    t = table(max_pending=3)
    t.submit([half("a")])
    with pytest.raises(ServiceError) as err:
        t.submit([half("a")])
    assert err.value.status == "ALREADY_EXISTS"
    with pytest.raises(ServiceError) as err:
        t.submit([half("b"), half("b")])
    assert err.value.status == "INVALID_ARGUMENT"
    with pytest.raises(ServiceError) as err:
        t.submit([half("c"), half("d"), half("e")])
    assert err.value.status == "RESOURCE_EXHAUSTED"
    assert len(t) == 1  # all-or-nothing


def test_only_halves_both_parties_announced_are_eligible() -> None:
    t = table()
    t.submit([half("a"), half("b"), half("c")])
    assert t.next_batch(8, 0, 0.05) == []  # nothing paired yet
    t.remote_arrived([ann("b")])  # the peer announced b only (after ours arrived) ...
    t.remote_arrived([ann("z")])  # ... and z before ours arrives
    t.submit([half("z")])
    assert t.paired_count == 2
    assert ids(t.next_batch(8, 0, 0.05)) == ["b", "z"]  # arrival order among paired
    assert len(t) == 2 and t.next_batch(8, 0, 0.05) == []


def test_a_one_sided_half_never_holds_up_a_later_paired_one() -> None:
    t = table()
    t.submit([half(f"lonely{i}") for i in range(8)])
    t.submit([half("good")])
    t.remote_arrived([ann("good")])
    assert ids(t.next_batch(1, 0, 0.05)) == ["good"]
    assert all(not it.paired for it in t._local.values())


def test_next_batch_groups_one_model_and_shape_and_waits_for_fill() -> None:
    t = table()
    t.submit([half("a"), half("b", model="other"), half("c"), half("d", shape=(1, 3, 3))])
    t.remote_arrived([ann("a"), ann("b", model="other"), ann("c"), ann("d", shape=(1, 3, 3))])
    assert ids(t.next_batch(8, 0, 0.1)) == ["a", "c"]
    assert ids(t.next_batch(8, 0, 0.1)) == ["b"]
    assert ids(t.next_batch(8, 0, 0.1)) == ["d"]
    t.submit([half("e")])
    t.remote_arrived([ann("e")])

    def later() -> None:
        t.submit([half("f")])
        t.remote_arrived([ann("f")])

    threading.Timer(0.05, later).start()
    assert ids(t.next_batch(2, max_wait=5.0, timeout=0.1)) == ["e", "f"]


def test_wake_ends_a_batch_wait() -> None:
    t = table()
    threading.Timer(0.05, t.wake).start()
    assert t.next_batch(1, 0, timeout=30) == []


def test_unpaired_halves_expire_after_the_pairing_timeout_naming_the_other_party() -> None:
    clock = FakeClock()
    t = table(clock, pairing=10, request=300, peer=0)  # a follower's table
    lonely, paired = half("lonely"), half("paired")
    t.submit([lonely, paired])
    t.remote_arrived([ann("paired"), ann("theirs")])
    clock.now = 9.9
    assert t.expire() == [] and not lonely.future.done()
    clock.now = 10.1
    assert t.expire() == ["lonely"]
    err = lonely.future.exception(0)
    assert err.status == "DEADLINE_EXCEEDED"
    assert "party 0 never received request 'lonely'" in err.message
    assert not paired.future.done()  # paired: the request timeout applies
    assert t.announcements == 0  # the peer's unmatched announcement is forgotten too
    clock.now = 301
    assert t.expire() == ["paired"]
    assert "waited more than 300 s" in paired.future.exception(0).message


def test_mismatched_halves_fail_as_invalid_at_pairing() -> None:
    t = table()
    a, b = half("a"), half("b")
    t.remote_arrived([ann("a", model="other")])
    t.submit([a, b])
    t.remote_arrived([ann("b", shape=(1, 3, 3))])
    for h in (a, b):
        assert h.future.exception(0).status == "INVALID_ARGUMENT"
    assert len(t) == 0


def test_peer_dropped_its_half_fails_ours_with_its_reason() -> None:
    t = table()
    a = half("a")
    t.submit([a])
    t.remote_arrived([ann("a")])
    t.remote_dropped(["a", "never-here"], "DEADLINE_EXCEEDED", "party 1 dropped it")
    err = a.future.exception(0)
    assert (err.status, err.message) == ("DEADLINE_EXCEEDED", "party 1 dropped it")
    assert t.why_dropped("never-here") == ("DEADLINE_EXCEEDED", "party 1 dropped it")
    assert len(t) == 0


def test_take_never_waits_and_reports_missing_and_mismatched() -> None:
    t = table()
    a, b = half("a"), half("b", model="x")
    t.submit([a, b])
    found, missing, mismatch = t.take([ann("a"), ann("b"), ann("zz")])
    assert ids(found) == ["a"] and missing == ["zz"] and mismatch == ["b"]
    assert b.future.exception(0).status == "INVALID_ARGUMENT"
    assert len(t) == 0


def test_peer_lost_fails_everything_as_unavailable() -> None:
    t = table()
    a, b = half("a"), half("b")
    t.submit([a, b])
    t.remote_arrived([ann("a"), ann("c")])
    assert sorted(t.peer_lost("party 1 disconnected")) == ["a", "b"]
    for h in (a, b):
        err = h.future.exception(0)
        assert err.status == "UNAVAILABLE" and "disconnected" in err.message
    assert t.announcements == 0 and len(t) == 0


def test_announcements_are_bounded() -> None:
    t = table(max_pending=1)
    t.remote_arrived([ann(f"r{i}") for i in range(t.max_announcements + 10)])
    assert t.announcements == t.max_announcements


def test_cancel_and_requeue_front() -> None:
    t = table()
    a, b, c = half("a"), half("b"), half("c")
    t.submit([a, b, c])
    t.remote_arrived([ann("a"), ann("b"), ann("c")])
    assert t.cancel(["b", "nope"]) == ["b"]
    assert b.future.exception(0).status == "CANCELLED"
    batch = t.next_batch(2, 0, 0.1)
    t.requeue_front(batch)
    assert ids(t.next_batch(3, 0, 0.1)) == ["a", "c"]


# --------------------------------------------------------------- leader/follower protocol


class Link:
    """An in-memory control link between two parties, with a generation like the peer
    link's: it changes whenever the link drops or comes back."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 1
        self.up = True
        self.inbox = {0: queue.Queue(), 1: queue.Queue()}

    def drop(self) -> None:
        with self.cond:
            self.generation += 1
            self.up = False
            self.cond.notify_all()

    def restore(self) -> None:
        with self.cond:
            self.generation += 1
            self.up = True
            self.inbox = {0: queue.Queue(), 1: queue.Queue()}
            self.cond.notify_all()


class Channel:
    def __init__(self, link: Link, me: int) -> None:
        self.l, self.me = link, me
        self.sent: list[str] = []

    def link(self):
        with self.l.cond:
            return self.l.generation, self.l.up

    def wait_link(self, timeout):
        with self.l.cond:
            return self.l.cond.wait_for(lambda: self.l.up, timeout)

    def ensure(self, timeout):
        if not self.wait_link(timeout):
            raise ChannelDown("peer unreachable")

    def send(self, msg):
        with self.l.cond:
            if not self.l.up:
                raise ChannelDown("link down")
            wire = peer_pb2.Control.FromString(msg.SerializeToString())
            self.l.inbox[1 - self.me].put((self.l.generation, wire))
        self.sent.append(msg.WhichOneof("body"))

    def recv(self, timeout, generation):
        deadline = time.monotonic() + timeout
        while True:
            with self.l.cond:
                if self.l.generation != generation or not self.l.up:
                    raise ChannelDown("link changed")
                inbox = self.l.inbox[self.me]
            try:
                gen, msg = inbox.get(timeout=0.01)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ChannelTimeout("idle") from None
                continue
            if gen == generation:
                return msg


class OffsetBackend:
    """Party p returns share + p*1000 per element: their sum is input + 1000 (checkable)."""

    precision_bits = 16

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.weights_sessions: list[str] = []
        self.infer_sessions: list[tuple[str, int]] = []
        self.fail_next = False
        self.refuse = False
        self.dealer_down: str | None = None
        self.hold = threading.Event()  # a session waits for this when ``holding``
        self.holding = False

    def public_model(self):
        return {"name": "m"}

    def load_public_model(self, meta):
        if self.refuse:
            raise ValueError("different code")
        assert meta == {"name": "m"}

    def share_weights(self, session, link=None):
        self.weights_sessions.append(session)

    def infer(self, session, inputs, link=None):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("secret details must not leak")
        if self.holding:
            self.hold.wait(10)
        self.infer_sessions.append((session, len(inputs)))
        out = inputs.reshape(len(inputs), -1)[:, :3] + self.rank * 1000
        return out, SessionStats(session, 0.01, 7, 100, len(inputs))

    def can_prepare(self, batch):
        return False

    def prepare(self, session, batch, link=None):
        raise AssertionError("not prepared in these tests")

    def discard_prepared(self):
        pass

    def probe_dealer(self):
        return self.dealer_down


def make_pair(max_batch=4, pairing_timeout=0.5, link=None, follower_backend=None):
    link = link or Link()
    t0 = PairingTable(peer=1, pairing_timeout=pairing_timeout, request_timeout=30)
    t1 = PairingTable(peer=0, pairing_timeout=pairing_timeout, request_timeout=30)
    common = dict(poll_interval=0.02, retry_interval=0.05, connect_timeout=0.2,
                  reply_timeout=5.0)
    leader = Leader(t0, Channel(link, 0), OffsetBackend(0), max_batch=max_batch, **common)
    follower = Follower(t1, Channel(link, 1), follower_backend or OffsetBackend(1),
                        hello_interval=0.05, **common)
    leader.start()
    follower.start()
    return leader, follower, link


def stop(*parties) -> None:
    for p in parties:
        p.stop()
    for p in parties:
        p.join(5)


def wait_for(cond, limit: float = 5.0) -> bool:
    done = threading.Event()
    for _ in range(int(limit / 0.01)):
        if cond():
            return True
        done.wait(0.01)
    return cond()


def test_protocol_pairs_halves_and_batches() -> None:
    leader, follower, _ = make_pair()
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        halves0 = [half(f"r{i}", value=i) for i in range(3)]
        halves1 = [half(f"r{i}", value=10 * i) for i in range(3)]
        follower.submit(halves1)  # follower's halves may arrive first
        leader.submit(halves0)
        for h0, h1, i in zip(halves0, halves1, range(3), strict=True):
            r0, r1 = h0.future.result(5), h1.future.result(5)
            assert r0.request_id == r1.request_id == f"r{i}"
            assert (r0.share + r1.share).tolist() == [11 * i + 1000] * 3
            assert r0.stats.session == r1.stats.session
        assert len(follower.backend.weights_sessions) == 1
        assert follower.backend.weights_sessions == leader.backend.weights_sessions
        assert leader.backend.infer_sessions == follower.backend.infer_sessions
        assert {"arrived", "init", "batch"} <= set(leader.channel.sent)
    finally:
        stop(leader, follower)


def test_one_sided_halves_do_not_delay_a_valid_request() -> None:
    """Eight halves sent to party 0 only are never batched: a valid request sent after
    them completes while they are all still waiting for their twins."""
    leader, follower, _ = make_pair(max_batch=1, pairing_timeout=3.0)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        lonely = [half(f"lonely{i}") for i in range(8)]
        for h in lonely:
            leader.submit([h])
        h0, h1 = half("next", 1), half("next", 2)
        follower.submit([h1])
        leader.submit([h0])
        assert (h0.future.result(5).share + h1.future.result(5).share).tolist() == [1003] * 3
        assert not any(h.future.done() for h in lonely)
        for h in lonely:  # then they expire, naming the party that never got a share
            err = h.future.exception(10)
            assert err.status == "DEADLINE_EXCEEDED"
            assert "party 1 never received" in err.message
    finally:
        stop(leader, follower)


def test_unpaired_half_at_the_follower_expires_like_at_the_leader() -> None:
    leader, follower, _ = make_pair(max_batch=1, pairing_timeout=0.3)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        lonely, mine, theirs = half("only-p1"), half("id-a"), half("id-b")
        follower.submit([lonely, theirs])
        leader.submit([mine])
        for h, other in ((lonely, 0), (theirs, 0), (mine, 1)):
            err = h.future.exception(10)
            assert err.status == "DEADLINE_EXCEEDED"
            assert f"party {other} never received" in err.message
        assert len(leader.table) == len(follower.table) == 0
    finally:
        stop(leader, follower)


def test_mismatched_model_is_invalid_at_both_parties() -> None:
    leader, follower, _ = make_pair(max_batch=1)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        h0, h1 = half("x", model="m"), half("x", model="other")
        follower.submit([h1])
        leader.submit([h0])
        assert h0.future.exception(5).status == "INVALID_ARGUMENT"
        assert h1.future.exception(5).status == "INVALID_ARGUMENT"
    finally:
        stop(leader, follower)


def test_cancelled_half_is_dropped_at_the_other_party_too() -> None:
    leader, follower, _ = make_pair(max_batch=1, pairing_timeout=30)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        leader.backend.holding = True  # keep the leader busy in an earlier session
        b0, b1 = half("busy"), half("busy")
        follower.submit([b1])
        leader.submit([b0])
        assert wait_for(lambda: not b0.future.done() and len(leader.table) == 0)
        h0, h1 = half("gone"), half("gone")
        follower.submit([h1])
        leader.submit([h0])
        follower.cancel(["gone"])  # the client's call at party 1 ended
        err = h0.future.exception(5)
        assert err.status == "CANCELLED" and "party 1 dropped its half" in err.message
        leader.backend.hold.set()
        assert b0.future.result(5).request_id == "busy"
    finally:
        leader.backend.hold.set()
        stop(leader, follower)


def test_session_error_reaches_both_clients_without_details() -> None:
    leader, follower, _ = make_pair(max_batch=1)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        leader.backend.fail_next = True
        follower.backend.fail_next = True
        h0, h1 = half("x"), half("x")
        follower.submit([h1])
        leader.submit([h0])
        for h in (h0, h1):
            err = h.future.exception(5)
            assert err.status == "ABORTED"
            assert "secret" not in err.message
        # The service keeps going.
        g0, g1 = half("y"), half("y")
        follower.submit([g1])
        leader.submit([g0])
        assert g0.future.result(5).share.tolist() == [0, 0, 0]
    finally:
        stop(leader, follower)


def test_restarted_follower_gets_weights_again() -> None:
    leader, follower, link = make_pair(max_batch=1)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        h0, h1 = half("a"), half("a")
        follower.submit([h1])
        leader.submit([h0])
        h0.future.result(5)
        # Replace the follower with a fresh one (no weights), as after a restart: the
        # link drops and comes back.
        stop(follower)
        link.drop()
        pending = half("pending")
        with pytest.raises(ServiceError):
            leader.submit([pending])  # not connected: refused at once
        link.restore()
        fresh = Follower(PairingTable(peer=0, pairing_timeout=0.5, request_timeout=30),
                         Channel(link, 1), OffsetBackend(1), poll_interval=0.02,
                         hello_interval=0.05, retry_interval=0.05, connect_timeout=0.2)
        fresh.start()
        follower = fresh
        assert wait_for(lambda: fresh.ready and leader.ready)
        assert len(fresh.backend.weights_sessions) == 1
        g0, g1 = half("b", 5), half("b", 6)
        fresh.submit([g1])
        leader.submit([g0])
        assert (g0.future.result(5).share + g1.future.result(5).share).tolist() == [1011] * 3
        assert len(fresh.backend.weights_sessions) == 1
        assert len(leader.backend.weights_sessions) == 2
    finally:
        stop(leader, follower)


def test_link_loss_fails_held_halves_at_once_and_service_resumes() -> None:
    leader, follower, link = make_pair(max_batch=1, pairing_timeout=30)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        waiting0, waiting1 = half("w0"), half("w1")
        leader.submit([waiting0])
        follower.submit([waiting1])
        link.drop()
        for h in (waiting0, waiting1):  # well before the 30 s pairing timeout
            err = h.future.exception(5)
            assert err.status == "UNAVAILABLE" and "disconnected" in err.message
        assert wait_for(lambda: not leader.ready and not follower.ready)
        assert "not connected" in leader.status()[1]
        link.restore()
        assert wait_for(lambda: leader.ready and follower.ready)
        g0, g1 = half("c"), half("c")
        follower.submit([g1])
        leader.submit([g0])
        assert g0.future.result(5).request_id == "c"
    finally:
        stop(leader, follower)


def test_dealer_unreachable_is_the_reason_at_both_parties_until_it_returns() -> None:
    leader, follower, _ = make_pair(max_batch=1)
    try:
        assert wait_for(lambda: leader.ready and follower.ready)
        leader.backend.dealer_down = "dealer unreachable at d:1 (UNAVAILABLE)"
        leader.backend.fail_next = False
        # A session fails because of the dealer: the leader checks it before sharing the
        # weights again, and both parties name it as the reason they cannot serve.
        from mpcvit.mpc.errors import DealerUnreachable

        original = leader.backend.infer

        def dealer_gone(session, inputs, link=None):
            raise DealerUnreachable("dealer unreachable at d:1 (lost during the session)")

        leader.backend.infer = dealer_gone
        h0, h1 = half("x"), half("x")
        follower.submit([h1])
        leader.submit([h0])
        err = h0.future.exception(5)
        assert err.status == "UNAVAILABLE" and "dealer unreachable" in err.message
        assert wait_for(lambda: not follower.ready)
        assert wait_for(lambda: "dealer unreachable" in follower.status()[1])
        assert "dealer unreachable" in leader.status()[1]
        leader.backend.infer = original
        leader.backend.dealer_down = None
        assert wait_for(lambda: leader.ready and follower.ready)
        g0, g1 = half("y"), half("y")
        follower.submit([g1])
        leader.submit([g0])
        assert g0.future.result(5).request_id == "y"
    finally:
        stop(leader, follower)


def test_follower_refusing_the_model_fails_requests_clearly() -> None:
    refusing = OffsetBackend(1)
    refusing.refuse = True
    leader, follower, _ = make_pair(max_batch=1, follower_backend=refusing)
    try:
        assert wait_for(lambda: "refused" in leader.status()[1])
        ready, reason = leader.status()
        assert not ready and "different code" in reason
        assert not follower.ready and "different code" in follower.status()[1]
        assert leader.backend.weights_sessions == [] == refusing.weights_sessions
    finally:
        stop(leader, follower)


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
