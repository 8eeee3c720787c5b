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
from functools import cache

import torch
from mpcvit.mpc import carry

from . import fused

TOP = -(1 << 63)


def _crypten():
    from mpcvit.mpc.compat import import_crypten

    return import_crypten()


def _live_mask(residues: set[int], modulus: int) -> int:
    """int64 with the bits at positions ≡ r (mod modulus) for r in ``residues``."""
    return _signed(sum(1 << i for i in range(64) if i % modulus in residues))


def _lsr(v: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words."""
    return v if k == 0 else (v >> k) & ((1 << (64 - k)) - 1)


def _beaver_and(x: torch.Tensor, y: torch.Tensor, rank0: bool) -> torch.Tensor:
    """XOR shares of x ∧ y (one round)."""
    provider = _crypten().mpc.get_default_provider()
    a, b, c = provider.generate_binary_triple(x.size(), y.size())
    _, (e, f) = fused.open_round([], [x ^ a.share, y ^ b.share])
    z = c.share ^ (e & b.share) ^ (f & a.share)
    return z ^ (e & f) if rank0 else z


def _private_and(own: torch.Tensor, rank: int) -> torch.Tensor:
    """XOR shares of A ∧ B where party 0's ``own`` word is A and party 1's is B: each
    party sends its word masked once (u for party 0, v for party 1, from the dealer),
    half the bytes of a Beaver AND on the sharings (A, 0) and (0, B).  Under a provider
    without this correlation, a Beaver AND."""
    crypten = _crypten()
    provider = crypten.mpc.get_default_provider()
    if not hasattr(provider, "private_and"):
        zero = torch.zeros_like(own)
        return _beaver_and(*((own, zero) if rank == 0 else (zero, own)), rank == 0)
    mask, uv = provider.private_and(own.size())
    e, f = crypten.communicator.get().all_gather(own ^ mask)  # A ⊕ u, B ⊕ v
    # A ∧ B = e∧f ⊕ u∧f ⊕ e∧v ⊕ u∧v: party 0 knows e, f, u; party 1 knows e, f, v.
    return (e & f) ^ (mask & f) ^ uv if rank == 0 else (e & mask) ^ uv


def _carry_tuple(n: int, shift: int, final: bool, rank: int):
    """(r_G, r_P, ρ) shares for one level: from the dealer, or, under CrypTen's
    trusted-first-party provider, drawn by party 0 and shared like CrypTen's own TFP
    tuples (no communication)."""
    provider = _crypten().mpc.get_default_provider()
    if hasattr(provider, "carry_tuple"):
        r_g, r_p, rho = provider.carry_tuple((n,), shift, final)
        return r_g, r_p, carry.unpack_live(rho, shift)
    from crypten.common.rng import generate_kbit_random_tensor
    from crypten.mpc.primitives import BinarySharedTensor

    k = len(carry.carry_monomials(final))
    if rank == 0:
        r_g, r_p = generate_kbit_random_tensor((n,)), generate_kbit_random_tensor((n,))
        rho = carry.mask_products(r_g, r_p, shift, final)
    else:
        r_g = r_p = torch.zeros(n, dtype=torch.long)
        rho = torch.zeros(k, n, dtype=torch.long)
    return tuple(BinarySharedTensor(t, src=0).share for t in (r_g, r_p, rho))


@cache
def _subsets(names: tuple[str, ...]) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], ...]:
    """(T, V ∖ T) for every subset T of V, T in ``carry_monomials`` order."""
    out = []
    for size in range(len(names) + 1):
        for sub in itertools.combinations(names, size):
            out.append((sub, tuple(v for v in names if v not in sub)))
    return tuple(out)


def _level(g: torch.Tensor, p: torch.Tensor, shift: int, final: bool, rank: int):
    """One radix-4 level on XOR-shared G/P words (see ``mpc.carry``): one round."""
    r_g, r_p, rho = _carry_tuple(g.numel(), shift, final, rank)
    _, (d_g, d_p) = fused.open_round([], [g ^ r_g, p ^ r_p])
    names = ("Ga", "Gb", "Gc", "Gd", "Pa", "Pb", "Pc", "Pd")
    public = {v: carry.shifted(d_g, d_p, v, shift) for v in names}
    mask = {(v,): carry.shifted(r_g, r_p, v, shift) for v in names}
    mask.update(zip(carry.carry_monomials(final), rho, strict=True))

    def product(term: tuple[str, ...]) -> torch.Tensor:
        out = torch.zeros_like(g)
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

    g_out = g.clone()
    for term in carry.GENERATE_TERMS:
        g_out ^= product(term)
    p_out = None if final else product(carry.PROPAGATE)
    return g_out, p_out


def _pack(words: torch.Tensor, lanes: int, stride: int, live: int) -> torch.Tensor:
    """Interleave ``lanes`` contiguous blocks of ``words``: block k moves right by
    k·stride bits, keeping only its ``live`` bits (the blocks' bits are disjoint)."""
    blocks = words.reshape(lanes, -1)
    out = torch.zeros_like(blocks[0])
    for k in range(lanes):
        out |= _lsr(blocks[k], k * stride) & _signed((live % (1 << 64)) >> (k * stride))
    return out


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


_SHIFTS = (63 - torch.arange(4).reshape(4, 1, 1) - 4 * torch.arange(4).reshape(1, 4, 1))


def sign_bits(share: torch.Tensor) -> torch.Tensor:
    """XOR shares of [x < 0] in bit 0 of one word per element of the flat int64
    ``share`` (padded to a multiple of 64 elements; the padding's bits are junk)."""
    rank = _crypten().communicator.get().get_rank()
    n = share.numel()
    pad = (-n) % 64  # level 3 runs on n/16 words, and the dealer packs them 4 to one
    if pad:
        share = torch.cat([share, share.new_zeros(pad)])
    g = _private_and(share, rank)
    p = share.clone()  # XOR shares of A ⊕ B: each party's own word
    sign_in = _lsr(p, 63)  # A₆₃ ⊕ B₆₃, as shares
    g &= ~TOP
    p &= ~TOP
    if rank == 0:
        p ^= TOP
    g, p = _level(g, p, 1, False, rank)  # groups of 4 bits: live at ≡ 3 (mod 4)
    live4 = _live_mask({3}, 4)
    g, p = _pack(g, 4, 1, live4), _pack(p, 4, 1, live4)
    g, p = _level(g, p, 4, False, rank)  # lane j live at ≡ 15 − j (mod 16)
    live16 = _live_mask({12, 13, 14, 15}, 16)
    g, p = _pack(g, 4, 4, live16), _pack(p, 4, 4, live16)
    g, _ = _level(g, p, 16, True, rank)  # lane 4k + j at bit 63 − 4k − j
    carry_bits = ((g.reshape(1, 1, -1) >> _SHIFTS) & 1).reshape(-1)
    return carry_bits ^ sign_in
