"""Correlated randomness for one radix-4 level of the comparison's carry tree.

The sign of an additively shared x = A + B (party 0 holds A, party 1 holds B) is
A₆₃ ⊕ B₆₃ ⊕ carry₆₃, and the carry is the root of a tree of (generate, propagate) pairs.
A radix-2 tree needs 6 AND rounds over 64 bits; radix 4 needs 3.  One radix-4 level
combines the pairs at bit offsets 0, s, 2s, 3s (``a`` highest, ``d`` lowest):

    G' = Ga ⊕ Pa·Gb ⊕ Pa·Pb·Gc ⊕ Pa·Pb·Pc·Gd,      P' = Pa·Pb·Pc·Pd,

products of up to four bits in ONE round: each input bit v is opened once masked,
dv = v ⊕ rv, and a product over a set V of bits expands to

    ∏_{v∈V} (dv ⊕ rv) = ⊕_{T⊆V} (∏_{v∈V∖T} dv) · ρ_T,      ρ_T = ∏_{v∈T} rv,

where the dealer supplies XOR shares of ρ_T for every |T| ≥ 2 (|T| ≤ 1 is local).  The
masks are whole 64-bit words, so a variable at offset k·s is the mask word shifted left
by k·s bits and every bit position gets its own independent products.

Only a quarter of each product word is ever read (a level's outputs sit at 16 of the 64
bit positions), so the products travel packed (:func:`pack_live`).  This module is
plain torch: the dealer and the parties' trusted-first-party fallback compute the same
words from it, in the order of :func:`carry_monomials`.
"""

from __future__ import annotations

import itertools
from functools import cache

import torch

OFFSETS = {"a": 0, "b": 1, "c": 2, "d": 3}
GENERATE_TERMS = (("Pa", "Gb"), ("Pa", "Pb", "Gc"), ("Pa", "Pb", "Pc", "Gd"))
PROPAGATE = ("Pa", "Pb", "Pc", "Pd")


def products_needed(final: bool) -> tuple[tuple[str, ...], ...]:
    """The bit products one level computes (the last level needs no P')."""
    return GENERATE_TERMS if final else (*GENERATE_TERMS, PROPAGATE)


@cache
def carry_monomials(final: bool) -> tuple[tuple[str, ...], ...]:
    """Every mask product ρ_T (|T| ≥ 2) the level needs, in a fixed order."""
    out: list[tuple[str, ...]] = []
    for term in products_needed(final):
        for size in range(2, len(term) + 1):
            for sub in itertools.combinations(term, size):
                if sub not in out:
                    out.append(sub)
    return tuple(out)


def shifted(g: torch.Tensor, p: torch.Tensor, name: str, shift: int) -> torch.Tensor:
    """Word of variable ``name`` (e.g. "Pb"): the G or P word moved so that bit i holds
    the bit at i − offset·shift."""
    word = g if name[0] == "G" else p
    k = OFFSETS[name[1]] * shift
    return word if k == 0 else word << k


def mask_products(r_g: torch.Tensor, r_p: torch.Tensor, shift: int, final: bool
                  ) -> torch.Tensor:
    """ρ_T for every monomial of :func:`carry_monomials`, stacked: (monomials, *shape).

    Each variable's word is shifted once, and each monomial is its prefix's product
    times one more word (every prefix of a monomial comes earlier in the list)."""
    monos = carry_monomials(final)
    out = torch.empty((len(monos), *r_g.shape), dtype=r_g.dtype)
    words: dict[str, torch.Tensor] = {}
    done: dict[tuple[str, ...], torch.Tensor] = {}
    for i, mono in enumerate(monos):
        for name in mono:
            if name not in words:
                words[name] = shifted(r_g, r_p, name, shift)
        prefix = mono[:-1]
        left = done[prefix] if len(prefix) > 1 else words[prefix[0]]
        torch.bitwise_and(left, words[mono[-1]], out=out[i])
        done[mono] = out[i]
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@cache
def live_mask(shift: int) -> int:
    """The level's output bits: the top ``shift`` bits of every block of 4·shift."""
    return _signed(sum(1 << i for i in range(64) if i % (4 * shift) >= 3 * shift))


@cache
def _lane_masks(shift: int) -> tuple[int, ...]:
    """The output bits after an arithmetic right shift by k·shift (a logical shift)."""
    live = live_mask(shift) % (1 << 64)
    return tuple(_signed(live >> (k * shift)) for k in range(4))


def pack_live(words: torch.Tensor, shift: int) -> torch.Tensor:
    """Keep only the output bits of (…, n) words, 4 words to one: (…, n/4), block k of
    the n words moved right by k·shift bits.  Only those bits of a mask product are
    ever used, so the dealer sends a quarter of the words."""
    blocks = words.reshape(*words.shape[:-1], 4, -1)
    masks = _lane_masks(shift)
    out = blocks[..., 0, :] & masks[0]
    for k in range(1, 4):
        out |= (blocks[..., k, :] >> (k * shift)) & masks[k]
    return out


def validate(shift: int, final: bool) -> None:
    if not isinstance(shift, int) or not 1 <= shift <= 21:
        raise ValueError("carry level shift must be an integer in 1..21")
    if not isinstance(final, bool):
        raise ValueError("carry level 'final' must be a boolean")
