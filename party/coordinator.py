"""Who runs which secure session when: pairing and the leader/follower protocol.

Party 0 (leader) decides the order of sessions; party 1 (follower) does what it is told.
They talk in typed control messages (``peer_pb2.Control``, proto/peer.proto) over the
peer link, outside CrypTen:

- ``Arrived`` / ``Dropped`` (either way, at any time): the client halves a party just
  received, or dropped before any session used them.  Each party keeps a
  :class:`~.pairing.PairingTable`; a request both parties announced is *paired*, and only
  paired requests enter the leader's batches, so a half whose twin never comes never
  delays another request.
- ``Init`` L->F ``{session, epoch, model_json}``; the follower checks the architecture and
  answers ``InitAck {ok, reason}``; on ok both run a CrypTen session in which party 0
  secret-shares its weights.  The epoch names that set of weight shares.
- ``Prepare`` L->F (offline phase, while idle): both fetch the correlated randomness of a
  future session now; the follower answers ``Prepared``.
- ``Batch`` L->F ``{session, epoch, halves}`` of paired requests; the follower takes its
  halves (never waiting) and answers ``Ready {ok, missing, need_weights}``; both then run
  one CrypTen session on the ``ok`` ones, in the announced order.
- ``Hello`` F->L when the link comes up and while the follower holds no weights;
  ``LeaderStatus`` L->F when the leader cannot serve (e.g. the dealer is unreachable), so
  both parties give clients the same reason.

Every party runs two threads: a *receiver* that reads every control message as it comes
(pairing never waits for a session to end) and notices a lost link at once, and the
*coordinator* that runs sessions one at a time (CrypTen's state is process-global).  Each
exchange with the peer is pinned to the link generation it started on: if the peer goes
away, even if it restarts at once, every wait of that exchange fails immediately with
"disconnected" instead of waiting for a reply that cannot come.

Plain logic over two small interfaces (:class:`ControlChannel`, :class:`SecureBackend`),
so it is testable without a network.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import numpy as np
from mpcvit.proto.generated import peer_pb2

from .pairing import (
    Announcement,
    PairingTable,
    PendingRequest,
    RequestResult,
    ServiceError,
    SessionStats,
)

log = logging.getLogger("mpcvit.party")

Control = peer_pb2.Control
Cause = peer_pb2.Dropped.Cause
_DROPPED_STATUS = {Cause.CANCELLED: "CANCELLED", Cause.EXPIRED: "DEADLINE_EXCEEDED",
                   Cause.FAILED: "UNAVAILABLE"}
_HOUSEKEEPING_INTERVAL = 0.1  # seconds between expiry sweeps of the pairing table


class ChannelTimeout(Exception):
    """No control message arrived in time (idle, or the peer is slow)."""


class ChannelDown(Exception):
    """The peer link is down (peer crashed, not started, or unreachable)."""


class ControlChannel(Protocol):
    """Ordered control messages to and from the other party, with the link's state."""

    def link(self) -> tuple[int, bool]:
        """(generation, connected): the generation changes whenever the link drops or
        comes back."""

    def wait_link(self, timeout: float) -> bool:
        """Wait until the peer is connected to us."""

    def ensure(self, timeout: float) -> None:
        """(Re)open our side of the link; ChannelDown if the peer cannot be reached."""

    def send(self, msg: peer_pb2.Control) -> None:
        """Send without blocking; ChannelDown if our side of the link is down."""

    def recv(self, timeout: float, generation: int) -> peer_pb2.Control:
        """Next message; ChannelTimeout, or ChannelDown once the link left ``generation``."""


class SecureBackend(Protocol):
    """The secure model, driven by the coordinator on its thread.

    ``link`` is the peer-link generation the parties agreed on for a session: a backend
    must fail the session at once (not after a receive timeout) if the link changed."""

    precision_bits: int

    def public_model(self) -> dict[str, Any]:
        """Leader: the public architecture party 1 needs to receive weight shares."""

    def load_public_model(self, meta: dict[str, Any]) -> None:
        """Follower: prepare to receive weights for this architecture (ValueError if not)."""

    def share_weights(self, session: str, link: int | None = None) -> None:
        """Run the CrypTen session that secret-shares party 0's weights."""

    def infer(self, session: str, inputs: np.ndarray,
              link: int | None = None) -> tuple[np.ndarray, SessionStats]:
        """Run the secure forward on a batch of input shares; return output shares."""

    def can_prepare(self, batch: int) -> bool:
        """Whether an offline phase for a ``batch``-image session is possible now."""

    def prepare(self, session: str, batch: int, link: int | None = None) -> float:
        """Offline phase of a future session; returns seconds spent."""

    def discard_prepared(self) -> None:
        """Forget every prepared session (the peer lost its half of them)."""

    def probe_dealer(self) -> str | None:
        """None if the dealer is reachable (or not used); else why not."""


