"""The dealer: correlated randomness (Beaver triples and friends) served over gRPC.

Protocol (CrypTen's TTP scheme, moved off torch.distributed):

* every party opens the session with the dealer and receives a private seed; the party
  and the dealer then draw the same pseudo-random stream;
* party ``i > 0`` draws all of its tuple shares from that stream, locally;
* party 0 draws its shares of the random inputs (``a``, ``b``, ``r``...) the same way
  and asks the dealer for its share of the dependent value (``a*b``, ``r^2``, wraps...),
  which the dealer computes from every party's stream;
* kinds that no stream can give (FSS keys) are fetched by every party, each getting its
  own part, derived from a dealer-private session secret and the request's index.

This module is the plumbing both sides share: :class:`DealerProvider` (a party's CrypTen
tuple provider: sessions, offline preparation, fetching) and :class:`DealerState` /
:class:`DealerService` (the dealer).  What each kind of tuple is, party half and dealer
half, lives with its protocol in :mod:`mpcvit.mpc.protocols` (``tuples.KINDS``).

The dealer never sees inputs, weights or outputs; it must not collude with a party.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
from crypten.mpc.provider.provider import TupleProvider
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..proto.generated import dealer_pb2, dealer_pb2_grpc
from .config import RECONNECT_OPTIONS, ProviderSpec, TlsConfig
from .errors import DealerError, DealerUnreachable
from .protocols import compare, fss, masked  # noqa: F401  (register their tuple kinds)
from .protocols.masked import MaskStore
from .protocols.tuples import KINDS, TupleRequest, kind_of
from .roles import Allowed, Role, RoleChecker

if TYPE_CHECKING:
    from google.protobuf.message import Message

log = logging.getLogger("mpcvit.dealer")


def _short(text: str | None, limit: int = 160) -> str:
    """gRPC's connection errors can be long; keep their start."""
    text = (text or "").strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _tensor_msg(t: torch.Tensor) -> dealer_pb2.Tensor:
    return dealer_pb2.Tensor(shape=list(t.shape), data=t.contiguous().numpy().tobytes())


def _tensor_from(msg: dealer_pb2.Tensor) -> torch.Tensor:
    arr = np.frombuffer(bytearray(msg.data), dtype="<i8").reshape(tuple(msg.shape))
    return torch.from_numpy(arr)


def request_message(req: TupleRequest, session: str, seq: int,
                    rank: int = 0) -> dealer_pb2.CorrectionRequest:
    return dealer_pb2.CorrectionRequest(
        session=session, kind=req.kind, size0=list(req.size0), size1=list(req.size1),
        op=req.op, op_kwargs_json=req.kwargs_json, seq=seq, rank=rank,
    )


def fetches(req: TupleRequest, rank: int) -> bool:
    """Whether party ``rank`` asks the dealer for this request's tuple (party 0 for every
    kind; the others only for kinds every party fetches, like FSS keys)."""
    return rank == 0 or kind_of(req).fetched_by == "every"


def request_from(msg: dealer_pb2.CorrectionRequest) -> TupleRequest:
    return TupleRequest(msg.kind, tuple(msg.size0), tuple(msg.size1), msg.op,
                        msg.op_kwargs_json or "{}")


# ----------------------------------------------------------------------------------
# Party side
# ----------------------------------------------------------------------------------
@dataclass
class _PartyState:
    session: str
    rank: int
    world_size: int
    spec: ProviderSpec
    channel: grpc.Channel
    stub: dealer_pb2_grpc.DealerServiceStub
    generator: torch.Generator
    prepared: collections.deque = field(default_factory=collections.deque)
    trace: list[TupleRequest] = field(default_factory=list)
    requests: int = 0
    bytes: int = 0
    offline_bytes: int = 0
    seconds: float = 0.0
    offline_seconds: float = 0.0


