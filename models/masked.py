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

import itertools
import math
from typing import Any

import torch
from mpcvit.mpc.compat import import_crypten

from . import fused

Tensor = Any  # crypten MPCTensor


def _mask_provider():
    """The default provider if it keeps weight masks (the dealer), else None."""
    provider = import_crypten().mpc.get_default_provider()
    return provider if hasattr(provider, "masked_matmul") else None


_keys = itertools.count()


class MaskedWeight:
    """A shared weight of torch layout ``shape`` (out first) used as the right factor
    ``Wᵀ`` (in × out) of products, with ``Wᵀ − b`` public and ``b`` shared."""

    def __init__(self, shape: tuple[int, ...], opened: torch.Tensor, mask_share: torch.Tensor,
                 handle: str, encoder) -> None:
        self.shape = torch.Size(shape)
        self.opened = opened  # E = Wᵀ − b in the ring, (in, out)
        self.mask_share = mask_share  # this party's share of b, (in, out)
        self.handle = handle  # the dealer's name for b (party 0 only)
        self.encoder = encoder
        # W'_i: what the opened δ multiplies (module doc).
        self.online_factor = opened + mask_share if fused._rank() == 0 else mask_share
        self.key = f"w{next(_keys)}"  # this process's name for E in tuple requests
        provider = _mask_provider()
        if provider is not None:
            provider.register_public_factor(self.key, self.opened)

    @classmethod
    def share(cls, weight: Tensor) -> MaskedWeight | None:
        """Mask one shared weight (an ``MPCTensor``, torch layout); one round, at load
        time.  None when the provider cannot keep masks."""
        masked = cls.share_many([weight])
        return None if masked is None else masked[0]

    @classmethod
    def share_many(cls, weights: list[Tensor]) -> list[MaskedWeight] | None:
        """Mask several shared weights, all opened in ONE round."""
        provider = _mask_provider()
        if provider is None:
            return None
        matrices, masks = [], []
        for w in weights:
            matrix = w._tensor.share.reshape(w.shape[0], -1).t().contiguous()
            matrices.append(matrix)
            masks.append(provider.weight_mask(matrix.shape))
        opened, _ = fused.open_round([m - b for m, (b, _) in zip(matrices, masks, strict=True)])
        return [cls(tuple(w.shape), e, b, handle, w.encoder)
                for w, e, (b, handle) in zip(weights, opened, masks, strict=True)]

    def size(self, dim: int | None = None):
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
        provider = _mask_provider()
        if provider is None:
            raise RuntimeError("weights were masked with the dealer; the session's provider "
                               "is another one")
        a, c, folded = provider.masked_matmul(tuple(x.size()), tuple(self.opened.shape),
                                              self.handle, self.key)

        def finish(vals: list[torch.Tensor]) -> Tensor:
            (delta,) = vals
            share = torch.matmul(delta, self.online_factor)
            share += c if folded else torch.matmul(a, self.opened) + c
            return fused._wrap(share, x, self)

        return [x._tensor.share - a], finish


def mask_weights(root) -> int:
    """Replace the weight of every mirrored linear layer (and the patch embedding's conv)
    under the ``SecureModule`` tree ``root`` by a :class:`MaskedWeight`, all in one round.
    Returns how many were masked (0 when the provider keeps no masks)."""
    from torch import nn

    if _mask_provider() is None:
        return 0
    layers = []

    def visit(node) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
            return
        if not hasattr(node, "_cls"):
            return
        if issubclass(node._cls, nn.Linear | nn.Conv2d) and hasattr(node.weight, "_tensor"):
            layers.append(node)
        for value in list(vars(node).values()):
            if isinstance(value, list) or hasattr(value, "_cls"):
                visit(value)

    visit(root)
    masked = MaskedWeight.share_many([layer.weight for layer in layers]) if layers else []
    for layer, weight in zip(layers, masked or [], strict=True):
        layer.weight = weight
    return len(layers)
