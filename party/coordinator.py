"""Who runs which secure session when: the leader/follower protocol between the parties.

Party 0 (leader) decides the order of sessions; party 1 (follower) does what it is told.
Control messages (small JSON dicts over the peer link, outside CrypTen):

- ``init``  L->F ``{session, epoch, model: <public architecture>}``; the follower checks
  it (same architecture code?) and answers ``init_ack {session, ok, reason}``; on ok both
  run a CrypTen session in which party 0 secret-shares its weights.  The epoch names that set
  of weight shares; a restarted party has none, which triggers a new ``init``.
- ``prepare`` L->F ``{session, epoch, batch}`` (offline phase, while idle): both parties
  fetch/draw the correlated randomness of that future session from the dealer now; the
  follower answers ``prepared {session, ok}``.  A later ``batch`` of that size reuses
  the session id, so its online phase never waits on the dealer.
- ``batch`` L->F ``{session, epoch, model, requests: [{id, shape}]}``: the follower
  takes its halves of those ids (waiting up to ``pairing_timeout`` for late ones) and
  answers ``ready {session, ok, missing, mismatch, need_weights}``; both then run one
  CrypTen session on the ``ok`` ids, in the announced order, as one batch.

Plain logic over two small interfaces (:class:`ControlChannel`, :class:`SecureBackend`),
so it is testable without a network.  Sessions run on the coordinator's own thread, one
at a time, because CrypTen's state is process-global.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .pairing import (
    InferenceQueue,
    PendingRequest,
    RequestResult,
    SessionStats,
)

log = logging.getLogger("mpcvit.party")


class ChannelTimeout(Exception):
    """No control message arrived in time (idle, or the peer is slow)."""


class ChannelDown(Exception):
    """The peer link is down (peer crashed, not started, or unreachable)."""


class ControlChannel(Protocol):
    """Ordered JSON messages to and from the other party."""

    def send(self, msg: dict[str, Any]) -> None: ...

    def recv(self, timeout: float) -> dict[str, Any]: ...


class SecureBackend(Protocol):
    """The secure model, driven by the coordinator on its thread."""

    precision_bits: int

    def public_model(self) -> dict[str, Any]:
        """Leader: the public architecture party 1 needs to receive weight shares."""

    def load_public_model(self, meta: dict[str, Any]) -> None:
        """Follower: prepare to receive weights for this architecture."""

    def share_weights(self, session: str) -> None:
        """Run the CrypTen session that secret-shares party 0's weights."""

    def infer(self, session: str, inputs: np.ndarray) -> tuple[np.ndarray, SessionStats]:
        """Run the secure forward on a batch of input shares; return output shares."""

    def can_prepare(self, batch: int) -> bool:
        """Whether an offline phase for a ``batch``-image session is possible now."""

    def prepare(self, session: str, batch: int) -> float:
        """Offline phase of a future session; returns seconds spent."""

    def discard_prepared(self) -> None:
        """Forget every prepared session (the peer lost its half of them)."""