class DealerProvider(TupleProvider):
    """CrypTen TupleProvider that draws tuples from the dealer's streams (see module doc).

    Online, party 0 makes one dealer round trip per tuple (and every party one per FSS
    key).  :meth:`prepare` moves all of that off the critical path: given a model's trace
    (recorded by an earlier run), it opens a future session, fetches what this party
    needs from the dealer in a few batched calls and pre-draws its shares, so the
    session's online phase never waits on the dealer.
    """

    NAME = "DEALER"
    BATCH_ELEMENTS = 8 << 20  # int64 elements per CorrectionBatch reply (64 MiB)

    def __init__(self) -> None:
        super().__init__()
        self._state: _PartyState | None = None
        self._prepared: dict[str, _PartyState] = {}
        # Public right factors E of masked products, by the weight key of their requests
        # (held weakly: one goes when its weight goes); used by the offline fold.
        self.public_factors: weakref.WeakValueDictionary[str, torch.Tensor] = (
            weakref.WeakValueDictionary())
        self.last_trace: list[TupleRequest] = []
        self.last_stats: dict[str, float] = {}

    # -- session lifecycle (called by mpc.runtime / the launcher) -----------------------
    @staticmethod
    def _channel(spec: ProviderSpec) -> grpc.Channel:
        if spec.address is None:
            raise DealerError("dealer provider needs an address")
        options = [("grpc.max_receive_message_length", 1 << 30),
                   ("grpc.max_send_message_length", 1 << 30), *RECONNECT_OPTIONS]
        if spec.tls is not None:
            options += spec.tls.channel_options(Role.dealer())  # only the dealer may answer
            return grpc.secure_channel(spec.address, spec.tls.channel_credentials(), options)
        return grpc.insecure_channel(spec.address, options)

    @staticmethod
    def probe(spec: ProviderSpec) -> str | None:
        """None if the dealer answers (its gRPC health service) within
        ``spec.connect_timeout``; else why not.  A refused connection fails at once."""
        channel = DealerProvider._channel(spec)
        try:
            health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=spec.connect_timeout)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return (f"dealer unreachable at {spec.address} ({exc.code().name}: "
                        f"{_short(exc.details())})")
        finally:
            channel.close()
        return None

    def _open(self, session: str, rank: int, world_size: int, spec: ProviderSpec) -> _PartyState:
        channel = self._channel(spec)
        stub = dealer_pb2_grpc.DealerServiceStub(channel)
        try:
            # Not wait_for_ready: a dealer that refuses connections fails the session now,
            # and one that does not answer fails it within the connect timeout.
            reply = stub.OpenSession(
                dealer_pb2.OpenSessionRequest(session=session, rank=rank, world_size=world_size),
                timeout=spec.connect_timeout,
            )
        except grpc.RpcError as exc:
            channel.close()
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise DealerUnreachable(
                    f"dealer unreachable at {spec.address} ({exc.code().name}: "
                    f"{_short(exc.details())})") from exc
            raise DealerError(
                f"dealer at {spec.address}: {exc.code().name}: {exc.details()}"
            ) from exc
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int.from_bytes(reply.seed, "little"))
        return _PartyState(session, rank, world_size, spec, channel, stub, gen)

    def begin(self, session: str, rank: int, world_size: int, spec: ProviderSpec) -> None:
        """Start using the dealer for ``session`` (prepared offline if :meth:`prepare` ran)."""
        state = self._prepared.pop(session, None)
        self._state = state or self._open(session, rank, world_size, spec)

    def prepare(
        self, session: str, rank: int, world_size: int, spec: ProviderSpec,
        trace: list[TupleRequest], check: Callable[[], None] | None = None,
    ) -> float:
        """Offline phase for a future ``session`` that will make exactly ``trace``'s requests.

        A party's tuples are the same whether it prepares them or draws them during the
        session, so the parties may decide this each on its own.  ``check`` is called now
        and then and may raise to give the work up (e.g. the peer it is for went away).
        Returns seconds spent.
        """
        tic = time.perf_counter()
        check = check or (lambda: None)
        check()
        state = self._open(session, rank, world_size, spec)
        try:
            corrections: collections.deque = collections.deque()
            batch: list[dealer_pb2.CorrectionRequest] = []
            elements = 0
            for seq, req in enumerate(trace):
                if fetches(req, rank):
                    batch.append(request_message(req, session, seq, rank))
                    elements += kind_of(req).result_elements(req)
                if batch and (elements >= self.BATCH_ELEMENTS or seq == len(trace) - 1):
                    check()
                    corrections.extend(self._fetch_batch(state, batch))
                    batch, elements = [], 0
            state.offline_bytes = state.bytes
            for i, req in enumerate(trace):
                if i % 32 == 0:
                    check()
                fetch = corrections.popleft if fetches(req, rank) else None
                kind = kind_of(req)
                state.prepared.append(
                    (req, kind.fold(req, kind.draw(state.generator, req, fetch),
                                    self.public_factors)))
        except BaseException:
            # Nothing prepared: close the session (it counts against this party's cap at
            # the dealer) and its channel.
            self._close(state, timeout=1.0)
            raise
        state.offline_seconds = time.perf_counter() - tic
        self._prepared[session] = state
        return state.offline_seconds

    @property
    def prepared_sessions(self) -> int:
        """Sessions prepared offline and not used yet (a metrics gauge)."""
        return len(self._prepared)

    def is_prepared(self, session: str) -> bool:
        """Whether :meth:`prepare` ran for ``session`` and :meth:`begin` has not used it."""
        return session in self._prepared

    def discard_prepared(self) -> None:
        """Forget every prepared session, telling the dealer (it caps open sessions per
        caller, so sessions left open would count against this party until they expire)."""
        for state in self._prepared.values():
            self._close(state, timeout=1.0)
        self._prepared.clear()

    @staticmethod
    def _close(state: _PartyState, timeout: float) -> None:
        try:
            state.stub.CloseSession(
                dealer_pb2.CloseSessionRequest(session=state.session, rank=state.rank),
                timeout=timeout,
            )
        except grpc.RpcError:
            pass  # the dealer forgets idle sessions on its own
        state.channel.close()

    def end(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        self.last_trace = state.trace
        self.last_stats = self._stats(state)
        self._close(state, timeout=5.0)

    @property
    def state(self) -> _PartyState:
        if self._state is None:
            raise DealerError("no dealer session is open in this process")
        return self._state

    @property
    def in_session(self) -> bool:
        """Whether a dealer session is open in this process."""
        return self._state is not None

    @property
    def trace(self) -> list[TupleRequest]:
        """The open session's tuple requests so far (what preparing its rerun needs)."""
        return self.state.trace

    def restart_prepared(self, session: str, trace: list[TupleRequest]) -> float:
        """Close the open session and continue in ``session``, prepared offline for
        ``trace``; every party calls this at the same point.  Returns offline seconds."""
        s = self.state
        spec, rank, world = s.spec, s.rank, s.world_size
        self.end()
        seconds = self.prepare(session, rank, world, spec, trace)
        self.begin(session, rank, world, spec)
        return seconds

    @staticmethod
    def _stats(s: _PartyState) -> dict[str, float]:
        return {"requests": s.requests, "bytes": s.bytes, "offline_bytes": s.offline_bytes,
                "seconds": s.seconds, "offline_seconds": s.offline_seconds,
                "tuples": len(s.trace)}

    def stats(self) -> dict[str, float]:
        """This party's dealer traffic in the open session: ``bytes`` received from the
        dealer in all (``offline_bytes`` of them by :meth:`prepare`, before the session's
        online phase).  Party 0 receives every correction; party 1 only its FSS keys."""
        return self._stats(self.state)

    # -- talking to the dealer ------------------------------------------------------------
    def _rpc(self, s: _PartyState, method: str, request: Message) -> Any:
        tic = time.perf_counter()
        try:
            reply = getattr(s.stub, method)(request, timeout=s.spec.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:  # the dealer went away
                raise DealerUnreachable(f"dealer unreachable at {s.spec.address} (lost during "
                                        f"the session: {_short(exc.details())})") from exc
            raise DealerError(f"dealer: {exc.code().name}: {exc.details()}") from exc
        s.requests += 1
        s.seconds += time.perf_counter() - tic
        return reply

    def _fetch_batch(self, s: _PartyState, batch: list[dealer_pb2.CorrectionRequest]
                     ) -> list[torch.Tensor]:
        reply = self._rpc(s, "CorrectionBatch",
                          dealer_pb2.PrepareRequest(session=s.session, requests=batch))
        if len(reply.replies) != len(batch):
            raise DealerError("dealer answered a batch with the wrong number of tuples")
        s.bytes += sum(len(r.share.data) for r in reply.replies)
        return [_tensor_from(r.share) for r in reply.replies]

    def _fetch_one(self, s: _PartyState, req: TupleRequest) -> torch.Tensor:
        reply = self._rpc(s, "Correction",
                          request_message(req, s.session, len(s.trace) - 1, s.rank))
        s.bytes += len(reply.share.data)
        return _tensor_from(reply.share)

    # -- drawing tuples ---------------------------------------------------------------------
    def draw_tuple(self, req: TupleRequest) -> tuple[torch.Tensor, ...]:
        """This party's raw shares of one tuple (prepared offline, or drawn now, fetching
        from the dealer what this party needs: party 0 its correction, every party its
        FSS key)."""
        s = self.state
        s.trace.append(req)
        if s.prepared:
            expected, tensors = s.prepared.popleft()
            if expected != req:
                raise DealerError(
                    f"tuple request {len(s.trace) - 1} ({req.kind} {req.size0}) differs from "
                    f"the prepared trace ({expected.kind} {expected.size0}); the model run "
                    "is not the one prepared for"
                )
            return tensors
        fetch = (lambda: self._fetch_one(s, req)) if fetches(req, s.rank) else None
        return kind_of(req).draw(s.generator, req, fetch)

    # -- CrypTen's TupleProvider interface -------------------------------------------------
    def generate_additive_triple(self, size0: Sequence[int], size1: Sequence[int], op: str,
                                 device: torch.device | str | None = None, *args: Any,
                                 **kwargs: Any) -> tuple[ArithmeticSharedTensor, ...]:
        if args:
            raise DealerError("positional op arguments are not supported; use keywords")
        req = TupleRequest("additive", tuple(size0), tuple(size1), op,
                           json.dumps(kwargs, sort_keys=True))
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0)
                     for t in self.draw_tuple(req))

    def square(self, size: Sequence[int], device: torch.device | str | None = None
               ) -> tuple[ArithmeticSharedTensor, ArithmeticSharedTensor]:
        r, r2 = self.draw_tuple(TupleRequest("square", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r, precision=0),
                ArithmeticSharedTensor.from_shares(r2, precision=0))

    def generate_binary_triple(self, size0: Sequence[int], size1: Sequence[int],
                               device: torch.device | str | None = None
                               ) -> tuple[BinarySharedTensor, ...]:
        req = TupleRequest("binary", tuple(size0), tuple(size1))
        return tuple(BinarySharedTensor.from_shares(t) for t in self.draw_tuple(req))

    def wrap_rng(self, size: Sequence[int], device: torch.device | str | None = None
                 ) -> tuple[ArithmeticSharedTensor, ArithmeticSharedTensor]:
        r, theta = self.draw_tuple(TupleRequest("wraps", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r, precision=0),
                ArithmeticSharedTensor.from_shares(theta, precision=0))

    def B2A_rng(self, size: Sequence[int],  # noqa: N802 (CrypTen's name)
                device: torch.device | str | None = None
                ) -> tuple[ArithmeticSharedTensor, BinarySharedTensor]:
        r_bin, r_arith = self.draw_tuple(TupleRequest("b2a", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r_arith, precision=0),
                BinarySharedTensor.from_shares(r_bin))


