"""Many party pairs behind one client: each request goes to a healthy, least-loaded pair.

A *pair* is a party 0 and the party 1 it computes with; on Kubernetes, replica k of each
organisation's StatefulSet (docs/deploy.md).  One pair serves a few images per second;
a :class:`PairPool` spreads a client's requests over many:

    with PairPool("p0-a:50051,p1-a:50051;p0-b:50051,p1-b:50051") as pool:
        pool.wait_ready(60)                  # at least one pair serves the model
        print(pool.infer("photo.jpg").top_k(3))

For each request the pool

1. orders the pairs by: marked down in the last ``recheck`` seconds (last), requests this
   client has in flight at the pair (fewest first), least recently picked;
2. asks both parties of the first pair for their ``grpc.health.v1`` status (two small
   calls at once) and, the first time, for their ModelInfo (the same model as the other
   pairs');
3. if either party is not SERVING, marks the pair down and tries the next one;
4. only then splits the image into shares and sends them, to the two parties of that
   one pair.

Fail-over happens in step 3 only, before the shares exist.  A request whose shares were
sent and whose pair then failed raises :class:`PairFailed` and is not resent: the pair's
parties may still be running it, and a caller that counts requests gets each run at most
once.  Resending would be safe for privacy (every call makes a fresh split, so each
organisation only ever holds independent uniformly random shares), so a caller may call
``infer`` again: the pair is marked down and the retry goes to another one.

"Least-loaded" is what this client knows: its own requests in flight.  Other clients'
load is invisible to it (the parties' ``mpcvit_queue_depth`` metric shows it to
operators).  Torch-free, like the rest of the SDK.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from mpcvit.party import images as imaging
from mpcvit.party.client import (
    ClientError,
    ClientTls,
    ModelInfo,
    PartiesDisagree,
    PartyUnavailable,
    PartyUnreachable,
    Prediction,
    PrivateInferenceClient,
)
from mpcvit.party.images import ImageSource

__all__ = ["NoPairServing", "PairFailed", "PairPool", "PairSource", "parse_pairs"]

Pair = tuple[str, str]
PLACEHOLDER = "{ordinal}"
DNS_PREFIX = "dns:"
#: A restarted party is reconnected within seconds, not grpc's default two minutes.
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 5000))


class PairFailed(PartyUnavailable):
    """The pair serving a request failed after its shares were sent; not resent."""


class NoPairServing(PartyUnavailable):
    """No pair of the pool serves the model now."""


# --------------------------------------------------------------------------- where pairs are


def parse_pairs(spec: str) -> list[Pair]:
    """``"a0:p,a1:p;b0:p,b1:p"``: pairs separated by ``;``, party 0 then party 1."""
    pairs = []
    for chunk in spec.split(";"):
        if not chunk.strip():
            continue
        parts = [a.strip() for a in chunk.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"a pair is 'party0-address,party1-address', got {chunk.strip()!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"no pair in {spec!r}")
    return pairs


def host_of(address: str) -> str:
    """The host of ``host:port`` (``[::1]:50051`` -> ``::1``)."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]")


