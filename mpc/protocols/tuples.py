"""Kinds of correlated randomness: each kind's party half and dealer half side by side.

The dealer scheme is CrypTen's TTP, moved off torch.distributed (``mpc/dealer.py``): every
party draws its shares of a tuple's random inputs from a stream it shares with the dealer,
and party 0 asks the dealer for its share of the dependent value (``a·b``, ``r²``, ...),
which the dealer computes by replaying every party's stream.  A :class:`TupleKind` says,
for one kind of tuple, what a party draws (:meth:`TupleKind.draw`) and what the dealer
computes (:meth:`TupleKind.correction`), in the same order, so the two cannot drift.

Some kinds do not fit that scheme: an FSS key (``fss``) is useless to party 1 unless the
dealer made it, so every party fetches its own part (``TupleKind.fetched_by = "every"``),
and the dealer derives it from a secret of its own (:meth:`TupleKind.keyed_share`), not
from the parties' streams, whose replay order therefore stays untouched.

This module defines CrypTen's own kinds (Beaver triples for products, squares, binary
triples, wrap counts, random bits); the protocols of this package register theirs
(``compare``: carry masks and private ANDs; ``masked``: weight masks; ``fss``: DCF keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..compat import import_crypten

OPS = ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d")
_ALLOWED_KWARGS = {"stride", "padding", "dilation", "groups", "output_padding"}
MAX_ELEMENTS = 1 << 26  # per tensor in one request (512 MiB of int64)

# Party 0's fetch of its correction from the dealer; None at every other party.
Correction = Callable[[], torch.Tensor] | None


@dataclass(frozen=True)
class TupleRequest:
    """One tuple request as a protocol makes it; a program's sequence of them is its
    trace (which lets a later session of the same program be prepared offline)."""

    kind: str
    size0: tuple[int, ...]
    size1: tuple[int, ...] = ()
    op: str = ""
    kwargs_json: str = "{}"

    def options(self) -> dict[str, Any]:
        """The request's keyword options (``kwargs_json``) as a dict; ValueError if bad."""
        try:
            opts = json.loads(self.kwargs_json or "{}")
        except ValueError:
            raise ValueError(f"{self.kind}: malformed options") from None
        if not isinstance(opts, dict):
            raise ValueError(f"{self.kind}: options must be a JSON object")
        return opts


class TupleKind:
    """One kind of tuple.  Subclasses implement both halves; the registry maps a
    request's ``kind`` to its instance."""

    name = ""
    # Who asks the dealer: "first" -- party 0 alone, for its correction (CrypTen's TTP
    # scheme; the others draw everything from their streams); "every" -- each party for its
    # own part (:meth:`keyed_share`), which its stream could not give it.
    fetched_by = "first"

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        """Dealer side: raise ValueError (KeyError for unknown referenced data) for a
        request it must not serve, before the request takes its place in the sequence."""
        for size in (req.size0, req.size1):
            if any(d < 0 for d in size) or numel(size) > MAX_ELEMENTS:
                raise ValueError("tensor size out of range")

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        """Party side: this party's raw shares of one tuple, in the dealer's draw order."""
        raise NotImplementedError

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        """Dealer side: party 0's share of the dependent value, replaying every party's
        stream ``gens`` in :meth:`draw`'s order.  ``dealer`` is the dealer's state, for
        kinds that keep data across sessions (weight masks)."""
        raise NotImplementedError

    def keyed_share(self, dealer: Any, session: str, secret: bytes, seq: int, rank: int,
                    req: TupleRequest) -> torch.Tensor:
        """Dealer side, for kinds every party fetches: ``rank``'s part of request ``seq``
        of ``session``, a pure function of the session's ``secret``, ``seq`` and the request
        (so either party may ask first, and the streams are not touched)."""
        raise NotImplementedError

    def result_elements(self, req: TupleRequest) -> int:
        """int64 elements of the dealer's answer (sizes a bulk fetch)."""
        return numel(req.size0)

    def fold(self, req: TupleRequest, tensors: tuple[Any, ...],
             factors: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
        """Offline: precompute what does not depend on the session's inputs, given the
        public factors registered with the provider (default: nothing)."""
        return tensors


KINDS: dict[str, TupleKind] = {}


def register(kind: TupleKind) -> TupleKind:
    """Make ``kind`` servable by the dealer and drawable by the parties."""
    if not kind.name or kind.name in KINDS:
        raise ValueError(f"tuple kind {kind.name!r} is unnamed or registered twice")
    KINDS[kind.name] = kind
    return kind


def kind_of(req: TupleRequest) -> TupleKind:
    try:
        return KINDS[req.kind]
    except KeyError:
        raise ValueError(f"unknown correction kind {req.kind!r}") from None


# ------------------------------------------------------------------------------ helpers


def numel(size: Sequence[int]) -> int:
    return int(np.prod(size, dtype=np.int64))


def ring(size: Sequence[int], g: torch.Generator) -> torch.Tensor:
    """Uniform ring elements (int64) from ``g``, drawn as CrypTen draws them."""
    return import_crypten().common.rng.generate_random_ring_element(tuple(size), generator=g)


def kbit(size: Sequence[int], g: torch.Generator, bitlength: int | None = None) -> torch.Tensor:
    """Uniform words (or ``bitlength``-bit values) from ``g``, drawn as CrypTen does."""
    rng = import_crypten().common.rng
    return rng.generate_kbit_random_tensor(tuple(size), bitlength=bitlength, generator=g)


def ring_sum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = ts[0].clone()
    for t in ts[1:]:
        out.add_(t)
    return out


def xor_sum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = ts[0].clone()
    for t in ts[1:]:
        out.bitwise_xor_(t)
    return out


def _matmul_size(s0: tuple[int, ...], s1: tuple[int, ...]) -> torch.Size:
    """torch.matmul's result shape (1-d operands are promoted, then dropped)."""
    a = (1, *s0) if len(s0) == 1 else s0
    b = (*s1, 1) if len(s1) == 1 else s1
    if a[-1] != b[-2]:
        raise ValueError(f"matmul of shapes {s0} and {s1}")
    out = [*np.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1]]
    if len(s1) == 1:
        out.pop(-1)
    if len(s0) == 1:
        out.pop(-2 if len(s1) > 1 else -1)
    return torch.Size(out)


