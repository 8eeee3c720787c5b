"""The sign bit of a 2-party additive sharing in 4 rounds (plus 1 to use it).

x = A + B mod 2⁶⁴ with A party 0's share and B party 1's, so
sign(x) = A₆₃ ⊕ B₆₃ ⊕ carry₆₃(A + B), and the carry is the root of a tree over the
(generate, propagate) pairs g = A ∧ B, p = A ⊕ B of each bit:

1. one AND of the parties' private words gives g (p is local), with bit 63 set to
   the identity pair (g = 0, p = 1) so that the root over bits 0..63 is the carry
   into bit 63;
2. three radix-4 levels (``mpc.carry``): each opens the masked G and P words once and
   forms every product of up to four bits with dealer-supplied mask products, so
   64 → 16 → 4 → 1 groups in 3 rounds where a radix-2 tree needs 6.

CrypTen's own comparison (a full Kogge-Stone adder after A2B) needs 7 AND rounds and
~13 words per element.  Here each party sends 1 word per element for g, then
2 per radix-4 level; between levels the live bits of 4 and then 16 elements are
interleaved into one word (shifts keep each element's bits in its own residue class),
so each element costs ~1 + 2 + 1/2 + 1/8 words each way.

The result is the sign as bit 0 of XOR-shared words; ``fused.bit_products`` turns it
into an arithmetic bit in the round that also multiplies it into values.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from functools import cache
from typing import Any

import torch

from ..compat import import_crypten
from . import carry, fused
from .tuples import Correction, TupleKind, TupleRequest, kbit, numel, register, xor_sum

TOP = -(1 << 63)


def _lsr(v: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words."""
    return v if k == 0 else (v >> k) & ((1 << (64 - k)) - 1)


def _beaver_and(x: torch.Tensor, y: torch.Tensor, rank0: bool) -> torch.Tensor:
    """XOR shares of x ∧ y (one round)."""
    provider = import_crypten().mpc.get_default_provider()
    a, b, c = provider.generate_binary_triple(x.size(), y.size())
    _, (e, f) = fused.open_round([], [x ^ a.share, y ^ b.share])
    z = c.share ^ (e & b.share) ^ (f & a.share)
    return z ^ (e & f) if rank0 else z


def _private_and(own: torch.Tensor, rank: int) -> torch.Tensor:
    """XOR shares of A ∧ B where party 0's ``own`` word is A and party 1's is B: each
    party sends its word masked once (u for party 0, v for party 1, from the dealer),
    half the bytes of a Beaver AND on the sharings (A, 0) and (0, B).  Under a provider
    without this correlation, a Beaver AND."""
    crypten = import_crypten()
    provider = crypten.mpc.get_default_provider()
    if not hasattr(provider, "draw_tuple"):
        zero = torch.zeros_like(own)
        return _beaver_and(*((own, zero) if rank == 0 else (zero, own)), rank == 0)
    mask, uv = provider.draw_tuple(TupleRequest("private_and", tuple(own.size())))
    e, f = crypten.communicator.get().all_gather(own ^ mask)  # A ⊕ u, B ⊕ v
    # A ∧ B = e∧f ⊕ u∧f ⊕ e∧v ⊕ u∧v: party 0 knows e, f, u; party 1 knows e, f, v.
    return (e & f) ^ (mask & f) ^ uv if rank == 0 else (e & mask) ^ uv