def resolves(host: str) -> bool:
    """Whether the system resolver knows ``host`` (DNS, /etc/hosts)."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return True


@dataclass(frozen=True)
class PairSource:
    """The pairs: a fixed list, or a pattern whose ``{ordinal}`` the resolver enumerates.

    ``dns:P0,P1`` names pair k's parties by replacing ``{ordinal}`` with k in P0 and P1,
    for k = 0, 1, 2, ... while the names resolve.  With the shipped overlays P0 is
    ``mpcvit-party0-{ordinal}.mpcvit-party0.mpcvit-party0.svc.cluster.local:50051`` (the
    headless Service names every replica, ready or not).  Enumeration stops after
    ``max_gap`` ordinals in a row whose names do not both resolve (a replica being
    recreated briefly has none), or at ``max_pairs``.
    """

    fixed: tuple[Pair, ...] = ()
    pattern: Pair | None = None
    max_pairs: int = 64
    max_gap: int = 2

    def __post_init__(self) -> None:
        if bool(self.fixed) == (self.pattern is not None):
            raise ValueError("give either fixed pairs or one dns: pattern")
        if self.pattern is not None and not all(PLACEHOLDER in p for p in self.pattern):
            raise ValueError(f"a dns: pattern needs {PLACEHOLDER} in both addresses, got "
                             f"{','.join(self.pattern)!r}")

    @classmethod
    def parse(cls, spec: str | Sequence[Sequence[str]]) -> PairSource:
        """``"dns:P0,P1"``, ``"a0,a1;b0,b1"``, or a list of [party0, party1] lists."""
        if isinstance(spec, str):
            text = spec.strip()
            if text.startswith(DNS_PREFIX):
                (pattern,) = parse_pairs(text[len(DNS_PREFIX):]) or [None]
                return cls(pattern=pattern)
            return cls(fixed=tuple(parse_pairs(text)))
        pairs = []
        for item in spec:
            if isinstance(item, str) or len(item) != 2:
                raise ValueError(f"each pair is [party0 address, party1 address], got {item!r}")
            pairs.append((str(item[0]), str(item[1])))
        if not pairs:
            raise ValueError("pairs is empty")
        return cls(fixed=tuple(pairs))

    @property
    def dynamic(self) -> bool:
        return self.pattern is not None

    def describe(self) -> str:
        if self.pattern is not None:
            return DNS_PREFIX + ",".join(self.pattern)
        return ";".join(",".join(p) for p in self.fixed)

    def resolve(self, resolver: Callable[[str], bool] = resolves) -> list[tuple[int, Pair]]:
        """(index, pair) of every pair: the list's positions, or the ordinals that resolve."""
        if self.pattern is None:
            return list(enumerate(self.fixed))
        found: list[tuple[int, Pair]] = []
        gap = 0
        for k in range(self.max_pairs):
            pair = (self.pattern[0].replace(PLACEHOLDER, str(k)),
                    self.pattern[1].replace(PLACEHOLDER, str(k)))
            if all(resolver(host_of(a)) for a in pair):
                found.append((k, pair))
                gap = 0
                continue
            gap += 1
            if gap >= self.max_gap:
                break
        return found


# --------------------------------------------------------------------------- the pool


@dataclass(eq=False)
class _PairState:
    """What the pool knows of one pair; changed only under the pool's lock."""

    index: int
    addresses: Pair
    client: PrivateInferenceClient
    info: ModelInfo | None = None
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    down_until: float = 0.0
    why: str = ""
    last_pick: float = field(default_factory=random.random)  # ties go round the pool

    def name(self) -> str:
        return f"pair {self.index} ({self.addresses[0]}, {self.addresses[1]})"


