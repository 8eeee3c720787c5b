"""Weights masked once at load time: linear layers that open only their input.

A Beaver product ``x·W`` opens ``x − a`` and ``W − b`` every time it runs.  The weights
of a served model never change, so :class:`MaskedWeight` opens ``E = W − b`` once, when
the model is shared, with a mask ``b`` that the dealer keeps (see ``mpc/dealer.py``).
Each inference then draws a fresh ``a`` with ``c = a·b`` and opens only ``δ = x − a``:

    x·W = (δ + a)·E + δ·b + a·b,   party i's share: X_i·E + δ·b_i + c_i,

with ``X_0 = δ + a_0`` and ``X_i = a_i`` otherwise.  ``E`` is uniformly random to both
parties (``b`` is unknown to each of them), ``δ`` is masked by a fresh ``a``, and ``c`` is
a fresh sharing, so nothing new is revealed; per product the opened bytes drop from
``|x| + |W|`` to ``|x|``.  Regrouped, party i's share is ``δ·W'_i + (a_i·E + c_i)`` with
``W'_0 = E + b_0`` and ``W'_i = b_i`` fixed at load; the bracket does not depend on ``x``,
so a session prepared offline computes it then (``DealerProvider.register_public_factor``)
and the online phase multiplies once per layer (twice when not prepared).

Only the dealer provider keeps masks; with another provider the weights stay ordinary
``MPCTensor``s and CrypTen's Beaver products run as before.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..compat import import_crypten
from . import fused
from .tuples import Correction, TupleKind, TupleRequest, op_result_size, register, ring, ring_sum

if TYPE_CHECKING:
    from crypten.encoder import FixedPointEncoder

Tensor = Any  # crypten MPCTensor


MAX_MASK_ELEMENTS = 1 << 27  # weight masks a dealer keeps at once (1 GiB); LRU go first


def mask_provider() -> Any:
    """The default provider if it keeps weight masks (the dealer), else None."""
    provider = import_crypten().mpc.get_default_provider()
    return provider if hasattr(provider, "public_factors") else None


_keys = itertools.count()


class MaskedWeight:
    """A shared weight of torch layout ``shape`` (out first) used as the right factor
    ``Wᵀ`` (in × out) of products, with ``Wᵀ − b`` public and ``b`` shared."""

    def __init__(self, shape: tuple[int, ...], opened: torch.Tensor, mask_share: torch.Tensor,
                 handle: str, encoder: FixedPointEncoder) -> None:
        self.shape = torch.Size(shape)
        self.opened = opened  # E = Wᵀ − b in the ring, (in, out)
        self.mask_share = mask_share  # this party's share of b, (in, out)
        self.handle = handle  # the dealer's name for b (party 0 only)
        self.encoder = encoder
        # W'_i: what the opened δ multiplies (module doc).
        self.online_factor = opened + mask_share if fused.rank() == 0 else mask_share
        self.key = f"w{next(_keys)}"  # this process's name for E in tuple requests
        provider = mask_provider()
        if provider is not None:
            provider.public_factors[self.key] = self.opened

    @classmethod
    def share(cls, weight: Tensor) -> MaskedWeight | None:
        """Mask one shared weight (an ``MPCTensor``, torch layout); one round, at load
        time.  None when the provider cannot keep masks."""
        masked = cls.share_many([weight])
        return None if masked is None else masked[0]

    @classmethod
    def share_many(cls, weights: list[Tensor]) -> list[MaskedWeight] | None:
        """Mask several shared weights, all opened in ONE round."""
        provider = mask_provider()
        if provider is None:
            return None
        matrices, masks = [], []
        for w in weights:
            matrix = w._tensor.share.reshape(w.shape[0], -1).t().contiguous()
            matrices.append(matrix)
            masks.append(_weight_mask(provider, matrix.shape))
        opened, _ = fused.open_round([m - b for m, (b, _) in zip(matrices, masks, strict=True)])
        return [cls(tuple(w.shape), e, b, handle, w.encoder)
                for w, e, (b, handle) in zip(weights, opened, masks, strict=True)]

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def reshape(self, *shape: int) -> MaskedWeight:
        """The weight as the (out, in) matrix a layer multiplies by (the only view used)."""
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if len(shape) != 2 or shape[0] != self.shape[0] or shape[1] not in (
                -1, self.opened.shape[0]):
            raise ValueError(f"a masked weight is only used as its ({self.shape[0]}, "
                             f"{self.opened.shape[0]}) matrix, not {shape}")
        return self

    def linear(self, x: Tensor) -> Tensor:
        """``x @ Wᵀ`` for a shared ``x`` (…, in): one round, opening only ``x − a``."""
        return fused.in_one_round([self.linear_part(x)])[0]

    def linear_part(self, x: Tensor) -> fused.Part:
        """:meth:`linear` as a ``fused.Part``, to share its round with other products."""
        provider = mask_provider()
        if provider is None:
            raise RuntimeError("weights were masked with the dealer; the session's provider "
                               "is another one")
        a, c, folded = _masked_matmul(provider, tuple(x.size()), tuple(self.opened.shape),
                                              self.handle, self.key)

        def finish(vals: list[torch.Tensor]) -> Tensor:
            (delta,) = vals
            share = torch.matmul(delta, self.online_factor)
            share += c if folded else torch.matmul(a, self.opened) + c
            return fused.wrap_product(share, x, self)

        return [x._tensor.share - a], finish


# ------------------------------------------------------------------ correlated randomness
# Party half (requests) and dealer half (the masks it keeps) of the weight masks.


def _handle_text(handle: torch.Tensor) -> str:
    return "".join(f"{int(v) & (2**64 - 1):016x}" for v in handle.reshape(-1))


def _weight_mask(provider: Any, size: Sequence[int]) -> tuple[torch.Tensor, str]:
    """This party's share of a fresh mask ``b`` of ``size`` that the dealer keeps, and
    (party 0 only; "" elsewhere) the dealer's handle for it."""
    b, handle = provider.draw_tuple(TupleRequest("mask", tuple(size)))
    return b, "" if handle is None else _handle_text(handle)


