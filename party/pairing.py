"""Where a party keeps client halves until both parties hold them: the pairing table.

Plain Python (no gRPC, no CrypTen) so the pairing rules are unit-testable.

A request is *paired* once this party holds its half AND the other party announced that
it holds its own (``remote_arrived``, fed from the peer's ``Arrived`` control messages).
Only paired halves are eligible for a secure session, so a half whose twin never comes
(sent to one party only, mismatched ids) never delays anyone else:

- an unpaired half fails with DEADLINE_EXCEEDED after ``pairing_timeout``, at both
  parties alike, naming the party that never got its share;
- halves whose model or shape differ from the other party's announcement fail with
  INVALID_ARGUMENT at both parties (each sees both announcements);
- a paired half that waits longer than ``request_timeout`` for a session fails with
  DEADLINE_EXCEEDED (a backstop: the leader serves paired halves in order).

The leader (party 0) takes batches of paired halves with :meth:`PairingTable.next_batch`;
the follower (party 1) looks the announced ones up with :meth:`PairingTable.take`, which
never waits.  Each request's result is a ``concurrent.futures.Future`` the RPC handler
waits on; every failure is a :class:`ServiceError` carrying a gRPC status name.
"""

from __future__ import annotations

import collections
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_DROPPED_KEPT = 4096  # why recent halves of the peer went away, for clearer errors


class ServiceError(Exception):
    """A request failed; ``status`` is a gRPC status code name (e.g. ``"NOT_FOUND"``)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"ServiceError({self.status}, {self.message!r})"


@dataclass(frozen=True)
class SessionStats:
    """Cost of one secure session, as this party measured it."""

    session: str
    seconds: float
    rounds: int
    bytes_sent: int
    batch_size: int


@dataclass(frozen=True)
class RequestResult:
    """This party's output share for one request (never the plaintext logits)."""

    request_id: str
    share: np.ndarray  # int64 fixed point, shape (num_classes,)
    precision_bits: int
    stats: SessionStats
    queue_seconds: float


