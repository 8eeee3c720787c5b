"""Where a party keeps the input shares it received until a secure session uses them.

Plain Python (no gRPC, no CrypTen) so the pairing rules are unit-testable:

- The leader (party 0) takes FIFO batches with :meth:`InferenceQueue.next_batch` and
  announces their request ids to the follower; the follower looks its halves up by id
  with :meth:`InferenceQueue.take`, waiting a bounded time for halves still in flight.
- Each request's result is a ``concurrent.futures.Future`` the RPC handler waits on;
  every failure is a :class:`ServiceError` carrying a gRPC status name.
- A half that waits longer than ``request_timeout`` fails with DEADLINE_EXCEEDED, so a
  request sent to one party only can never pin memory or block a client forever.
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
    """One half of a client request, waiting for its session."""

    request_id: str
    model: str
    share: np.ndarray  # int64, the image's shape
    received: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.share.shape)

    def fail(self, status: str, message: str) -> None:
        if not self.future.done():
            self.future.set_exception(ServiceError(status, message))

    def succeed(self, result: RequestResult) -> None:
        if not self.future.done():
            self.future.set_result(result)


def check_request_id(request_id: str) -> None:
    if not REQUEST_ID_PATTERN.match(request_id or ""):
        raise ServiceError(
            "INVALID_ARGUMENT", "request_id must be 1-128 characters of [A-Za-z0-9._:-]"
        )


class InferenceQueue:
    """Pending halves by request id, in arrival order (thread-safe)."""

    def __init__(
        self, *, request_timeout: float, max_pending: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if request_timeout <= 0:
            raise ValueError("request_timeout must be positive")
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: collections.OrderedDict[str, PendingRequest] = collections.OrderedDict()
        self._closed = False

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- arrivals ------------------------------------------------------------------------
    def submit(self, items: Iterable[PendingRequest]) -> None:
        """Add halves atomically (all or none); ids must be new."""
        items = list(items)
        with self._cond:
            if self._closed:
                raise ServiceError("UNAVAILABLE", "party is shutting down")
            ids = [it.request_id for it in items]
            if len(set(ids)) != len(ids):
                raise ServiceError("INVALID_ARGUMENT", "duplicate request_id in one call")
            clash = [i for i in ids if i in self._pending]
            if clash:
                raise ServiceError("ALREADY_EXISTS", f"request_id {clash[0]!r} is already pending")
            if len(self._pending) + len(items) > self.max_pending:
                raise ServiceError("RESOURCE_EXHAUSTED", "too many pending requests; retry later")
            now = self._clock()
            for it in items:
                it.received = now
                self._pending[it.request_id] = it
            self._cond.notify_all()

    def cancel(self, request_ids: Iterable[str], status: str = "CANCELLED",
               message: str = "request cancelled by the client") -> None:
        """Drop halves whose caller went away (no-op for ids already taken)."""
        with self._cond:
            for rid in request_ids:
                item = self._pending.pop(rid, None)
                if item is not None:
                    item.fail(status, message)

    # -- leader side ---------------------------------------------------------------------
    def next_batch(self, max_batch: int, max_wait: float, timeout: float) -> list[PendingRequest]:
        """Take up to ``max_batch`` oldest halves of one model (empty list on ``timeout``).

        Once the first half is there, wait up to ``max_wait`` seconds for the batch to
        fill: the knob that trades one request's latency for throughput.
        """
        deadline = self._clock() + timeout
        with self._cond:
            while not self._pending:
                left = deadline - self._clock()
                if left <= 0 or self._closed:
                    return []
                self._cond.wait(left)
            if max_wait > 0 and len(self._pending) < max_batch:
                fill_deadline = self._clock() + max_wait
                while len(self._pending) < max_batch and not self._closed:
                    left = fill_deadline - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            if not self._pending:
                return []
            first = next(iter(self._pending.values()))
            batch = [
                it for it in self._pending.values()
                if it.model == first.model and it.shape == first.shape
            ][:max_batch]
            for it in batch:
                del self._pending[it.request_id]
            return batch

    def requeue_front(self, items: list[PendingRequest]) -> None:
        """Put taken halves back at the head (their session could not start)."""
        with self._cond:
            for it in reversed(items):
                if it.future.done():
                    continue
                self._pending[it.request_id] = it
                self._pending.move_to_end(it.request_id, last=False)
            self._cond.notify_all()

    # -- follower side -------------------------------------------------------------------
    def take(
        self, request_ids: list[str], timeout: float
    ) -> tuple[list[PendingRequest], list[str]]:
        """Remove and return the halves with these ids, waiting up to ``timeout`` for all.

        Returns (found, in the given order; ids still missing when time ran out).
        """
        deadline = self._clock() + timeout
        wanted = list(request_ids)
        with self._cond:
            while True:
                missing = [rid for rid in wanted if rid not in self._pending]
                left = deadline - self._clock()
                if not missing or left <= 0 or self._closed:
                    break
                self._cond.wait(left)
            found = [self._pending.pop(rid) for rid in wanted if rid in self._pending]
            return found, missing

    # -- housekeeping --------------------------------------------------------------------
    def expire(self) -> int:
        """Fail halves older than ``request_timeout``; return how many."""
        now = self._clock()
        with self._cond:
            old = [it for it in self._pending.values()
                   if now - it.received > self.request_timeout]
            for it in old:
                del self._pending[it.request_id]
                it.fail("DEADLINE_EXCEEDED",
                        f"request {it.request_id!r} was not paired with the other party's "
                        f"half within {self.request_timeout:g} s")
            return len(old)

    def fail_all(self, status: str, message: str) -> int:
        """Fail every pending half (peer lost, shutting down)."""
        with self._cond:
            items = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        for it in items:
            it.fail(status, message)
        return len(items)

    def close(self, message: str = "party is shutting down") -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.fail_all("UNAVAILABLE", message)