def _masked_matmul(provider: Any, size0: Sequence[int], size1: Sequence[int], handle: str,
                   key: str = "") -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Shares of a fresh ``a`` of ``size0`` and of ``c = a @ b`` for the mask ``b`` (of
    ``size1``) registered under ``handle`` (party 0's; others pass ""), and False; or,
    when the session was prepared offline and weight ``key`` registered its public
    factor ``E``, ``(a, a @ E + c, True)`` (:meth:`MaskedMatmul.fold`)."""
    fields = {"mask": handle} if fused.rank() == 0 else {}
    if key:
        fields["weight"] = key
    a, c, *folded = provider.draw_tuple(TupleRequest(
        "masked_matmul", tuple(size0), tuple(size1), "matmul", json.dumps(fields, sort_keys=True)))
    return a, c, bool(folded)


class MaskStore:
    """The dealer's weight masks b, by random 128-bit handle, least recently used first
    out beyond ``max_elements``."""

    def __init__(self, max_elements: int = MAX_MASK_ELEMENTS) -> None:
        self.max_elements = max_elements
        self._masks: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, b: torch.Tensor) -> torch.Tensor:
        """Keep ``b``; return its handle as two int64 words (only party 0 learns it)."""
        handle = torch.from_numpy(np.frombuffer(os.urandom(16), dtype="<i8").copy())
        with self._lock:
            self._masks[_handle_text(handle)] = b
            held = sum(m.nelement() for m in self._masks.values())
            while held > self.max_elements and len(self._masks) > 1:
                _, old = self._masks.popitem(last=False)
                held -= old.nelement()
        return handle

    def get(self, key: Any) -> torch.Tensor:
        with self._lock:
            mask = self._masks.get(key) if isinstance(key, str) else None
            if mask is None:
                raise KeyError("unknown weight mask (the dealer restarted or dropped it): "
                               "the parties must share the weights again")
            self._masks.move_to_end(key)
        return mask

    def __len__(self) -> int:
        return len(self._masks)


class WeightMask(TupleKind):
    """A fresh mask b of a weight matrix: every party draws its share, the dealer keeps
    the sum and answers party 0 with the handle."""

    name = "mask"

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        super().validate(req, dealer)
        if len(req.size0) != 2:
            raise ValueError("a weight mask is a matrix")

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        b = ring(req.size0, g)
        return b, (correction() if correction is not None else None)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        return dealer.masks.add(ring_sum([ring(req.size0, g) for g in gens]))

    def result_elements(self, req: TupleRequest) -> int:
        return 2  # the handle


class MaskedMatmul(TupleKind):
    """(a, c = a @ b) for a fresh a and the kept mask b named by party 0's handle."""

    name = "masked_matmul"

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        a = ring(req.size0, g)
        if correction is not None:
            return a, correction()
        return a, ring(op_result_size("matmul", req.size0, req.size1, {}), g)

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        super().validate(req, dealer)
        if dealer is not None:
            self._mask(req, dealer)

    @staticmethod
    def _mask(req: TupleRequest, dealer: Any) -> torch.Tensor:
        mask = dealer.masks.get(req.options().get("mask", ""))
        if tuple(mask.shape) != req.size1 or not req.size0 or req.size0[-1] != req.size1[0]:
            raise ValueError(f"masked matmul of {req.size0} by a mask of {tuple(mask.shape)}")
        return mask

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        mask = self._mask(req, dealer)
        a = ring_sum([ring(req.size0, g) for g in gens])
        c = torch.matmul(a, mask)
        return c - ring_sum([ring(c.shape, g) for g in gens[1:]])

    def result_elements(self, req: TupleRequest) -> int:
        return math.prod(op_result_size("matmul", req.size0, req.size1, {}))

    def fold(self, req: TupleRequest, tensors: tuple[Any, ...],
             factors: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:
        """Offline: ``(a, c)`` becomes ``(a, a·E + c, True)`` when the request's weight
        registered its public factor ``E``."""
        key = req.options().get("weight")
        factor = factors.get(key) if key is not None else None
        if factor is None:
            return tensors
        a, c = tensors
        return a, torch.matmul(a, factor) + c, True


register(WeightMask())
register(MaskedMatmul())
