"""The dealer: correlated randomness (Beaver triples and friends) served over gRPC.

Protocol (CrypTen's TTP scheme, moved off torch.distributed):

* every party opens the session with the dealer and receives a private seed; the party
  and the dealer then draw the same pseudo-random stream;
* party ``i > 0`` draws all of its tuple shares from that stream, locally;
* party 0 draws its shares of the random inputs (``a``, ``b``, ``r``...) the same way
  and asks the dealer for its share of the dependent value (``a*b``, ``r^2``, wraps...),
  which the dealer computes from every party's stream.

Weight masks (kinds ``mask`` and ``masked_matmul``): a model's weights are fixed across
inferences, so re-opening ``W − b`` in every Beaver product wastes bytes.  At model load
the parties draw shares of a random mask ``b`` (party 0 registers it; the dealer keeps
``b`` and answers with a random handle that only party 0 learns) and open ``E = W − b``
once.  Each later product ``x·W`` then needs a fresh ``a`` and ``c = a·b`` for that
stored ``b`` and opens only ``x − a``.  Without the handle nobody, party 1 included, can
ask the dealer for products with ``b``.  Party ``i``'s share of ``x·W`` is then
``δ·W'_i + (a_i·E + c_i)``; the second term does not depend on ``x``, so when a session is
prepared offline each party also computes it then (:meth:`DealerProvider.register_public_factor`),
leaving one matrix product per layer for the online phase instead of two.

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
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch
from crypten.common.rng import (
    generate_kbit_random_tensor,
    generate_random_ring_element,
)
from crypten.common.util import count_wraps
from crypten.mpc.primitives import ArithmeticSharedTensor, BinarySharedTensor
from crypten.mpc.provider.provider import TupleProvider
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..proto.generated import dealer_pb2, dealer_pb2_grpc
from . import carry
from .config import ProviderSpec, TlsConfig
from .errors import DealerError

log = logging.getLogger("mpcvit.dealer")

OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
KINDS = ("additive", "square", "binary", "wraps", "b2a", "mask", "masked_matmul", "carry",
         "private_and")
_ALLOWED_KWARGS = {"stride", "padding", "dilation", "groups", "output_padding"}
MAX_ELEMENTS = 1 << 26  # per tensor in one request (512 MiB of int64)
MAX_MASK_ELEMENTS = 1 << 27  # weight masks kept at once (1 GiB); least recently used go


def _tensor_msg(t: torch.Tensor) -> dealer_pb2.Tensor:
    return dealer_pb2.Tensor(shape=list(t.shape), data=t.contiguous().numpy().tobytes())


def _tensor_from(msg: dealer_pb2.Tensor) -> torch.Tensor:
    arr = np.frombuffer(bytearray(msg.data), dtype="<i8").reshape(tuple(msg.shape))
    return torch.from_numpy(arr)


def _op_result_size(op: str, size0, size1, kwargs: dict) -> torch.Size:
    """Shape of op(a, b) without computing it (meta tensors)."""
    a = torch.empty(size0, dtype=torch.long, device="meta")
    b = torch.empty(size1, dtype=torch.long, device="meta")
    try:
        return getattr(torch, op)(a, b, **kwargs).shape
    except (RuntimeError, NotImplementedError):  # op without a meta kernel for long
        a = torch.zeros(size0, dtype=torch.float32)
        b = torch.zeros(size1, dtype=torch.float32)
        return getattr(torch, op)(a, b, **kwargs).shape


# ----------------------------------------------------------------------------------
# Party side
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TupleRequest:
    """One tuple request as CrypTen makes it; a model's sequence of them is its trace."""

    kind: str
    size0: tuple[int, ...]
    size1: tuple[int, ...] = ()
    op: str = ""
    kwargs_json: str = "{}"

    def message(self, session: str, seq: int) -> dealer_pb2.CorrectionRequest:
        return dealer_pb2.CorrectionRequest(
            session=session, kind=self.kind, size0=list(self.size0), size1=list(self.size1),
            op=self.op, op_kwargs_json=self.kwargs_json, seq=seq,
        )

    def result_elements(self) -> int:
        size = self.size0
        if self.kind == "mask":
            return 2  # the handle
        if self.kind == "carry":
            final = json.loads(self.kwargs_json).get("final", False)
            return len(carry.carry_monomials(bool(final))) * int(np.prod(self.size0)) // 4
        if self.kind == "binary" or (self.kind == "additive" and self.op == "mul"):
            size = tuple(torch.broadcast_shapes(torch.Size(self.size0), torch.Size(self.size1)))
        elif self.kind in ("additive", "masked_matmul"):
            size = tuple(_op_result_size(self.op or "matmul", self.size0, self.size1,
                                         json.loads(self.kwargs_json)
                                         if self.kind == "additive" else {}))
        return int(np.prod(size, dtype=np.int64))


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
    seconds: float = 0.0
    offline_seconds: float = 0.0