class SessionFailed(Exception):
    """A secure session broke; ``status`` tells the clients why (UNAVAILABLE, ABORTED...).

    ``transient``: the parties fix it themselves at once (e.g. by sharing the weights
    again), so requests that wait need not fail."""

    def __init__(self, status: str, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


def classify_failure(exc: BaseException, peer: int = 1) -> SessionFailed:
    """Map an exception from a session to the status its clients get, naming the cause."""
    if isinstance(exc, SessionFailed):
        return exc
    if isinstance(exc, ChannelDown):
        return SessionFailed("UNAVAILABLE", f"party {peer} disconnected: {exc}")
    if isinstance(exc, ChannelTimeout):
        return SessionFailed("UNAVAILABLE", f"party {peer} did not answer: {exc}")
    try:
        from mpcvit.mpc.errors import (
            DealerError,
            DealerUnreachable,
            PeerAborted,
            PeerDisconnected,
            PeerError,
            PeerTimeout,
        )
    except ImportError:  # pragma: no cover - the runtime is part of the server install
        return SessionFailed("ABORTED", f"secure session aborted ({type(exc).__name__})")
    if isinstance(exc, PeerDisconnected):
        return SessionFailed("UNAVAILABLE", f"party {peer} disconnected: {exc}")
    if isinstance(exc, PeerAborted):
        return SessionFailed("UNAVAILABLE", f"party {peer} gave the session up: {exc}")
    if isinstance(exc, PeerTimeout):
        return SessionFailed("UNAVAILABLE", f"party {peer} stopped answering: {exc}")
    if isinstance(exc, PeerError):
        return SessionFailed("UNAVAILABLE", f"party {peer} failed during the session: "
                                            f"{type(exc).__name__}: {exc}")
    if isinstance(exc, DealerUnreachable):
        return SessionFailed("UNAVAILABLE", str(exc))
    if isinstance(exc, DealerError):
        if "unknown weight mask" in str(exc):
            return SessionFailed("UNAVAILABLE", "the dealer lost the weight masks (it "
                                                "restarted); the weights are being shared "
                                                "again", transient=True)
        return SessionFailed("UNAVAILABLE", f"dealer failed: {exc}")
    # Unknown errors: report the type only, never a message that could hold data.
    return SessionFailed("ABORTED", f"secure session aborted ({type(exc).__name__})")


def _halves(items: list[PendingRequest]) -> list[peer_pb2.Half]:
    return [peer_pb2.Half(request_id=it.request_id, model=it.model, shape=list(it.shape))
            for it in items]


def _announcements(halves: Iterable[peer_pb2.Half]) -> list[Announcement]:
    return [Announcement(h.request_id, h.model, tuple(int(d) for d in h.shape))
            for h in halves]


class _Base:
    role = "party"

    def __init__(
        self, table: PairingTable, channel: ControlChannel, backend: SecureBackend, *,
        peer: int, poll_interval: float = 0.25, connect_timeout: float = 5.0,
        reply_timeout: float = 60.0, retry_interval: float = 1.0,
        on_ready_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.table = table
        self.channel = channel
        self.backend = backend
        self.peer = peer
        self.poll_interval = poll_interval
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.retry_interval = retry_interval
        self._on_ready_change = on_ready_change
        self._ready = False
        self._reason = f"party {peer} not connected yet"
        self._state_lock = threading.Lock()
        self._inbox: queue.Queue[tuple[int, peer_pb2.Control | None]] = queue.Queue()
        self._wake = threading.Event()
        self._last_housekeeping = 0.0
        self.stop_event = threading.Event()
        self.sessions_run = 0
        self._threads: list[threading.Thread] = []

    # -- readiness ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when this party can serve: weight shares agreed with a connected peer."""
        return self._ready

    def status(self) -> tuple[bool, str]:
        """(ready, why not): the reason names the real cause (peer, dealer, re-share)."""
        with self._state_lock:
            return self._ready, ("" if self._ready else self._reason)

    def _set_ready(self, ready: bool, reason: str = "") -> None:
        with self._state_lock:
            changed = ready != self._ready
            reason_changed = not ready and reason != self._reason
            self._ready = ready
            if not ready:
                self._reason = reason or "not ready"
        if changed or reason_changed:
            log.info("event=ready_change role=%s ready=%s reason=%s", self.role, ready,
                     json.dumps(reason))
        if changed and self._on_ready_change is not None:
            self._on_ready_change(ready)

    # -- client halves (RPC threads) -----------------------------------------------------
    def submit(self, items: list[PendingRequest]) -> None:
        """Hold these halves and announce them to the peer (ServiceError if impossible)."""
        _, up = self.channel.link()
        if not up:
            raise ServiceError("UNAVAILABLE", f"secure model not ready: party {self.peer} "
                                              "not connected")
        self.table.submit(items)
        try:
            self.channel.send(Control(arrived=peer_pb2.Arrived(halves=_halves(items))))
        except ChannelDown as exc:
            message = f"party {self.peer} not connected: {exc}"
            self.table.cancel([it.request_id for it in items], "UNAVAILABLE", message)
            raise ServiceError("UNAVAILABLE", message) from None

    def cancel(self, request_ids: list[str], status: str = "CANCELLED",
               message: str = "request cancelled by the client") -> None:
        """Drop halves whose call ended before a session used them; tell the peer."""
        removed = self.table.cancel(request_ids, status, message)
        if removed:
            self._send_dropped(removed, Cause.CANCELLED, "the client's call ended")

    def _send_dropped(self, ids: list[str], cause: int, reason: str) -> None:
        try:
            self.channel.send(Control(dropped=peer_pb2.Dropped(
                request_ids=ids, cause=cause, reason=reason)))
        except ChannelDown:
            pass  # the peer has lost the link too, and with it its halves

    def _fail_pending(self, reason: str) -> None:
        """This party cannot serve its halves: fail them and have the peer fail theirs."""
        failed = self.table.fail_all("UNAVAILABLE", reason)
        if failed:
            self._send_dropped(failed, Cause.FAILED, reason)

    # -- receiver thread -----------------------------------------------------------------
    def receive_forever(self) -> None:
        """Read every control message as it comes and watch the link (own thread)."""
        current: int | None = None
        while not self.stop_event.is_set():
            try:
                current = self._receive_once(current)
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("event=receiver_error role=%s", self.role)
                self.stop_event.wait(self.poll_interval)

    def _receive_once(self, current: int | None) -> int | None:
        generation, up = self.channel.link()
        if current is not None and (generation != current or not up):
            self._link_lost(current)
            current = None
        if not up:
            self._housekeeping()
            self.channel.wait_link(self.poll_interval)
            return None
        if current is None:
            current = generation
            self._link_up(generation)
        try:
            msg = self.channel.recv(self.poll_interval, generation)
        except (ChannelTimeout, ChannelDown):
            msg = None
        if msg is not None:
            self._dispatch(msg, generation)
        self._housekeeping()
        return current

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_housekeeping < _HOUSEKEEPING_INTERVAL:
            return
        self._last_housekeeping = now
        expired = self.table.expire()
        if expired:
            log.info("event=halves_expired role=%s count=%d", self.role, len(expired))
            self._send_dropped(expired, Cause.EXPIRED, "it waited longer than this party's "
                                                       "pairing or request timeout")

    def _link_lost(self, generation: int) -> None:
        reason = f"party {self.peer} disconnected"
        failed = self.table.peer_lost(reason)
        log.warning("event=peer_lost role=%s failed_halves=%d", self.role, len(failed))
        self._inbox.put((generation, None))
        self._on_link_lost()
        self.table.wake()
        self._wake.set()

    def _link_up(self, generation: int) -> None:
        log.info("event=peer_link_up role=%s", self.role)
        try:
            self.channel.ensure(self.connect_timeout)  # our side too, before we announce
        except ChannelDown:
            pass
        halves = self.table.local_halves()
        if halves:
            try:
                self.channel.send(Control(arrived=peer_pb2.Arrived(halves=[
                    peer_pb2.Half(request_id=h.request_id, model=h.model, shape=list(h.shape))
                    for h in halves])))
            except ChannelDown:
                pass
        self._on_link_up(generation)
        self._wake.set()

    def _dispatch(self, msg: peer_pb2.Control, generation: int) -> None:
        kind = msg.WhichOneof("body")
        if kind == "arrived":
            self.table.remote_arrived(_announcements(msg.arrived.halves))
        elif kind == "dropped":
            d = msg.dropped
            self.table.remote_dropped(list(d.request_ids), _DROPPED_STATUS.get(d.cause, "ABORTED"),
                                      f"party {self.peer} dropped its half of the request: "
                                      f"{d.reason or Cause.Name(d.cause).lower()}")
        else:
            self._handle(kind, msg, generation)

    def _handle(self, kind: str, msg: peer_pb2.Control, generation: int) -> None:
        self._inbox.put((generation, msg))

    def _on_link_lost(self) -> None:
        self._set_ready(False, f"party {self.peer} not connected")

    def _on_link_up(self, generation: int) -> None:
        pass

    # -- sessions ------------------------------------------------------------------------
    def _run_session(self, session: str, items: list[PendingRequest], link: int) -> None:
        """Run one inference session on ``items`` and settle their futures."""
        if not items:
            return
        inputs = np.stack([it.share for it in items])
        started = time.monotonic()
        log.info("event=session_start role=%s session=%s batch=%d", self.role, session,
                 len(items))
        try:
            outputs, stats = self.backend.infer(session, inputs, link)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the clients
            failure = classify_failure(exc, self.peer)
            # Tracebacks name code lines and exception types, never tensor values.
            log.warning("event=session_failed role=%s session=%s batch=%d status=%s error=%s",
                        self.role, session, len(items), failure.status,
                        json.dumps(str(failure)), exc_info=failure.status == "ABORTED")
            for it in items:
                it.fail(failure.status, str(failure))
            raise failure from exc
        self.sessions_run += 1
        log.info("event=session_done role=%s session=%s batch=%d seconds=%.3f rounds=%d "
                 "bytes_sent=%d", self.role, session, len(items), stats.seconds, stats.rounds,
                 stats.bytes_sent)
        for it, out in zip(items, outputs, strict=True):
            it.succeed(RequestResult(
                request_id=it.request_id, share=np.asarray(out, dtype=np.int64),
                precision_bits=self.backend.precision_bits, stats=stats,
                queue_seconds=max(0.0, started - it.received),
            ))

    # -- threads -------------------------------------------------------------------------
    def run_forever(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the receiver and the coordinator threads."""
        for target, name in ((self.receive_forever, "control-receiver"),
                             (self.run_forever, "coordinator")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()
        self.table.wake()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class Leader(_Base):
    """Party 0's loop: take batches of paired requests and drive both parties' sessions."""

    role = "leader"

    def __init__(self, *args: Any, max_batch: int = 1, max_wait: float = 0.0,
                 offline_sessions: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("peer", 1)
        super().__init__(*args, **kwargs)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.offline_sessions = offline_sessions
        self._prepared: list[str] = []  # single-image sessions ready for their online phase
        self._prepare_after = 0.0  # no offline phase before this (after a failed one)
        self._peer_wants_weights = False
        self.epoch = uuid.uuid4().hex[:12]
        self._counter = 0

    def _session_id(self, kind: str) -> str:
        # 128 random bits: nobody can name a session (and ask the dealer for its seeds)
        # before the parties use it; the kind prefix only helps reading logs.
        self._counter += 1
        return f"{kind}-{secrets.token_hex(16)}"

    # -- receiver side -------------------------------------------------------------------
    def _handle(self, kind: str, msg: peer_pb2.Control, generation: int) -> None:
        if kind == "hello":
            hello = msg.hello
            if hello.need_weights or hello.epoch != self.epoch:
                if self._ready:
                    log.info("event=peer_hello need_weights=%s", hello.need_weights)
                self._peer_wants_weights = True
                self.table.wake()
                self._wake.set()
            return
        if kind == "init_ack":
            # Hellos the follower sent before it got our init arrived before this ack
            # (the link is ordered): this init answers them.
            self._peer_wants_weights = False
        self._inbox.put((generation, msg))

    def _on_link_up(self, generation: int) -> None:
        self.table.wake()  # start sharing the weights with the (new) peer now

    def _send_status(self, ready: bool, reason: str) -> None:
        try:
            self.channel.send(Control(status=peer_pb2.LeaderStatus(ready=ready, reason=reason)))
        except ChannelDown:
            pass

    def _not_ready(self, reason: str, fail_pending: bool = True) -> None:
        """Leader cannot serve: say why (to clients and the follower), fail what waits."""
        self._set_ready(False, reason)
        self._send_status(False, reason)
        if fail_pending:
            self._fail_pending(reason)

    # -- coordinator thread ---------------------------------------------------------------
    def _await(self, kind: str, session: str, link: int, timeout: float) -> peer_pb2.Control:
        """The follower's reply ``kind`` to ``session`` on link generation ``link``."""
        deadline = time.monotonic() + timeout
        while True:
            if self.channel.link() != (link, True):
                raise ChannelDown(f"the link was lost while waiting for its {kind}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"no {kind} for {session} within {timeout:g} s")
            try:
                generation, msg = self._inbox.get(timeout=min(left, self.poll_interval))
            except queue.Empty:
                if self.stop_event.is_set():
                    raise ChannelDown("party shutting down") from None
                continue
            if generation != link:
                if generation > link:
                    raise ChannelDown(f"the link was lost while waiting for its {kind}")
                continue  # from an earlier link: stale
            if msg is None:
                raise ChannelDown(f"the link was lost while waiting for its {kind}")
            got = msg.WhichOneof("body")
            if got == kind and getattr(msg, kind).session == session:
                return msg
            log.info("event=stale_control type=%s", got)

    def _forget_prepared(self) -> None:
        if self._prepared:
            log.info("event=offline_discarded sessions=%d", len(self._prepared))
        self._prepared.clear()
        if self.offline_sessions:
            self.backend.discard_prepared()

    def _wait_retry(self, started: float) -> None:
        """Wait out the rest of a retry interval (a link coming up ends it early)."""
        self._wake.wait(max(0.0, self.retry_interval - (time.monotonic() - started)))

    def initialise_peer(self) -> bool:
        """Share the weights with the peer; False (and held halves failed) if it can't."""
        started = time.monotonic()
        self._wake.clear()
        self._peer_wants_weights = False
        self._forget_prepared()
        link, up = self.channel.link()
        if not up:
            self._not_ready(f"party {self.peer} not connected")
            try:
                self.channel.ensure(self.connect_timeout)  # returns once it is back
            except ChannelDown:
                self._wait_retry(started)
            return False
        try:
            self.channel.ensure(self.connect_timeout)  # our side of the link, too
        except ChannelDown as exc:
            self._not_ready(f"party {self.peer} not connected: {exc}")
            self._wait_retry(started)
            return False
        dealer_down = self.backend.probe_dealer()
        if dealer_down:
            self._not_ready(dealer_down)
            self._wait_retry(started)
            return False
        session = self._session_id("init")
        self._set_ready(False, f"sharing the weights with party {self.peer}")
        try:
            self.channel.send(Control(init=peer_pb2.Init(
                session=session, epoch=self.epoch,
                model_json=json.dumps(self.backend.public_model()))))
            ack = self._await("init_ack", session, link, self.reply_timeout).init_ack
            if not ack.ok:
                raise SessionFailed("UNAVAILABLE", f"party {self.peer} refused the model: "
                                    f"{ack.reason or 'no reason given'}")
            self.backend.share_weights(session, link)
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc, self.peer)
            log.warning("event=init_failed session=%s status=%s error=%s", session,
                        failure.status, json.dumps(str(failure)),
                        exc_info=failure.status == "ABORTED")
            self._not_ready(str(failure))
            self._wait_retry(started)
            return False
        log.info("event=weights_shared session=%s epoch=%s", session, self.epoch)
        self._set_ready(True)
        return True

    def step(self) -> None:
        """One iteration: make sure the peer holds weights, then run at most one batch."""
        if not self._ready or self._peer_wants_weights:
            self.initialise_peer()
            return
        batch = self.table.next_batch(self.max_batch, self.max_wait, self.poll_interval)
        if batch:
            self.run_batch(batch)
        elif self._ready and not self._peer_wants_weights:
            self.prepare_next()

    def prepare_next(self) -> bool:
        """While idle: run the offline phase of one more single-image session."""
        if (len(self._prepared) >= self.offline_sessions or not self.backend.can_prepare(1)
                or time.monotonic() < self._prepare_after):
            return False
        link, _ = self.channel.link()
        session = self._session_id("infer")
        try:
            self.channel.send(Control(prepare=peer_pb2.Prepare(session=session,
                                                                epoch=self.epoch, batch=1)))
            self.backend.prepare(session, 1, link)
            reply = self._await("prepared", session, link, self.reply_timeout).prepared
            if not reply.ok:
                raise SessionFailed("UNAVAILABLE", f"party {self.peer} could not prepare: "
                                    f"{reply.reason}")
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc, self.peer)
            log.warning("event=offline_failed session=%s error=%s", session,
                        json.dumps(str(failure)))
            self._forget_prepared()
            self._prepare_after = time.monotonic() + self.retry_interval
            if failure.status == "UNAVAILABLE":
                # Peer or dealer gone, or the dealer lost the weight masks: share the
                # weights again (once both are back) before the next session.
                self._not_ready(str(failure), fail_pending=not failure.transient)
            return False
        self._prepared.append(session)
        return True

    def run_batch(self, batch: list[PendingRequest]) -> None:
        link, _ = self.channel.link()
        if len(batch) == 1 and self._prepared:
            session = self._prepared.pop(0)  # its randomness was fetched offline
        else:
            session = self._session_id("infer")
        try:
            self.channel.send(Control(batch=peer_pb2.Batch(
                session=session, epoch=self.epoch, halves=_halves(batch))))
            reply = self._await("ready", session, link, self.reply_timeout).ready
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc, self.peer)
            log.warning("event=announce_failed session=%s status=%s", session, failure.status)
            for it in batch:
                it.fail(failure.status, str(failure))
            self._send_dropped([it.request_id for it in batch], Cause.FAILED, str(failure))
            self._not_ready(str(failure))
            return
        if reply.need_weights:
            log.info("event=peer_needs_weights session=%s", session)
            self._peer_wants_weights = True
            self.table.requeue_front(batch)
            return
        ok = set(reply.ok)
        for it in batch:
            if it.request_id not in ok:
                status, message = self.table.why_dropped(it.request_id) or (
                    "ABORTED", f"party {self.peer} no longer holds its half of request "
                               f"{it.request_id!r}")
                it.fail(status, message)
        try:
            self._run_session(session, [it for it in batch if it.request_id in ok], link)
        except SessionFailed as failure:  # already reported to the clients
            if failure.status == "UNAVAILABLE":
                # The peer or the dealer went away (or the dealer lost the weight masks):
                # share the weights again before the next session, once both are back.
                self._not_ready(str(failure), fail_pending=not failure.transient)

    def run_forever(self) -> None:
        log.info("event=leader_started epoch=%s", self.epoch)
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("event=leader_step_error")
                self.stop_event.wait(self.retry_interval)


class Follower(_Base):
    """Party 1's loop: follow the leader's messages."""

    role = "follower"

    def __init__(self, *args: Any, hello_interval: float = 2.0, **kwargs: Any) -> None:
        kwargs.setdefault("peer", 0)
        super().__init__(*args, **kwargs)
        self.hello_interval = hello_interval
        self.epoch: str | None = None
        self._last_hello = -float("inf")

    # -- receiver side -------------------------------------------------------------------
    def _handle(self, kind: str, msg: peer_pb2.Control, generation: int) -> None:
        if kind == "status":
            if not msg.status.ready:
                self._set_ready(False, f"party {self.peer} cannot serve: {msg.status.reason}")
            return
        self._inbox.put((generation, msg))

    def _on_link_up(self, generation: int) -> None:
        self._set_ready(False, f"waiting for party {self.peer} to share the weights")
        self._say_hello(force=True)

    def _say_hello(self, force: bool = False) -> None:
        """Tell the leader which weights we hold (it may not know we restarted)."""
        now = time.monotonic()
        if not force and (self.epoch is not None or now - self._last_hello < self.hello_interval
                          or not self.channel.link()[1]):
            return
        self._last_hello = now
        try:
            self.channel.send(Control(hello=peer_pb2.Hello(
                epoch=self.epoch or "", need_weights=self.epoch is None)))
        except ChannelDown:
            pass

    # -- coordinator thread ---------------------------------------------------------------
    def step(self) -> None:
        self._say_hello()
        try:
            generation, msg = self._inbox.get(timeout=self.poll_interval)
        except queue.Empty:
            return
        if msg is None or self.channel.link() != (generation, True):
            return  # the link this came on is gone: so is the leader that sent it
        kind = msg.WhichOneof("body")
        if kind == "init":
            self.handle_init(msg.init, generation)
        elif kind == "batch":
            self.handle_batch(msg.batch, generation)
        elif kind == "prepare":
            self.handle_prepare(msg.prepare, generation)
        else:
            log.warning("event=unknown_control type=%s", kind)

    def _reply(self, msg: peer_pb2.Control) -> None:
        try:
            self.channel.send(msg)
        except ChannelDown as exc:
            log.info("event=reply_lost error=%s", json.dumps(str(exc)))

    def handle_init(self, init: peer_pb2.Init, link: int) -> None:
        session = init.session
        self.epoch = None
        self._set_ready(False, f"receiving the weight shares from party {self.peer}")
        try:
            meta = json.loads(init.model_json or "{}")
            if not isinstance(meta, dict):
                raise ValueError("the model description is not an object")
            self.backend.load_public_model(meta)
        except ValueError as exc:
            # E.g. the parties run different versions of the secure model code: say so
            # now rather than fail obscurely inside the session.
            log.error("event=init_refused session=%s reason=%s", session, json.dumps(str(exc)))
            self._reply(Control(init_ack=peer_pb2.InitAck(session=session, ok=False,
                                                          reason=str(exc))))
            self._set_ready(False, f"refused party {self.peer}'s model: {exc}")
            return
        self._reply(Control(init_ack=peer_pb2.InitAck(session=session, ok=True)))
        try:
            self.backend.share_weights(session, link)
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc, self.peer)
            log.warning("event=init_failed session=%s status=%s error=%s", session,
                        failure.status, json.dumps(str(failure)),
                        exc_info=failure.status == "ABORTED")
            self._set_ready(False, str(failure))
            return
        self.epoch = init.epoch
        log.info("event=weights_received session=%s epoch=%s", session, self.epoch)
        self._set_ready(True)

    def handle_prepare(self, prepare: peer_pb2.Prepare, link: int) -> None:
        ok, reason = False, f"no weight shares of epoch {prepare.epoch}"
        if self.epoch is not None and prepare.epoch == self.epoch:
            try:
                self.backend.prepare(prepare.session, int(prepare.batch or 1), link)
                ok, reason = True, ""
            except Exception as exc:  # noqa: BLE001
                reason = str(classify_failure(exc, self.peer))
                log.warning("event=offline_failed session=%s error=%s", prepare.session,
                            json.dumps(reason))
        self._reply(Control(prepared=peer_pb2.Prepared(session=prepare.session, ok=ok,
                                                       reason=reason)))

    def handle_batch(self, batch: peer_pb2.Batch, link: int) -> None:
        session = batch.session
        if self.epoch is None or batch.epoch != self.epoch:
            self._reply(Control(ready=peer_pb2.Ready(session=session, need_weights=True)))
            return
        found, missing, mismatch = self.table.take(_announcements(batch.halves))
        if missing or mismatch:
            log.info("event=halves_missing session=%s count=%d", session,
                     len(missing) + len(mismatch))
        self._reply(Control(ready=peer_pb2.Ready(
            session=session, ok=[it.request_id for it in found],
            missing=missing + mismatch)))
        try:
            self._run_session(session, found, link)
        except SessionFailed:  # already reported to the clients
            return

    def run_forever(self) -> None:
        log.info("event=follower_started")
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001
                log.exception("event=follower_step_error")
                self.stop_event.wait(self.poll_interval)