class PairPool:
    """Sends each request to one healthy, least-loaded pair of many (module docstring).

    Same calls as :class:`~mpcvit.party.client.PrivateInferenceClient` (``wait_ready``,
    ``model_info``, ``infer``, ``infer_batch``, ``close``); thread-safe, so one pool may
    carry many concurrent requests.  ``health_timeout`` bounds each health check;
    ``recheck`` is how long a failed pair is tried only after the others; ``refresh`` how
    often a ``dns:`` source is enumerated again (new replicas join, removed ones leave).
    """

    def __init__(self, pairs: PairSource | str | Sequence[Sequence[str]], *, model: str = "",
                 timeout: float = 120.0, tls: ClientTls | None = None,
                 max_message_bytes: int = 64 << 20, max_pixels: int = imaging.MAX_PIXELS,
                 health_timeout: float = 5.0, recheck: float = 5.0, refresh: float = 30.0,
                 resolver: Callable[[str], bool] = resolves) -> None:
        self.source = pairs if isinstance(pairs, PairSource) else PairSource.parse(pairs)
        if min(timeout, health_timeout) <= 0 or min(recheck, refresh) < 0:
            raise ValueError("timeout and health_timeout must be positive")
        self.model = model
        self.health_timeout = float(health_timeout)
        self.recheck = float(recheck)
        self.refresh = float(refresh)
        self._client_args = dict(model=model, timeout=timeout, tls=tls,
                                 max_message_bytes=max_message_bytes, max_pixels=max_pixels,
                                 channel_options=RECONNECT_OPTIONS)
        self._resolver = resolver
        self._lock = threading.Lock()
        self._states: dict[Pair, _PairState] = {}
        self._active: list[_PairState] = []
        self._resolved_at = float("-inf")
        self._info: ModelInfo | None = None
        self._seq = 0.0
        self._refresh_pairs()

    # -- lifecycle

    def close(self) -> None:
        with self._lock:
            states = list(self._states.values())
        for state in states:
            state.client.close()

    def __enter__(self) -> PairPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- pairs

    def _refresh_pairs(self) -> None:
        """Enumerate a ``dns:`` source again when ``refresh`` seconds have passed."""
        now = time.monotonic()
        if self._active and (not self.source.dynamic or now - self._resolved_at < self.refresh):
            return
        found = self.source.resolve(self._resolver)
        with self._lock:
            self._resolved_at = now
            active = []
            for index, pair in found:
                state = self._states.get(pair)
                if state is None:
                    state = _PairState(index, pair,
                                       PrivateInferenceClient(pair, **self._client_args))
                    self._states[pair] = state
                active.append(state)
            self._active = active

    def pairs(self) -> list[dict]:
        """Each current pair: index, addresses, requests served, failed and in flight, and
        why it was last marked down (empty if never)."""
        with self._lock:
            return [{"index": s.index, "addresses": s.addresses, "served": s.served,
                     "failed": s.failed, "in_flight": s.in_flight, "down": s.why}
                    for s in self._active]

    def _adopt(self, state: _PairState, info: ModelInfo) -> None:
        """Remember a pair's model; every pair must serve the same one."""
        key = (info.name, info.input_shape, info.num_classes, info.class_names,
               info.precision_bits, info.mean, info.std)
        with self._lock:
            if self._info is None:
                self._info = info
            first = self._info
            state.info = info
        if key != (first.name, first.input_shape, first.num_classes, first.class_names,
                   first.precision_bits, first.mean, first.std):
            raise PartiesDisagree(f"{state.name()} serves model {info.name!r} "
                                  f"{info.input_shape}, {info.num_classes} classes; another "
                                  f"pair serves {first.name!r} {first.input_shape}, "
                                  f"{first.num_classes} classes")

    def _mark_down(self, state: _PairState, why: str) -> None:
        with self._lock:
            state.down_until = time.monotonic() + self.recheck
            state.why = why

    def _check(self, state: _PairState) -> str | None:
        """None when both parties of the pair serve the pool's model, else why not."""
        statuses = state.client.health(self.health_timeout)
        bad = [f"party {p} at {state.addresses[p]}: {s}" for p, s in enumerate(statuses)
               if s != "SERVING"]
        if bad:
            return "; ".join(bad)
        if state.info is None:
            try:
                probe = state.client.check_ready(self.health_timeout)
            except ClientError as exc:
                return str(exc)
            if isinstance(probe, str):
                return probe
            self._adopt(state, probe)
        return None

    def _acquire(self) -> _PairState:
        """A serving pair, counted in flight; the others are skipped (and marked down)."""
        self._refresh_pairs()
        tried: list[_PairState] = []
        while True:
            with self._lock:
                now = time.monotonic()
                candidates = [s for s in self._active if s not in tried]
                if not candidates:
                    break
                state = min(candidates,
                            key=lambda s: (s.down_until > now, s.in_flight, s.last_pick))
                state.in_flight += 1
                self._seq += 1
                state.last_pick = self._seq
            try:
                why = self._check(state)
            except BaseException:
                self._release(state)
                raise
            if why is None:
                return state
            self._release(state)
            self._mark_down(state, why)
            tried.append(state)
        if not tried:
            raise NoPairServing(f"no pairs found for {self.source.describe()}")
        raise NoPairServing("no pair serves the model now: " +
                            " | ".join(f"{s.name()}: {s.why}" for s in tried))

    def _release(self, state: _PairState) -> None:
        with self._lock:
            state.in_flight -= 1

    # -- calls

    def wait_ready(self, timeout: float = 60.0, *, connect_timeout: float = 5.0,
                   progress: Callable[[str], None] | None = None) -> ModelInfo:
        """Wait until at least one pair serves the model; return its ModelInfo.

        Raises :class:`~mpcvit.party.client.NotAParty` at once for an address where
        another service answers, :class:`~mpcvit.party.client.PartyUnreachable` when no
        address of any pair answers within ``connect_timeout``, and
        :class:`NoPairServing` when no pair is ready after ``timeout``.  ``progress`` gets
        a line for each pair that is not (yet) serving.
        """
        deadline = time.monotonic() + timeout
        shown: dict[int, str] = {}
        while True:
            ready, waiting, unreachable = self._probe_all(connect_timeout)
            for state, why in [*waiting, *unreachable]:
                self._mark_down(state, why)
                if progress is not None and shown.get(state.index) != why:
                    progress(f"{state.name()} not serving: {why}")
                shown[state.index] = why
            if ready:
                return self._info  # type: ignore[return-value]
            if unreachable and not waiting:
                raise PartyUnreachable("no pair reachable: " + " | ".join(
                    f"{s.name()}: {why}" for s, why in unreachable))
            if time.monotonic() >= deadline:
                reasons = [f"{s.name()}: {why}" for s, why in waiting] or [
                    f"no pairs found for {self.source.describe()}"]
                raise NoPairServing(f"no pair ready after {timeout:g} s: " + " | ".join(reasons))
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _probe_all(self, connect_timeout: float) -> tuple[list, list, list]:
        """(ready pairs, (pair, why) starting, (pair, why) unreachable)."""
        self._refresh_pairs()
        with self._lock:
            states = list(self._active)
        ready, waiting, unreachable = [], [], []
        for state in states:
            try:
                probe = state.client.check_ready(connect_timeout)
            except PartyUnreachable as exc:
                unreachable.append((state, str(exc)))
                continue
            if isinstance(probe, str):
                waiting.append((state, probe))
            else:
                self._adopt(state, probe)
                ready.append(state)
        return ready, waiting, unreachable

    def model_info(self, refresh: bool = False) -> ModelInfo:
        """The model every pair serves (asked of a serving pair the first time)."""
        if self._info is not None and not refresh:
            return self._info
        state = self._acquire()
        try:
            info = state.client.model_info(refresh=True)
            self._adopt(state, info)
            return info
        finally:
            self._release(state)

    def infer(self, image: ImageSource, *, preprocessed: bool | None = None,
              invert: bool | None = None) -> Prediction:
        """Classify one image on one pair (see :meth:`PrivateInferenceClient.infer`)."""
        return self.infer_batch([image], preprocessed=preprocessed, invert=invert)[0]

    def infer_batch(self, images: Sequence[ImageSource] | np.ndarray, *,
                    preprocessed: bool | None = None,
                    invert: bool | None = None) -> list[Prediction]:
        """Classify several images, all on the one pair this call picks."""
        state = self._acquire()
        try:
            predictions = state.client.infer_batch(images, preprocessed=preprocessed,
                                                   invert=invert)
        except PartyUnavailable as exc:
            self._mark_down(state, str(exc))
            with self._lock:
                state.failed += 1
            raise PairFailed(f"{state.name()} failed after the shares were sent (not resent; "
                             f"the next requests go to other pairs): {exc}",
                             code=exc.code, party=exc.party) from exc
        finally:
            self._release(state)
        with self._lock:
            state.served += len(predictions)
        return [replace(p, pair=state.index) for p in predictions]