class DealerProvider(TupleProvider):
    """CrypTen TupleProvider that draws tuples from the dealer's streams (see module doc).

    Online, party 0 makes one dealer round trip per tuple.  :meth:`prepare` moves all of
    that off the critical path: given a model's trace (recorded by an earlier run), it
    opens a future session, fetches party 0's corrections in a few batched calls and
    pre-draws every party's shares, so the session's online phase never waits on the
    dealer.
    """

    NAME = "DEALER"
    BATCH_ELEMENTS = 8 << 20  # int64 elements per CorrectionBatch reply (64 MiB)

    def __init__(self) -> None:
        super().__init__()
        self._state: _PartyState | None = None
        self._prepared: dict[str, _PartyState] = {}
        # Public right factors E of masked products, by the weight key of their requests.
        self._factors: weakref.WeakValueDictionary[str, torch.Tensor] = (
            weakref.WeakValueDictionary())
        self.last_trace: list[TupleRequest] = []
        self.last_stats: dict[str, float] = {}

    # -- session lifecycle (called by mpc.runtime / the launcher) -----------------------
    def _open(self, session: str, rank: int, world_size: int, spec: ProviderSpec) -> _PartyState:
        if spec.address is None:
            raise DealerError("dealer provider needs an address")
        options = [("grpc.max_receive_message_length", 1 << 30),
                   ("grpc.max_send_message_length", 1 << 30)]
        if spec.tls is not None:
            options += spec.tls.channel_options()
            channel = grpc.secure_channel(spec.address, spec.tls.channel_credentials(), options)
        else:
            channel = grpc.insecure_channel(spec.address, options)
        stub = dealer_pb2_grpc.DealerServiceStub(channel)
        try:
            reply = stub.OpenSession(
                dealer_pb2.OpenSessionRequest(session=session, rank=rank, world_size=world_size),
                timeout=spec.timeout, wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            channel.close()
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
        trace: list[TupleRequest],
    ) -> float:
        """Offline phase for a future ``session`` that will make exactly ``trace``'s requests.

        A party's tuples are the same whether it prepares them or draws them during the
        session, so the parties may decide this each on its own.  Returns seconds spent.
        """
        tic = time.perf_counter()
        state = self._open(session, rank, world_size, spec)
        try:
            corrections: collections.deque = collections.deque()
            if rank == 0:
                batch: list[dealer_pb2.CorrectionRequest] = []
                elements = 0
                for seq, req in enumerate(trace):
                    batch.append(req.message(session, seq))
                    elements += req.result_elements()
                    if elements >= self.BATCH_ELEMENTS or seq == len(trace) - 1:
                        corrections.extend(self._fetch_batch(state, batch))
                        batch, elements = [], 0
            for req in trace:
                fetch = corrections.popleft if rank == 0 else None
                state.prepared.append((req, self._fold(req, self._draw(state, req, fetch))))
        except BaseException:
            state.channel.close()  # nothing prepared: do not leak the session's channel
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
        for state in self._prepared.values():
            state.channel.close()
        self._prepared.clear()

    def end(self) -> None:
        state, self._state = self._state, None
        if state is None:
            return
        self.last_trace = state.trace
        self.last_stats = self._stats(state)
        try:
            state.stub.CloseSession(
                dealer_pb2.CloseSessionRequest(session=state.session, rank=state.rank),
                timeout=5.0,
            )
        except grpc.RpcError:
            pass  # the dealer forgets idle sessions on its own
        state.channel.close()

    @property
    def state(self) -> _PartyState:
        if self._state is None:
            raise DealerError("no dealer session is open in this process")
        return self._state

    @staticmethod
    def _stats(s: _PartyState) -> dict[str, float]:
        return {"requests": s.requests, "bytes": s.bytes, "seconds": s.seconds,
                "offline_seconds": s.offline_seconds, "tuples": len(s.trace)}

    def stats(self) -> dict[str, float]:
        """Dealer traffic of the open session (party 0 does all of it)."""
        return self._stats(self.state)

    # -- talking to the dealer ------------------------------------------------------------
    def _rpc(self, s: _PartyState, method: str, request):
        tic = time.perf_counter()
        try:
            reply = getattr(s.stub, method)(request, timeout=s.spec.timeout)
        except grpc.RpcError as exc:
            raise DealerError(f"dealer: {exc.code().name}: {exc.details()}") from exc
        s.requests += 1
        s.seconds += time.perf_counter() - tic
        return reply

    def _fetch_batch(self, s: _PartyState, batch) -> list[torch.Tensor]:
        reply = self._rpc(s, "CorrectionBatch",
                          dealer_pb2.PrepareRequest(session=s.session, requests=batch))
        if len(reply.replies) != len(batch):
            raise DealerError("dealer answered a batch with the wrong number of tuples")
        s.bytes += sum(len(r.share.data) for r in reply.replies)
        return [_tensor_from(r.share) for r in reply.replies]

    def _fetch_one(self, s: _PartyState, req: TupleRequest) -> torch.Tensor:
        reply = self._rpc(s, "Correction", req.message(s.session, len(s.trace) - 1))
        s.bytes += len(reply.share.data)
        return _tensor_from(reply.share)

    # -- drawing tuples ---------------------------------------------------------------------
    @staticmethod
    def _draw(s: _PartyState, req: TupleRequest, correction) -> tuple[torch.Tensor, ...]:
        """This party's raw shares of one tuple, in the dealer's draw order.

        ``correction`` (party 0 only) returns party 0's share of the dependent value.
        """
        g = s.generator
        if req.kind == "additive":
            a = generate_random_ring_element(req.size0, generator=g)
            b = generate_random_ring_element(req.size1, generator=g)
            if correction is not None:
                return a, b, correction()
            size = _op_result_size(req.op, req.size0, req.size1, json.loads(req.kwargs_json))
            return a, b, generate_random_ring_element(size, generator=g)
        if req.kind == "masked_matmul":
            a = generate_random_ring_element(req.size0, generator=g)
            if correction is not None:
                return a, correction()
            return a, generate_random_ring_element(
                _op_result_size("matmul", req.size0, req.size1, {}), generator=g)
        if req.kind == "carry":
            r_g = generate_kbit_random_tensor(req.size0, generator=g)
            r_p = generate_kbit_random_tensor(req.size0, generator=g)
            if correction is not None:
                return r_g, r_p, correction()
            final = bool(json.loads(req.kwargs_json)["final"])
            size = (len(carry.carry_monomials(final)), req.size0[-1] // 4)
            return r_g, r_p, generate_kbit_random_tensor(size, generator=g)
        if req.kind == "private_and":
            own = generate_kbit_random_tensor(req.size0, generator=g)
            if correction is not None:
                return own, correction()
            return own, generate_kbit_random_tensor(req.size0, generator=g)
        if req.kind == "mask":
            b = generate_random_ring_element(req.size0, generator=g)
            return b, (correction() if correction is not None else None)
        if req.kind == "binary":
            a = generate_kbit_random_tensor(req.size0, generator=g)
            b = generate_kbit_random_tensor(req.size1, generator=g)
            if correction is not None:
                return a, b, correction()
            size = torch.broadcast_shapes(torch.Size(req.size0), torch.Size(req.size1))
            return a, b, generate_kbit_random_tensor(size, generator=g)
        if req.kind == "b2a":
            first = generate_kbit_random_tensor(req.size0, bitlength=1, generator=g)
        else:  # square, wraps
            first = generate_random_ring_element(req.size0, generator=g)
        if correction is not None:
            return first, correction()
        return first, generate_random_ring_element(req.size0, generator=g)

    def _fold(self, req: TupleRequest, tensors: tuple) -> tuple:
        """Offline: a masked product's ``(a, c)`` becomes ``(a, a·E + c, True)`` when its
        weight registered its public factor ``E``; other tuples pass unchanged."""
        if req.kind != "masked_matmul":
            return tensors
        key = json.loads(req.kwargs_json).get("weight")
        factor = self._factors.get(key) if key is not None else None
        if factor is None:
            return tensors
        a, c = tensors
        return a, torch.matmul(a, factor) + c, True

    def _tuple(self, req: TupleRequest) -> tuple[torch.Tensor, ...]:
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
        fetch = (lambda: self._fetch_one(s, req)) if s.rank == 0 else None
        return self._draw(s, req, fetch)

    # -- TupleProvider interface ---------------------------------------------------------
    def generate_additive_triple(self, size0, size1, op, device=None, *args, **kwargs):
        if args:
            raise DealerError("positional op arguments are not supported; use keywords")
        req = TupleRequest("additive", tuple(size0), tuple(size1), op,
                           json.dumps(kwargs, sort_keys=True))
        return tuple(ArithmeticSharedTensor.from_shares(t, precision=0) for t in self._tuple(req))

    def square(self, size, device=None):
        r, r2 = self._tuple(TupleRequest("square", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r, precision=0),
                ArithmeticSharedTensor.from_shares(r2, precision=0))

    def generate_binary_triple(self, size0, size1, device=None):
        req = TupleRequest("binary", tuple(size0), tuple(size1))
        return tuple(BinarySharedTensor.from_shares(t) for t in self._tuple(req))

    def wrap_rng(self, size, device=None):
        r, theta = self._tuple(TupleRequest("wraps", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r, precision=0),
                ArithmeticSharedTensor.from_shares(theta, precision=0))

    def B2A_rng(self, size, device=None):  # noqa: N802 (CrypTen's name)
        r_bin, r_arith = self._tuple(TupleRequest("b2a", tuple(size)))
        return (ArithmeticSharedTensor.from_shares(r_arith, precision=0),
                BinarySharedTensor.from_shares(r_bin))

    def carry_tuple(self, size, shift: int, final: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """XOR shares of the masks r_G, r_P (n words) of one radix-4 carry level and of
        their products (``mpc.carry``), packed: (r_G, r_P, ρ of (monomials, n/4))."""
        req = TupleRequest("carry", tuple(size), (), "",
                           json.dumps({"final": bool(final), "shift": int(shift)},
                                      sort_keys=True))
        return self._tuple(req)

    def private_and(self, size) -> tuple[torch.Tensor, torch.Tensor]:
        """For x ∧ y with x known to party 0 and y to party 1 (two parties only): this
        party's own mask (u for party 0, v for party 1; each masks its word before
        sending it) and its XOR share of u ∧ v."""
        if self.state.world_size != 2:
            raise DealerError("private_and is a two-party correlation")
        return self._tuple(TupleRequest("private_and", tuple(size)))

    # -- weight masks (module doc) -----------------------------------------------------
    def weight_mask(self, size) -> tuple[torch.Tensor, str]:
        """This party's share of a fresh mask ``b`` of ``size`` that the dealer keeps, and
        (party 0 only; "" elsewhere) the dealer's handle for it."""
        b, handle = self._tuple(TupleRequest("mask", tuple(size)))
        if handle is None:
            return b, ""
        return b, "".join(f"{int(v) & (2**64 - 1):016x}" for v in handle.reshape(-1))

    def register_public_factor(self, key: str, factor: torch.Tensor) -> None:
        """Let the offline phase fold ``a @ factor`` into the masked products whose
        requests name weight ``key`` (held weakly: it goes when the weight goes)."""
        self._factors[key] = factor

    def masked_matmul(self, size0, size1, handle: str, key: str = ""
                      ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Shares of a fresh ``a`` of ``size0`` and of ``c = a @ b`` for the mask ``b``
        (of ``size1``) registered under ``handle`` (party 0's; others pass ""), and
        False; or, when the session was prepared offline and weight ``key`` registered
        its public factor ``E``, ``(a, a @ E + c, True)``."""
        fields = {"mask": handle} if self.state.rank == 0 else {}
        if key:
            fields["weight"] = key
        a, c, *folded = self._tuple(TupleRequest("masked_matmul", tuple(size0), tuple(size1),
                                                 "matmul", json.dumps(fields, sort_keys=True)))
        return a, c, bool(folded)


# ----------------------------------------------------------------------------------
# Dealer side
# ----------------------------------------------------------------------------------
@dataclass
class _DealerSession:
    world_size: int
    seeds: list[bytes]
    generators: list[torch.Generator]
    handed_out: set[int] = field(default_factory=set)
    closed: set[int] = field(default_factory=set)
    next_seq: int = 0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DealerState:
    """Plain-Python dealer logic (the gRPC servicer below is a thin shell over it)."""

    def __init__(self, *, max_sessions: int = 1024, idle_ttl: float = 900.0) -> None:
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self._sessions: dict[str, _DealerSession] = {}
        self._masks: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()

    @property
    def open_sessions(self) -> int:
        """Sessions whose seeds were handed out and not all closed yet (a metrics gauge)."""
        return len(self._sessions)

    @property
    def weight_masks(self) -> int:
        """Weight masks kept for loaded models (a metrics gauge)."""
        return len(self._masks)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self._sessions.items() if now - s.last_used > self.idle_ttl]:
            del self._sessions[sid]

    def open(self, session: str, rank: int, world_size: int) -> bytes:
        if not session or len(session) > 128:
            raise ValueError("session id must be 1..128 characters")
        if not 2 <= world_size <= 16 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank {rank} / world size {world_size}")
        with self._lock:
            self._expire()
            s = self._sessions.get(session)
            if s is None:
                if len(self._sessions) >= self.max_sessions:
                    raise OverflowError("too many open dealer sessions")
                seeds = [os.urandom(8) for _ in range(world_size)]
                gens = []
                for seed in seeds:
                    g = torch.Generator(device="cpu")
                    g.manual_seed(int.from_bytes(seed, "little"))
                    gens.append(g)
                s = _DealerSession(world_size, seeds, gens)
                self._sessions[session] = s
            if s.world_size != world_size:
                raise ValueError("world size differs from the session's")
            if rank in s.handed_out:
                # A seed goes to one party once: a second asker could be anyone.
                raise PermissionError(f"rank {rank}'s seed was already handed out")
            s.handed_out.add(rank)
            s.last_used = time.monotonic()
            return s.seeds[rank]

    def close(self, session: str, rank: int) -> None:
        with self._lock:
            s = self._sessions.get(session)
            if s is None:
                return
            s.closed.add(rank)
            if len(s.closed) == s.world_size:
                del self._sessions[session]

    def correction(self, req: dealer_pb2.CorrectionRequest) -> torch.Tensor:
        with self._lock:
            s = self._sessions.get(req.session)
        if s is None:
            raise KeyError(f"unknown dealer session {req.session!r}")
        if req.kind not in KINDS:
            raise ValueError(f"unknown correction kind {req.kind!r}")
        size0, size1 = tuple(req.size0), tuple(req.size1)
        for size in (size0, size1):
            if any(d < 0 for d in size) or int(np.prod(size, dtype=np.int64)) > MAX_ELEMENTS:
                raise ValueError("tensor size out of range")
        if req.kind == "carry" and int(np.prod(size0, dtype=np.int64)) * 32 > MAX_ELEMENTS:
            raise ValueError("tensor size out of range")
        mask = None
        if req.kind == "masked_matmul":
            mask = self._mask(req, size0, size1)
        with s.lock:
            if req.seq != s.next_seq:
                raise ValueError(f"request {req.seq} out of order (expected {s.next_seq})")
            s.next_seq += 1
            s.last_used = time.monotonic()
            if req.kind == "mask":
                return self._register_mask(s.generators, size0)
            if mask is not None:
                a = _sum([_ring(size0, g) for g in s.generators])
                c = torch.matmul(a, mask)
                return c - _sum([_ring(c.shape, g) for g in s.generators[1:]])
            return _compute_correction(s.generators, req, size0, size1)

    def _register_mask(self, gens, size) -> torch.Tensor:
        """Keep ``b`` (the sum of every party's draw) under a fresh random handle."""
        if len(size) != 2:
            raise ValueError("a weight mask is a matrix")
        b = _sum([_ring(size, g) for g in gens])
        handle = torch.from_numpy(np.frombuffer(os.urandom(16), dtype="<i8").copy())
        key = "".join(f"{int(v) & (2**64 - 1):016x}" for v in handle)
        with self._lock:
            self._masks[key] = b
            held = sum(m.nelement() for m in self._masks.values())
            while held > MAX_MASK_ELEMENTS and len(self._masks) > 1:
                _, old = self._masks.popitem(last=False)
                held -= old.nelement()
        return handle

    def _mask(self, req, size0, size1) -> torch.Tensor:
        try:
            key = json.loads(req.op_kwargs_json or "{}").get("mask", "")
        except (ValueError, AttributeError):
            raise ValueError("malformed mask handle") from None
        with self._lock:
            mask = self._masks.get(key) if isinstance(key, str) else None
            if mask is None:
                raise KeyError("unknown weight mask (the dealer restarted or dropped it): "
                               "the parties must share the weights again")
            self._masks.move_to_end(key)
        if tuple(mask.shape) != size1 or not size0 or size0[-1] != size1[0]:
            raise ValueError(f"masked matmul of {size0} by a mask of {tuple(mask.shape)}")
        return mask


def _ring(size, g):
    return generate_random_ring_element(size, generator=g)


def _kbit(size, g, bitlength=None):
    return generate_kbit_random_tensor(size, bitlength=bitlength, generator=g)


def _sum(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out.add_(t)
    return out


def _xor(ts):
    out = ts[0].clone()
    for t in ts[1:]:
        out.bitwise_xor_(t)
    return out


def _compute_correction(gens, req, size0, size1) -> torch.Tensor:
    """Party 0's share of the dependent value; mirrors the draw order of DealerProvider."""
    others = gens[1:]
    if req.kind == "additive":
        if req.op not in OPS:
            raise ValueError(f"op {req.op!r} not allowed")
        kwargs = json.loads(req.op_kwargs_json or "{}")
        if not isinstance(kwargs, dict) or set(kwargs) - _ALLOWED_KWARGS:
            raise ValueError("op arguments not allowed")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        a_b = [(_ring(size0, g), _ring(size1, g)) for g in gens]
        a = _sum([ab[0] for ab in a_b])
        b = _sum([ab[1] for ab in a_b])
        c = getattr(torch, req.op)(a, b, **kwargs)
        return c - _sum([_ring(c.shape, g) for g in others]) if others else c
    if req.kind == "square":
        r = _sum([_ring(size0, g) for g in gens])
        return r * r - _sum([_ring(size0, g) for g in others])
    if req.kind == "binary":
        ab = [(_kbit(size0, g), _kbit(size1, g)) for g in gens]
        c = _xor([x[0] for x in ab]) & _xor([x[1] for x in ab])
        return c ^ _xor([_kbit(c.shape, g) for g in others])
    if req.kind == "carry":
        try:
            opts = json.loads(req.op_kwargs_json or "{}")
            shift, final = opts["shift"], opts["final"]
        except (ValueError, KeyError, TypeError):
            raise ValueError("carry request needs 'shift' and 'final'") from None
        carry.validate(shift, final)
        if len(size0) != 1 or size0[0] % 4:
            raise ValueError("carry masks are a flat run of words, a multiple of 4")
        masks = [(_kbit(size0, g), _kbit(size0, g)) for g in gens]
        rho = carry.pack_live(carry.mask_products(_xor([m[0] for m in masks]),
                                                  _xor([m[1] for m in masks]), shift, final),
                              shift)
        return rho ^ _xor([_kbit(rho.shape, g) for g in others]) if others else rho
    if req.kind == "private_and":
        if len(gens) != 2:
            raise ValueError("private_and is a two-party correlation")
        u, v = (_kbit(size0, g) for g in gens)
        return (u & v) ^ _kbit(size0, gens[1])
    if req.kind == "wraps":
        theta = count_wraps([_ring(size0, g) for g in gens])
        return theta - _sum([_ring(size0, g) for g in others])
    # b2a
    bit = _xor([_kbit(size0, g, bitlength=1) for g in gens])
    return bit - _sum([_ring(size0, g) for g in others])


class DealerService(dealer_pb2_grpc.DealerServiceServicer):
    """gRPC face of :class:`DealerState`: maps bad requests to clear status codes."""

    def __init__(self, state: DealerState | None = None) -> None:
        self.state = state or DealerState()

    def OpenSession(self, request, context):  # noqa: N802
        try:
            seed = self.state.open(request.session, request.rank, request.world_size)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except PermissionError as exc:
            context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        except OverflowError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        log.info("session %s: seed handed to rank %d", request.session[:12], request.rank)
        return dealer_pb2.OpenSessionReply(seed=seed)

    def _one(self, request, context) -> dealer_pb2.CorrectionReply:
        try:
            share = self.state.correction(request)
        except KeyError as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except (ValueError, TypeError, RuntimeError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return dealer_pb2.CorrectionReply(share=_tensor_msg(share))

    def Correction(self, request, context):  # noqa: N802
        return self._one(request, context)

    def CorrectionBatch(self, request, context):  # noqa: N802
        return dealer_pb2.PrepareReply(replies=[self._one(r, context) for r in request.requests])

    def CloseSession(self, request, context):  # noqa: N802
        self.state.close(request.session, request.rank)
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
    dealer_pb2_grpc.add_DealerServiceServicer_to_server(DealerService(state), server)
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