def op_result_size(op: str, size0: Sequence[int], size1: Sequence[int],
                   kwargs: dict[str, Any]) -> torch.Size:
    """Shape of op(a, b) without computing it (meta tensors).

    ``mul`` and ``matmul`` are worked out directly: torch's first ops on meta tensors
    import torch._dynamo and sympy, about 3 s on this machine, which a party would pay
    in the first session after every start."""
    if op == "mul":
        return torch.Size(np.broadcast_shapes(tuple(size0), tuple(size1)))
    if op == "matmul" and not kwargs and size0 and size1:
        return _matmul_size(tuple(size0), tuple(size1))
    a = torch.empty(tuple(size0), dtype=torch.long, device="meta")
    b = torch.empty(tuple(size1), dtype=torch.long, device="meta")
    try:
        return getattr(torch, op)(a, b, **kwargs).shape
    except (RuntimeError, NotImplementedError):  # op without a meta kernel for long
        a = torch.zeros(tuple(size0), dtype=torch.float32)
        b = torch.zeros(tuple(size1), dtype=torch.float32)
        return getattr(torch, op)(a, b, **kwargs).shape


# ------------------------------------------------------------------- CrypTen's own kinds


class AdditiveTriple(TupleKind):
    """Beaver triple (a, b, c = op(a, b)) for mul, matmul and convolutions."""

    name = "additive"

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        super().validate(req, dealer)
        if req.op not in OPS:
            raise ValueError(f"op {req.op!r} not allowed")
        if set(req.options()) - _ALLOWED_KWARGS:
            raise ValueError("op arguments not allowed")

    @staticmethod
    def _kwargs(req: TupleRequest) -> dict[str, Any]:
        return {k: tuple(v) if isinstance(v, list) else v for k, v in req.options().items()}

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        a, b = ring(req.size0, g), ring(req.size1, g)
        if correction is not None:
            return a, b, correction()
        size = op_result_size(req.op, req.size0, req.size1, self._kwargs(req))
        return a, b, ring(size, g)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        a_b = [(ring(req.size0, g), ring(req.size1, g)) for g in gens]
        a = ring_sum([ab[0] for ab in a_b])
        b = ring_sum([ab[1] for ab in a_b])
        c = getattr(torch, req.op)(a, b, **self._kwargs(req))
        others = gens[1:]
        return c - ring_sum([ring(c.shape, g) for g in others]) if others else c

    def result_elements(self, req: TupleRequest) -> int:
        return numel(op_result_size(req.op, req.size0, req.size1, self._kwargs(req)))


class BinaryTriple(TupleKind):
    """XOR-shared AND triple (a, b, c = a ∧ b) of words."""

    name = "binary"

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        a, b = kbit(req.size0, g), kbit(req.size1, g)
        if correction is not None:
            return a, b, correction()
        size = torch.broadcast_shapes(torch.Size(req.size0), torch.Size(req.size1))
        return a, b, kbit(size, g)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        ab = [(kbit(req.size0, g), kbit(req.size1, g)) for g in gens]
        c = xor_sum([x[0] for x in ab]) & xor_sum([x[1] for x in ab])
        return c ^ xor_sum([kbit(c.shape, g) for g in gens[1:]])

    def result_elements(self, req: TupleRequest) -> int:
        return numel(torch.broadcast_shapes(torch.Size(req.size0), torch.Size(req.size1)))


class _PairKind(TupleKind):
    """A random value r and a ring value depending on it (r², wraps(r), arith(bit r))."""

    def first(self, size: Sequence[int], g: torch.Generator) -> torch.Tensor:
        return ring(size, g)

    def dependent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        first = self.first(req.size0, g)
        if correction is not None:
            return first, correction()
        return first, ring(req.size0, g)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        value = self.dependent([self.first(req.size0, g) for g in gens])
        return value - ring_sum([ring(req.size0, g) for g in gens[1:]])


class Square(_PairKind):
    """(r, r²)."""

    name = "square"

    def dependent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        r = ring_sum(parts)
        return r * r


class Wraps(_PairKind):
    """(r, θ): the number of times the parties' shares of r wrap the ring."""

    name = "wraps"

    def dependent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return import_crypten().common.util.count_wraps(parts)


class RandomBit(_PairKind):
    """(r as XOR shares of one bit, the same bit as additive shares)."""

    name = "b2a"

    def first(self, size: Sequence[int], g: torch.Generator) -> torch.Tensor:
        return kbit(size, g, bitlength=1)

    def dependent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return xor_sum(parts)


for _kind in (AdditiveTriple(), BinaryTriple(), Square(), Wraps(), RandomBit()):
    register(_kind)