class SessionFailed(Exception):
    """A secure session broke; ``status`` tells the clients why (UNAVAILABLE, ABORTED...)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def classify_failure(exc: BaseException) -> SessionFailed:
    """Map an exception from a session to the status its clients get."""
    if isinstance(exc, SessionFailed):
        return exc
    if isinstance(exc, ChannelDown):
        return SessionFailed("UNAVAILABLE", f"peer party unreachable: {exc}")
    if isinstance(exc, ChannelTimeout):
        return SessionFailed("UNAVAILABLE", f"peer party did not answer: {exc}")
    try:
        from mpcvit.mpc.errors import DealerError, PeerError
    except ImportError:  # pragma: no cover - the runtime is part of the server install
        PeerError = DealerError = ()  # type: ignore[assignment]  # noqa: N806
    if isinstance(exc, PeerError):
        return SessionFailed("UNAVAILABLE", f"peer party failed during the session: "
                                            f"{type(exc).__name__}: {exc}")
    if isinstance(exc, DealerError):
        return SessionFailed("UNAVAILABLE", f"dealer failed: {exc}")
    # Unknown errors: report the type only, never a message that could hold data.
    return SessionFailed("ABORTED", f"secure session aborted ({type(exc).__name__})")


class _Base:
    role = "party"

    def __init__(
        self, queue: InferenceQueue, channel: ControlChannel, backend: SecureBackend, *,
        pairing_timeout: float, on_ready_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.queue = queue
        self.channel = channel
        self.backend = backend
        self.pairing_timeout = pairing_timeout
        self._on_ready_change = on_ready_change
        self._ready = False
        self.stop_event = threading.Event()
        self.sessions_run = 0

    @property
    def ready(self) -> bool:
        """True when this party holds weight shares agreed with its peer."""
        return self._ready

    def _set_ready(self, ready: bool) -> None:
        if ready != self._ready:
            self._ready = ready
            log.info("event=ready_change role=%s ready=%s", self.role, ready)
            if self._on_ready_change is not None:
                self._on_ready_change(ready)

    def stop(self) -> None:
        self.stop_event.set()

    def _run_session(self, session: str, items: list[PendingRequest]) -> None:
        """Run one inference session on ``items`` and settle their futures."""
        if not items:
            return
        inputs = np.stack([it.share for it in items])
        started = time.monotonic()
        log.info("event=session_start role=%s session=%s batch=%d", self.role, session,
                 len(items))
        try:
            outputs, stats = self.backend.infer(session, inputs)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the clients
            failure = classify_failure(exc)
            # Tracebacks name code lines and exception types, never tensor values.
            log.warning("event=session_failed role=%s session=%s batch=%d status=%s error=%s",
                        self.role, session, len(items), failure.status, failure,
                        exc_info=failure.status == "ABORTED")
            for it in items:
                it.fail(failure.status, str(failure))
            raise
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


class Leader(_Base):
    """Party 0's loop: take batches from the queue and drive both parties' sessions."""

    role = "leader"

    def __init__(self, *args: Any, max_batch: int = 1, max_wait: float = 0.0,
                 offline_sessions: int = 0, retry_interval: float = 1.0,
                 poll_interval: float = 0.5, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.offline_sessions = offline_sessions
        self._prepared: list[str] = []  # single-image sessions ready for their online phase
        self.retry_interval = retry_interval
        self.poll_interval = poll_interval
        self.epoch = uuid.uuid4().hex[:12]
        self._counter = 0

    def _session_id(self, kind: str) -> str:
        # 128 random bits: nobody can name a session (and ask the dealer for its seeds)
        # before the parties use it; the kind prefix only helps reading logs.
        self._counter += 1
        return f"{kind}-{secrets.token_hex(16)}"

    def _forget_prepared(self) -> None:
        if not self.offline_sessions:
            return
        if self._prepared:
            log.info("event=offline_discarded sessions=%d", len(self._prepared))
        self._prepared.clear()
        self.backend.discard_prepared()

    def initialise_peer(self) -> bool:
        """Share the weights with the peer; False (and queued requests failed) if it can't."""
        self._forget_prepared()
        session = self._session_id("init")
        try:
            self.channel.send({"type": "init", "session": session, "epoch": self.epoch,
                               "model": self.backend.public_model()})
            ack = self._await_reply(session, self.pairing_timeout + 30.0, kind="init_ack")
            if not ack.get("ok"):
                raise SessionFailed("UNAVAILABLE", "peer party refused the model: "
                                    f"{ack.get('reason', 'no reason given')}")
            self.backend.share_weights(session)
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc)
            log.warning("event=init_failed session=%s status=%s error=%s",
                        session, failure.status, failure,
                        exc_info=failure.status == "ABORTED")
            self._set_ready(False)
            self.queue.fail_all(failure.status, f"peer party not ready: {failure}")
            return False
        log.info("event=weights_shared session=%s epoch=%s", session, self.epoch)
        # Hellos the follower sent before it got our init are answered by this session
        # (the link is ordered, so they arrived before its last session message).
        while True:
            try:
                self.channel.recv(0.001)
            except (ChannelTimeout, ChannelDown):
                break
        self._set_ready(True)
        return True

    def step(self) -> None:
        """One iteration: make sure the peer holds weights, then run at most one batch."""
        self.queue.expire()
        if not self._ready:
            if not self.initialise_peer():
                self.stop_event.wait(self.retry_interval)
            return
        batch = self.queue.next_batch(self.max_batch, self.max_wait, self.poll_interval)
        if batch:
            self.run_batch(batch)
        else:
            self._check_peer_hello()
            if self._ready:
                self.prepare_next()

    def prepare_next(self) -> bool:
        """While idle: run the offline phase of one more single-image session."""
        if len(self._prepared) >= self.offline_sessions or not self.backend.can_prepare(1):
            return False
        session = self._session_id("infer")
        try:
            self.channel.send({"type": "prepare", "session": session, "epoch": self.epoch,
                               "batch": 1})
            self.backend.prepare(session, 1)
            reply = self._await_reply(session, self.pairing_timeout + 60.0, kind="prepared")
        except Exception as exc:  # noqa: BLE001
            log.warning("event=offline_failed session=%s error=%s", session,
                        type(exc).__name__)
            self._forget_prepared()
            if "unknown weight mask" in str(exc):
                # The dealer restarted and lost the masks of our weight shares: share
                # the weights again before the next session instead of failing it.
                self._set_ready(False)
            return False
        if not reply.get("ok"):
            self._forget_prepared()
            return False
        self._prepared.append(session)
        return True

    def run_batch(self, batch: list[PendingRequest]) -> None:
        if len(batch) == 1 and self._prepared:
            session = self._prepared.pop(0)  # its randomness was fetched offline
        else:
            session = self._session_id("infer")
        announce = {
            "type": "batch", "session": session, "epoch": self.epoch, "model": batch[0].model,
            "requests": [{"id": it.request_id, "shape": list(it.shape)} for it in batch],
        }
        try:
            self.channel.send(announce)
            reply = self._await_reply(session, self.pairing_timeout + 30.0)
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc)
            log.warning("event=announce_failed session=%s status=%s", session, failure.status)
            self._set_ready(False)
            for it in batch:
                it.fail(failure.status, str(failure))
            return
        if reply.get("need_weights"):
            log.info("event=peer_needs_weights session=%s", session)
            self._set_ready(False)
            self.queue.requeue_front(batch)
            return
        ok = set(reply.get("ok", []))
        mismatch = set(reply.get("mismatch", []))
        run = []
        for it in batch:
            if it.request_id in ok:
                run.append(it)
            elif it.request_id in mismatch:
                it.fail("INVALID_ARGUMENT", f"the parties' halves of request {it.request_id!r} "
                                            "disagree (model or shape)")
            else:
                it.fail("DEADLINE_EXCEEDED", f"the other party did not receive its half of "
                                             f"request {it.request_id!r} within "
                                             f"{self.pairing_timeout:g} s")
        try:
            self._run_session(session, run)
        except Exception as exc:  # noqa: BLE001 - already reported to the clients
            if classify_failure(exc).status == "UNAVAILABLE":
                # The peer (or dealer) went away: re-share before the next session, so a
                # restarted peer gets weights without waiting for a client request.
                self._set_ready(False)

    def _check_peer_hello(self) -> None:
        """While idle: a follower without weights says hello; re-share with it."""
        try:
            msg = self.channel.recv(0.01)
        except (ChannelTimeout, ChannelDown):
            return
        if msg.get("type") == "hello":
            log.info("event=peer_hello need_weights=%s", msg.get("need_weights"))
            if msg.get("need_weights") or msg.get("epoch") != self.epoch:
                self._set_ready(False)
        else:
            log.info("event=stale_control type=%s session=%s", msg.get("type"),
                     msg.get("session"))

    def _await_reply(self, session: str, timeout: float, kind: str = "ready") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"no reply to {session} within {timeout:g} s")
            msg = self.channel.recv(left)
            if msg.get("type") == kind and msg.get("session") == session:
                return msg
            log.info("event=stale_control type=%s session=%s", msg.get("type"),
                     msg.get("session"))

    def run_forever(self) -> None:
        log.info("event=leader_started epoch=%s", self.epoch)
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("event=leader_step_error")
                self.stop_event.wait(self.retry_interval)