# ----------------------------------------------------------------------------------
# Dealer side
# ----------------------------------------------------------------------------------
@dataclass
class _DealerSession:
    world_size: int
    seeds: list[bytes]
    generators: list[torch.Generator]
    holders: dict[int, str] = field(default_factory=dict)  # rank -> caller it went to
    # keys every party fetches (FSS) derive from this, not from the parties' streams
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    closed: set[int] = field(default_factory=set)
    next_seq: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def open_ranks(self) -> list[int]:
        return [r for r in self.holders if r not in self.closed]


class CallerLimit(OverflowError):
    """One caller holds as many open sessions as it may; others are unaffected."""


class SessionRetired(LookupError):
    """The session id was closed or expired: ids are single-use (fresh seeds under an old
    id would silently break a party that drew from the old ones)."""


class DealerState:
    """Plain-Python dealer logic (the gRPC servicer below is a thin shell over it).

    A caller is whoever the servicer says opened a rank (its certificate role and address,
    or the claimed rank without TLS).  Each caller may hold ``sessions_per_caller`` ranks
    of open sessions, the table ``max_sessions`` sessions in all; a session unused for
    ``idle_ttl`` seconds is forgotten and its id refused from then on.
    """

    RETIRED_KEPT = 1 << 16

    def __init__(self, *, max_sessions: int = 1024, sessions_per_caller: int = 32,
                 idle_ttl: float = 60.0, masks: MaskStore | None = None,
                 keys: fss.KeyCache | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.sessions_per_caller = sessions_per_caller
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._sessions: dict[str, _DealerSession] = {}
        self._held: collections.Counter[str] = collections.Counter()
        self._retired: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.masks = masks or MaskStore()
        self.keys = keys if keys is not None else fss.KeyCache()  # FSS halves not handed out
        self._lock = threading.Lock()

    @property
    def open_sessions(self) -> int:
        """Sessions whose seeds were handed out and not all closed yet (a metrics gauge)."""
        with self._lock:
            self._expire()
            return len(self._sessions)

    @property
    def weight_masks(self) -> int:
        """Weight masks kept for loaded models (a metrics gauge)."""
        return len(self.masks)

    def held_by(self, caller: str) -> int:
        """Ranks of open sessions ``caller`` holds (what its cap counts)."""
        with self._lock:
            self._expire()
            return self._held[caller]

    def _retire(self, sid: str, why: str) -> None:
        s = self._sessions.pop(sid)
        self.keys.drop(sid)
        for rank in s.open_ranks():
            self._held[s.holders[rank]] -= 1
            if self._held[s.holders[rank]] <= 0:
                del self._held[s.holders[rank]]
        self._retired[sid] = why
        while len(self._retired) > self.RETIRED_KEPT:
            self._retired.popitem(last=False)

    def _expire(self) -> None:
        now = self._clock()
        for sid in [k for k, s in self._sessions.items() if now - s.last_used > self.idle_ttl]:
            self._retire(sid, "expired")

    def _new_session(self, session: str, world_size: int) -> _DealerSession:
        if session in self._retired:
            raise SessionRetired(f"dealer session {session[:40]!r} was "
                                 f"{self._retired[session]}: session ids are single-use")
        if len(self._sessions) >= self.max_sessions:
            raise OverflowError("too many open dealer sessions")
        seeds = [os.urandom(8) for _ in range(world_size)]
        gens = []
        for seed in seeds:
            g = torch.Generator(device="cpu")
            g.manual_seed(int.from_bytes(seed, "little"))
            gens.append(g)
        s = _DealerSession(world_size, seeds, gens, last_used=self._clock())
        self._sessions[session] = s
        return s

    def open(self, session: str, rank: int, world_size: int, caller: str | None = None) -> bytes:
        """Hand ``rank``'s seed of ``session`` to ``caller`` (once per rank)."""
        if not session or len(session) > 128:
            raise ValueError("session id must be 1..128 characters")
        if not 2 <= world_size <= 16 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world size {world_size}")
        caller = caller or f"rank {rank}"
        with self._lock:
            self._expire()
            s = self._sessions.get(session)
            if s is not None and rank in s.holders:
                # A seed goes to one party once: a second asker could be anyone.
                raise PermissionError(f"rank {rank}'s seed was already handed out")
            if self._held[caller] >= self.sessions_per_caller:
                raise CallerLimit(
                    f"{caller} holds {self._held[caller]} open dealer sessions, the most one "
                    f"caller may; close sessions or wait for idle ones to expire "
                    f"({self.idle_ttl:g} s)")
            if s is None:
                s = self._new_session(session, world_size)
            if s.world_size != world_size:
                raise ValueError("world size differs from the session's")
            s.holders[rank] = caller
            self._held[caller] += 1
            s.last_used = self._clock()
            return s.seeds[rank]

    def close(self, session: str, rank: int, caller: str | None = None) -> None:
        """``caller`` is done with ``rank`` of ``session`` (unknown sessions: nothing to do)."""
        caller = caller or f"rank {rank}"
        with self._lock:
            s = self._sessions.get(session)
            if s is None or rank in s.closed or s.holders.get(rank) != caller:
                return
            s.closed.add(rank)
            self._held[caller] -= 1
            if self._held[caller] <= 0:
                del self._held[caller]
            if len(s.closed) == s.world_size:
                self._retire(session, "closed")

    def correction(self, msg: dealer_pb2.CorrectionRequest,
                   caller: str | None = None) -> torch.Tensor:
        """Party 0's share of one tuple's dependent value, or the asking party's part of a
        kind every party fetches (its FSS key); only to whoever holds that rank."""
        with self._lock:
            s = self._sessions.get(msg.session)
        if s is None:
            raise KeyError(f"unknown dealer session {msg.session!r}")
        if msg.rank >= s.world_size:
            raise ValueError(f"rank {msg.rank} is not in a session of {s.world_size} parties")
        if caller is not None and s.holders.get(msg.rank) != caller:
            raise PermissionError(f"only the holder of the session's rank {msg.rank} gets "
                                  "its tuples")
        if msg.kind not in KINDS:
            raise ValueError(f"unknown correction kind {msg.kind!r}")
        req = request_from(msg)
        kind = kind_of(req)
        rank = msg.rank
        if rank != 0 and kind.fetched_by != "every":
            # party 0's corrections complete the other parties' streams: only it gets them
            raise PermissionError(f"only party 0 receives {msg.kind} corrections")
        kind.validate(req, self)
        with s.lock:
            if rank == 0:  # party 0's requests keep the streams in step
                if msg.seq != s.next_seq:
                    raise ValueError(f"request {msg.seq} out of order (expected {s.next_seq})")
                s.next_seq += 1
            s.last_used = self._clock()
            if kind.fetched_by != "every":
                return kind.correction(s.generators, req, self)
        return kind.keyed_share(self, msg.session, s.secret, msg.seq, rank, req)


def _peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port (``ipv4:10.0.0.5:4711`` -> ``10.0.0.5``)."""
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    return rest.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


class DealerService(dealer_pb2_grpc.DealerServiceServicer):
    """gRPC face of :class:`DealerState`: checks each caller's role (parties only, each
    as its own rank; corrections to party 0 only) and maps bad requests to clear status
    codes."""

    def __init__(self, state: DealerState | None = None,
                 roles: RoleChecker | None = None) -> None:
        self.state = state or DealerState()
        self.roles = roles or RoleChecker(None)

    def _caller(self, context: grpc.ServicerContext, rank: int, allowed: Allowed) -> str:
        """Who is asking as ``rank``: its role (checked) at its address."""
        role = self.roles.check(context, allowed)
        if role is not None and role.rank != rank:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"permission denied: the caller's certificate is {role}, "
                          f"which cannot act as party/{rank}")
        who = str(role) if role is not None else f"rank {rank} (unauthenticated)"
        return f"{who}@{_peer_host(context)}"

    def OpenSession(self, request: dealer_pb2.OpenSessionRequest,  # noqa: N802
                    context: grpc.ServicerContext) -> dealer_pb2.OpenSessionReply:
        caller = self._caller(context, request.rank, Allowed.parties())
        try:
            seed = self.state.open(request.session, request.rank, request.world_size, caller)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PermissionError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except SessionRetired as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except OverflowError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        log.info("session %s: seed handed to rank %d", request.session[:12], request.rank)
        return dealer_pb2.OpenSessionReply(seed=seed)

    def _one(self, request: dealer_pb2.CorrectionRequest, context: grpc.ServicerContext,
             caller: str) -> dealer_pb2.CorrectionReply:
        try:
            share = self.state.correction(request, caller)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except PermissionError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except (ValueError, TypeError, RuntimeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return dealer_pb2.CorrectionReply(share=_tensor_msg(share))

    def Correction(self, request: dealer_pb2.CorrectionRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> dealer_pb2.CorrectionReply:
        caller = self._caller(context, request.rank, Allowed.parties())
        return self._one(request, context, caller)

    def CorrectionBatch(self, request: dealer_pb2.PrepareRequest,  # noqa: N802
                        context: grpc.ServicerContext) -> dealer_pb2.PrepareReply:
        ranks = {r.rank for r in request.requests}
        if len(ranks) > 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "a correction batch asks for one rank's tuples")
        caller = self._caller(context, ranks.pop() if ranks else 0, Allowed.parties())
        return dealer_pb2.PrepareReply(
            replies=[self._one(r, context, caller) for r in request.requests])

    def CloseSession(self, request: dealer_pb2.CloseSessionRequest,  # noqa: N802
                     context: grpc.ServicerContext) -> dealer_pb2.CloseSessionReply:
        caller = self._caller(context, request.rank, Allowed.parties())
        self.state.close(request.session, request.rank, caller)
        return dealer_pb2.CloseSessionReply()


def serve_dealer(
    listen: str = "127.0.0.1:0", tls: TlsConfig | None = None, *, max_workers: int = 8,
    state: DealerState | None = None, health_servicer: health.HealthServicer | None = None,
    interceptors: tuple[grpc.ServerInterceptor, ...] = (),
) -> tuple[grpc.Server, int]:
    """Start a dealer gRPC server; return it and the bound port.

    It also serves gRPC health (SERVING once started; pass ``health_servicer`` to flip it
    on shutdown) and server reflection."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[("grpc.max_send_message_length", 1 << 30),
                 ("grpc.max_receive_message_length", 16 << 20)],
        interceptors=list(interceptors),
    )
    dealer_pb2_grpc.add_DealerServiceServicer_to_server(
        DealerService(state, RoleChecker.from_tls(tls)), server)
    health_servicer = health_servicer or health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    name = dealer_pb2.DESCRIPTOR.services_by_name["DealerService"].full_name
    reflection.enable_server_reflection((name, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                        server)
    if tls is not None:
        port = server.add_secure_port(listen, tls.server_credentials())
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise DealerError(f"dealer cannot listen on {listen}")
    server.start()
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    log.info("dealer listening on %s (port %d, tls=%s)", listen, port, tls is not None)
    return server, port