@dataclass(eq=False)
class PendingRequest:
    """One half of a client request, waiting for its twin and then for its session."""

    request_id: str
    model: str
    share: np.ndarray  # int64, the image's shape
    received: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)
    paired: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.share.shape)

    def fail(self, status: str, message: str) -> None:
        if not self.future.done():
            self.future.set_exception(ServiceError(status, message))

    def succeed(self, result: RequestResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


@dataclass(frozen=True)
class Announcement:
    """The other party's half of a request, as it announced it."""

    request_id: str
    model: str
    shape: tuple[int, ...]
    received: float = 0.0


def check_request_id(request_id: str) -> None:
    if not REQUEST_ID_PATTERN.match(request_id or ""):
        raise ServiceError(
            "INVALID_ARGUMENT", "request_id must be 1-128 characters of [A-Za-z0-9._:-]"
        )


def mismatch_message(request_id: str) -> str:
    return f"the parties' halves of request {request_id!r} disagree (model or shape)"


class PairingTable:
    """This party's halves and the other party's announcements (thread-safe)."""

    def __init__(
        self, *, peer: int, pairing_timeout: float, request_timeout: float,
        max_pending: int = 1024, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if pairing_timeout <= 0 or request_timeout <= 0:
            raise ValueError("pairing_timeout and request_timeout must be positive")
        self.peer = peer
        self.pairing_timeout = pairing_timeout
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        # The peer may hold as many halves as we do; more announcements than this are
        # a peer gone wrong: the oldest are forgotten (their halves then time out).
        self.max_announcements = 4 * max(max_pending, 256)
        self._clock = clock
        self._cond = threading.Condition()
        self._local: collections.OrderedDict[str, PendingRequest] = collections.OrderedDict()
        self._remote: collections.OrderedDict[str, Announcement] = collections.OrderedDict()
        self._dropped: collections.OrderedDict[str, tuple[str, str]] = (
            collections.OrderedDict())
        self._closed = False
        self._wakeups = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._local)

    @property
    def paired_count(self) -> int:
        with self._cond:
            return sum(1 for it in self._local.values() if it.paired)

    @property
    def announcements(self) -> int:
        """Halves the peer announced that this party does not hold (yet)."""
        with self._cond:
            return len(self._remote)

    # -- pairing -------------------------------------------------------------------------
    def _match(self, item: PendingRequest, ann: Announcement) -> bool:
        """Pair ``item`` with the peer's announcement; on a mismatch fail and drop it."""
        if ann.model != item.model or tuple(ann.shape) != item.shape:
            del self._local[item.request_id]
            item.fail("INVALID_ARGUMENT", mismatch_message(item.request_id))
            return False
        item.paired = True
        return True

    def submit(self, items: Iterable[PendingRequest]) -> None:
        """Add this party's halves atomically (all or none); ids must be new."""
        items = list(items)
        with self._cond:
            if self._closed:
                raise ServiceError("UNAVAILABLE", "party is shutting down")
            ids = [it.request_id for it in items]
            if len(set(ids)) != len(ids):
                raise ServiceError("INVALID_ARGUMENT", "duplicate request_id in one call")
            clash = [i for i in ids if i in self._local]
            if clash:
                raise ServiceError("ALREADY_EXISTS", f"request_id {clash[0]!r} is already pending")
            if len(self._local) + len(items) > self.max_pending:
                raise ServiceError("RESOURCE_EXHAUSTED", "too many pending requests; retry later")
            now = self._clock()
            for it in items:
                it.received = now
                it.paired = False
                self._local[it.request_id] = it
                ann = self._remote.pop(it.request_id, None)
                if ann is not None:
                    self._match(it, ann)
            self._cond.notify_all()

    def remote_arrived(self, announcements: Iterable[Announcement]) -> None:
        """The peer holds these halves now: pair the ones this party holds."""
        now = self._clock()
        with self._cond:
            for ann in announcements:
                item = self._local.get(ann.request_id)
                if item is not None and not item.paired:
                    self._match(item, ann)
                elif item is None:
                    self._remote[ann.request_id] = Announcement(
                        ann.request_id, ann.model, tuple(ann.shape), now)
                    self._remote.move_to_end(ann.request_id)
                    while len(self._remote) > self.max_announcements:
                        self._remote.popitem(last=False)
            self._cond.notify_all()

    def remote_dropped(self, request_ids: Iterable[str], status: str, message: str) -> None:
        """The peer dropped its halves of these requests: fail ours, forget theirs."""
        with self._cond:
            for rid in request_ids:
                self._remote.pop(rid, None)
                self._dropped[rid] = (status, message)
                self._dropped.move_to_end(rid)
                item = self._local.pop(rid, None)
                if item is not None:
                    item.fail(status, message)
            while len(self._dropped) > _DROPPED_KEPT:
                self._dropped.popitem(last=False)
            self._cond.notify_all()

    def why_dropped(self, request_id: str) -> tuple[str, str] | None:
        """(status, message) of the peer's Dropped notice for ``request_id``, if any."""
        with self._cond:
            return self._dropped.get(request_id)

    def cancel(self, request_ids: Iterable[str], status: str = "CANCELLED",
               message: str = "request cancelled by the client") -> list[str]:
        """Drop halves whose caller went away; return the ids that were still here."""
        removed = []
        with self._cond:
            for rid in request_ids:
                item = self._local.pop(rid, None)
                if item is not None:
                    item.fail(status, message)
                    removed.append(rid)
            if removed:
                self._cond.notify_all()
        return removed

    def local_halves(self) -> list[Announcement]:
        """What this party holds, to announce again after the link came back."""
        with self._cond:
            return [Announcement(it.request_id, it.model, it.shape)
                    for it in self._local.values()]

    # -- leader side ---------------------------------------------------------------------
    def _eligible(self) -> list[PendingRequest]:
        return [it for it in self._local.values() if it.paired]

    def next_batch(self, max_batch: int, max_wait: float, timeout: float) -> list[PendingRequest]:
        """Take up to ``max_batch`` oldest paired halves of one model and shape.

        Returns an empty list after ``timeout`` or on :meth:`wake`.  Once the first paired
        half is there, wait up to ``max_wait`` seconds for the batch to fill: the knob that
        trades one request's latency for throughput.
        """
        deadline = self._clock() + timeout
        with self._cond:
            wakeups = self._wakeups
            while not self._eligible():
                left = deadline - self._clock()
                if left <= 0 or self._closed or self._wakeups != wakeups:
                    return []
                self._cond.wait(left)
            if max_wait > 0:
                fill_deadline = self._clock() + max_wait
                while (len(self._eligible()) < max_batch and not self._closed
                       and self._wakeups == wakeups):
                    left = fill_deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            eligible = self._eligible()
            if not eligible:
                return []
            first = eligible[0]
            batch = [it for it in eligible
                     if it.model == first.model and it.shape == first.shape][:max_batch]
            for it in batch:
                del self._local[it.request_id]
            return batch

    def requeue_front(self, items: list[PendingRequest]) -> None:
        """Put taken halves back at the head (their session could not start)."""
        with self._cond:
            for it in reversed(items):
                if it.future.done():
                    continue
                self._local[it.request_id] = it
                self._local.move_to_end(it.request_id, last=False)
            self._cond.notify_all()

    def wake(self) -> None:
        """End a :meth:`next_batch` wait now (the coordinator has something to do)."""
        with self._cond:
            self._wakeups += 1
            self._cond.notify_all()

    # -- follower side -------------------------------------------------------------------
    def take(self, announced: list[Announcement]
             ) -> tuple[list[PendingRequest], list[str], list[str]]:
        """Remove the halves the leader put in a batch; never waits.

        Returns (found in the given order, ids not held here, ids whose model or shape
        differ from the leader's).  The leader announced every one before its batch, on
        the same ordered link, so a missing one was dropped here (cancelled, expired).
        """
        found, missing, mismatch = [], [], []
        with self._cond:
            for ann in announced:
                item = self._local.get(ann.request_id)
                if item is None:
                    missing.append(ann.request_id)
                elif item.model != ann.model or item.shape != tuple(ann.shape):
                    del self._local[ann.request_id]
                    item.fail("INVALID_ARGUMENT", mismatch_message(ann.request_id))
                    mismatch.append(ann.request_id)
                else:
                    del self._local[ann.request_id]
                    self._remote.pop(ann.request_id, None)
                    found.append(item)
            self._cond.notify_all()
        return found, missing, mismatch

    # -- housekeeping --------------------------------------------------------------------
    def expire(self) -> list[str]:
        """Fail halves that waited too long; return their ids (to tell the peer).

        Unpaired halves go after ``pairing_timeout``: the other party never announced its
        share.  Paired ones go after ``request_timeout``.  Announcements of the peer that
        found no twin here within ``pairing_timeout`` are forgotten (the peer's own half
        expires at the same time).
        """
        now = self._clock()
        expired = []
        with self._cond:
            for it in list(self._local.values()):
                age = now - it.received
                if not it.paired and age > self.pairing_timeout:
                    it.fail("DEADLINE_EXCEEDED",
                            f"party {self.peer} never received request {it.request_id!r}'s "
                            f"share (not paired within {self.pairing_timeout:g} s)")
                elif it.paired and age > self.request_timeout:
                    it.fail("DEADLINE_EXCEEDED",
                            f"request {it.request_id!r} waited more than "
                            f"{self.request_timeout:g} s for a secure session")
                else:
                    continue
                del self._local[it.request_id]
                expired.append(it.request_id)
            while self._remote:
                ann = next(iter(self._remote.values()))
                if now - ann.received <= self.pairing_timeout:
                    break
                self._remote.popitem(last=False)
            if expired:
                self._cond.notify_all()
        return expired

    def fail_all(self, status: str, message: str) -> list[str]:
        """Fail every half held here; return their ids."""
        with self._cond:
            items = list(self._local.values())
            self._local.clear()
            self._cond.notify_all()
        for it in items:
            it.fail(status, message)
        return [it.request_id for it in items]

    def peer_lost(self, message: str) -> list[str]:
        """The link to the peer broke: its halves are gone, so every one here fails with
        UNAVAILABLE now, and its announcements are forgotten."""
        with self._cond:
            self._remote.clear()
        return self.fail_all("UNAVAILABLE", message)

    def close(self, message: str = "party is shutting down") -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.fail_all("UNAVAILABLE", message)