class Follower(_Base):
    """Party 1's loop: wait for the leader's messages and follow them."""

    role = "follower"

    def __init__(self, *args: Any, poll_interval: float = 0.5, hello_interval: float = 2.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.poll_interval = poll_interval
        self.hello_interval = hello_interval
        self.epoch: str | None = None
        self._last_hello = -float("inf")

    def _say_hello(self) -> None:
        """Without weights, remind the leader now and then (it may not know we restarted)."""
        now = time.monotonic()
        if self.epoch is not None or now - self._last_hello < self.hello_interval:
            return
        self._last_hello = now
        try:
            self.channel.send({"type": "hello", "need_weights": True, "epoch": None})
        except ChannelDown:
            pass

    def step(self) -> None:
        self.queue.expire()
        self._say_hello()
        try:
            msg = self.channel.recv(self.poll_interval)
        except ChannelTimeout:
            return
        except ChannelDown as exc:
            if self._ready:
                log.warning("event=leader_lost error=%s", exc)
            # Keep the weight shares: the leader may just have restarted its link; a
            # restarted leader brings a new epoch and re-shares anyway.
            self.stop_event.wait(self.poll_interval)
            return
        kind = msg.get("type")
        if kind == "init":
            self.handle_init(msg)
        elif kind == "batch":
            self.handle_batch(msg)
        elif kind == "prepare":
            self.handle_prepare(msg)
        else:
            log.warning("event=unknown_control type=%s", kind)

    def handle_init(self, msg: dict[str, Any]) -> None:
        session = str(msg.get("session"))
        self._set_ready(False)
        self.epoch = None
        try:
            self.backend.load_public_model(msg.get("model") or {})
        except ValueError as exc:
            # E.g. the parties run different versions of the secure model code: say so
            # now rather than fail obscurely inside the session.
            log.error("event=init_refused session=%s reason=%s", session, exc)
            self.channel.send({"type": "init_ack", "session": session, "ok": False,
                               "reason": str(exc)})
            return
        try:
            self.channel.send({"type": "init_ack", "session": session, "ok": True})
            self.backend.share_weights(session)
        except Exception as exc:  # noqa: BLE001
            failure = classify_failure(exc)
            log.warning("event=init_failed session=%s status=%s error=%s",
                        session, failure.status, failure,
                        exc_info=failure.status == "ABORTED")
            return
        self.epoch = str(msg.get("epoch"))
        log.info("event=weights_received session=%s epoch=%s", session, self.epoch)
        self._set_ready(True)

    def handle_prepare(self, msg: dict[str, Any]) -> None:
        session = str(msg.get("session"))
        ok = False
        if self.epoch is not None and msg.get("epoch") == self.epoch:
            try:
                self.backend.prepare(session, int(msg.get("batch", 1)))
                ok = True
            except Exception as exc:  # noqa: BLE001
                log.warning("event=offline_failed session=%s error=%s", session,
                            type(exc).__name__)
        self.channel.send({"type": "prepared", "session": session, "ok": ok})

    def handle_batch(self, msg: dict[str, Any]) -> None:
        session = str(msg.get("session"))
        if self.epoch is None or msg.get("epoch") != self.epoch:
            self.channel.send({"type": "ready", "session": session, "need_weights": True})
            return
        announced = [(str(r["id"]), tuple(int(d) for d in r["shape"]))
                     for r in msg.get("requests", [])]
        model = msg.get("model")
        found, missing = self.queue.take([rid for rid, _ in announced], self.pairing_timeout)
        shapes = dict(announced)
        run, mismatch = [], []
        for it in found:
            if it.model != model or it.shape != shapes[it.request_id]:
                mismatch.append(it.request_id)
                it.fail("INVALID_ARGUMENT", f"the parties' halves of request {it.request_id!r} "
                                            "disagree (model or shape)")
            else:
                run.append(it)
        if missing:
            log.info("event=halves_missing session=%s count=%d", session, len(missing))
        self.channel.send({"type": "ready", "session": session,
                           "ok": [it.request_id for it in run], "missing": missing,
                           "mismatch": mismatch, "need_weights": False})
        try:
            self._run_session(session, run)
        except Exception:  # noqa: BLE001 - already reported to the clients
            return

    def run_forever(self) -> None:
        log.info("event=follower_started")
        while not self.stop_event.is_set():
            try:
                self.step()
            except Exception:  # noqa: BLE001
                log.exception("event=follower_step_error")
                self.stop_event.wait(self.poll_interval)