def _carry_tuple(n: int, shift: int, final: bool, rank: int) -> tuple[torch.Tensor, ...]:
    """(r_G, r_P, ρ) shares for one level: from the dealer, or, under CrypTen's
    trusted-first-party provider, drawn by party 0 and shared like CrypTen's own TFP
    tuples (no communication)."""
    provider = import_crypten().mpc.get_default_provider()
    if hasattr(provider, "draw_tuple"):
        return provider.draw_tuple(carry_request(n, shift, final))
    from crypten.common.rng import generate_kbit_random_tensor
    from crypten.mpc.primitives import BinarySharedTensor

    k = len(carry.carry_monomials(final))
    if rank == 0:
        r_g, r_p = generate_kbit_random_tensor((n,)), generate_kbit_random_tensor((n,))
        rho = carry.pack_live(carry.mask_products(r_g, r_p, shift, final), shift)
    else:
        r_g = r_p = torch.zeros(n, dtype=torch.long)
        rho = torch.zeros(k, n // 4, dtype=torch.long)
    return tuple(BinarySharedTensor(t, src=0).share for t in (r_g, r_p, rho))


@cache
def _subsets(names: tuple[str, ...]) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """(T, V ∖ T) for every subset T of V, T in ``carry_monomials`` order."""
    out = []
    for size in range(len(names) + 1):
        for sub in itertools.combinations(names, size):
            out.append((sub, tuple(v for v in names if v not in sub)))
    return tuple(out)


def _level(g: torch.Tensor, p: torch.Tensor, shift: int, final: bool,
           rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One radix-4 level on XOR-shared G/P words (see ``mpc.carry``): one round.

    Only the level's output bits matter, so every word is reduced to them
    (``carry.pack_live``, 4 words to one) before the products: the products run on a
    quarter of the words, and the packed outputs are already laid out as the next
    level's input (lane k of 4 moved right by k·shift bits)."""
    r_g, r_p, rho = _carry_tuple(g.numel(), shift, final, rank)
    _, (d_g, d_p) = fused.open_round([], [g ^ r_g, p ^ r_p])
    # Every variable (G or P at offset 0, s, 2s, 3s), opened and masked, in one stack:
    # (public/mask, G/P, offset, n) shifted and packed at once.
    words = torch.stack([torch.stack([d_g, d_p]), torch.stack([r_g, r_p])])
    offsets = torch.arange(4).reshape(4, 1) * shift
    packed = carry.pack_live(words.unsqueeze(2) << offsets, shift)
    public, mask = {}, {}
    for gp, kind in enumerate("GP"):
        for k, off in enumerate("abcd"):
            public[kind + off] = packed[0, gp, k]
            mask[(kind + off,)] = packed[1, gp, k]
    mask.update(zip(carry.carry_monomials(final), rho, strict=True))

    def product(term: tuple[str, ...]) -> torch.Tensor:
        out = torch.zeros_like(public["Ga"])
        for sub, rest in _subsets(term):
            pub = None
            for v in rest:
                pub = public[v] if pub is None else pub & public[v]
            if not sub:  # the all-public term: added once
                if rank == 0:
                    out ^= pub
                continue
            out ^= mask[sub] if pub is None else pub & mask[sub]
        return out

    g_out = carry.pack_live(g, shift)
    for term in carry.GENERATE_TERMS:
        g_out ^= product(term)
    p_out = None if final else product(carry.PROPAGATE)
    return g_out, p_out


# Level 3's packed output: element j·n/4 + k·n/16 + m·n/64 + w sits in word w at bit
# 63 − j − 4k − 16m (each level's packing moved block k of its input right by k·shift).
_SHIFTS = (63 - torch.arange(4).reshape(4, 1, 1, 1) - 4 * torch.arange(4).reshape(1, 4, 1, 1)
           - 16 * torch.arange(4).reshape(1, 1, 4, 1))


def sign_bits(share: torch.Tensor) -> torch.Tensor:
    """XOR shares of [x < 0] in bit 0 of one word per element of the flat int64
    ``share`` (padded to a multiple of 64 elements; the padding's bits are junk)."""
    rank = import_crypten().communicator.get().get_rank()
    n = share.numel()
    pad = (-n) % 64  # each level packs 4 words to one
    if pad:
        share = torch.cat([share, share.new_zeros(pad)])
    g = _private_and(share, rank)
    p = share.clone()  # XOR shares of A ⊕ B: each party's own word
    sign_in = _lsr(p, 63)  # A₆₃ ⊕ B₆₃, as shares
    g &= ~TOP
    p &= ~TOP
    if rank == 0:
        p ^= TOP
    g, p = _level(g, p, 1, False, rank)  # n/4 words: groups of 4 bits
    g, p = _level(g, p, 4, False, rank)  # n/16 words: groups of 16 bits
    g, _ = _level(g, p, 16, True, rank)  # n/64 words: the carry into bit 63
    carry_bits = ((g.reshape(1, 1, 1, -1) >> _SHIFTS) & 1).reshape(-1)
    return carry_bits ^ sign_in


# ------------------------------------------------------------------ correlated randomness
# The dealer halves of the two correlations above, beside the party halves that use them.


def carry_request(n: int, shift: int, final: bool) -> TupleRequest:
    """The request for one carry level's masks over ``n`` words."""
    return TupleRequest("carry", (n,), (), "",
                        json.dumps({"final": bool(final), "shift": int(shift)}, sort_keys=True))


class CarryMasks(TupleKind):
    """XOR shares of the masks r_G, r_P (n words) of one radix-4 carry level and of their
    products (``carry``), packed: (r_G, r_P, ρ of (monomials, n/4))."""

    name = "carry"

    @staticmethod
    def _level(req: TupleRequest) -> tuple[int, bool]:
        opts = req.options()
        try:
            return opts["shift"], opts["final"]
        except KeyError:
            raise ValueError("carry request needs 'shift' and 'final'") from None

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        super().validate(req, dealer)
        carry.validate(*self._level(req))
        if len(req.size0) != 1 or req.size0[0] % 4:
            raise ValueError("carry masks are a flat run of words, a multiple of 4")
        if numel(req.size0) * 32 > (1 << 26):
            raise ValueError("tensor size out of range")

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        r_g, r_p = kbit(req.size0, g), kbit(req.size0, g)
        if correction is not None:
            return r_g, r_p, correction()
        _, final = self._level(req)
        return r_g, r_p, kbit((len(carry.carry_monomials(bool(final))), req.size0[-1] // 4), g)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        shift, final = self._level(req)
        masks = [(kbit(req.size0, g), kbit(req.size0, g)) for g in gens]
        rho = carry.pack_live(carry.mask_products(xor_sum([m[0] for m in masks]),
                                                  xor_sum([m[1] for m in masks]), shift, final),
                              shift)
        others = gens[1:]
        return rho ^ xor_sum([kbit(rho.shape, g) for g in others]) if others else rho

    def result_elements(self, req: TupleRequest) -> int:
        _, final = self._level(req)
        return len(carry.carry_monomials(bool(final))) * numel(req.size0) // 4


class PrivateAnd(TupleKind):
    """For x ∧ y with x known to party 0 and y to party 1: each party's own mask (u for
    party 0, v for party 1) and its XOR share of u ∧ v."""

    name = "private_and"

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        own = kbit(req.size0, g)
        if correction is not None:
            return own, correction()
        return own, kbit(req.size0, g)

    def correction(self, gens: Sequence[torch.Generator], req: TupleRequest,
                   dealer: Any) -> torch.Tensor:
        if len(gens) != 2:
            raise ValueError("private_and is a two-party correlation")
        u, v = (kbit(req.size0, g) for g in gens)
        return (u & v) ^ kbit(req.size0, gens[1])


register(CarryMasks())
register(PrivateAnd())
