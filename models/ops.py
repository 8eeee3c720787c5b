"""Backend-neutral operations: every function takes either torch tensors or CrypTen
``MPCTensor``s and dispatches on the input type.

The model (``vit.py``) is written once against these functions plus the tensor methods
both backends share (``matmul``, ``+``, ``*``, ``sum``, ``mean``, ``reshape``,
``transpose``, ``permute``, slicing).  Plaintext functions are the exact definitions;
secure ones are MPC-friendly approximations chosen for few communication rounds and
checked against the plaintext ones on realistic ranges (see docs/gelu.md).

Fixed-point notes (CrypTen: int64 ring, 16 fractional bits): a secret value must stay
well below 2**47/2**16 ~ 2**31 in magnitude after a product, so no intermediate here
squares anything larger than ~4e4; comparisons are the round-expensive primitive, so
independent comparisons are stacked into one call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Tensor = Any  # torch.Tensor or crypten MPCTensor

# Denominator guard of ReLU-softmax and 2Quad: relu(a) / (sum relu(a) + eps).
# The reference MPCViT uses 1e-5, which is below one fixed-point ulp (2**-16 ~ 1.5e-5):
# an all-negative row would then divide by exactly 0.  2**-8 keeps 1/denominator <= 256,
# inside the range the secure reciprocal is accurate on, and changes the output by
# < 0.4% whenever the row sum is >= 1.
ATTN_EPS = 2.0**-8
QUAD2_C = 5.0

# Input ranges the secure iterative functions are built for (powers of two).
RECIP_RANGE = (-8, 14)  # reciprocal: denominators in [2**-8, 2**14]
INV_SQRT_RANGE = (-14, 16)  # LayerNorm variance + eps in [2**-14, 2**16]
GELU_CUTOFF = 4.0  # secure GeLU: exact relu outside [-4, 4]
GELU_DEGREE = 7


def is_plain(x: Tensor) -> bool:
    return isinstance(x, torch.Tensor)


def _crypten():
    from mpcvit.mpc.compat import import_crypten

    return import_crypten()


# --------------------------------------------------------------------------- structure


def cat(xs: Sequence[Tensor], dim: int = 0) -> Tensor:
    if all(is_plain(x) for x in xs):
        return torch.cat(list(xs), dim=dim)
    return _crypten().cat(list(xs), dim=dim)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weightᵀ + bias with torch's (out, in) weight layout."""
    if is_plain(x) and is_plain(weight):
        return F.linear(x, weight, bias)
    y = x.matmul(weight.t())
    return y if bias is None else y + bias


def patchify(x: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p), rows in conv-weight (C, kh, kw) order.

    A conv with kernel = stride = patch is exactly this reshape followed by a linear
    layer, which CrypTen evaluates as a single matmul.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


# --------------------------------------------------------------------------- activations


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x) if is_plain(x) else _sec_gelu(x)


def relu(x: Tensor) -> Tensor:
    """ReLU; under MPC [x >= 0]·x with integer-scale bits (no truncation)."""
    return F.relu(x) if is_plain(x) else relu_bits(x) * x


def quad(x: Tensor) -> Tensor:
    """MPCFormer's GeLU stand-in 0.125x² + 0.25x + 0.5 (one multiplication)."""
    return x * (0.125 * x + 0.25) + 0.5


def identity(x: Tensor) -> Tensor:
    return x


# --------------------------------------------------------------------------- layer norm


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    if is_plain(x):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    # xc / sqrt(var + eps) = xc·sqrt(D) / sqrt(ss + D·eps) with ss the sum of squares:
    # ss keeps log2(D) more significant bits than var (a variance of 1e-3 is only 65
    # fixed-point ulps), and as a (1 x D)(D x 1) matmul it is truncated once per row
    # rather than D times with a bias.
    d = x.shape[-1]
    ss = xc.unsqueeze(-2).matmul(xc.unsqueeze(-1)).squeeze(-1)
    lo = INV_SQRT_RANGE[0] + math.floor(math.log2(d))
    hi = INV_SQRT_RANGE[1] + math.ceil(math.log2(d))
    y = div_sqrt(xc * math.sqrt(d), ss + d * eps, lo, hi)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# --------------------------------------------------------------------------- attention maps
# Each takes scores a (..., N_query, N_key) and returns the attention matrix.


def softmax(a: Tensor, eps: float = ATTN_EPS) -> Tensor:
    """Standard softmax (``eps`` unused; uniform signature with the other kinds)."""
    if is_plain(a):
        return a.softmax(-1)
    # exp overflows the fixed-point ring for arguments above ~10, so subtract the row max.
    e = exp_nonpositive(a - row_max(a))
    return divide(e, e.sum(-1, keepdim=True), lo=0, hi=_ceil_log2(a.shape[-1]) + 1)


def exp_nonpositive(x: Tensor, iters: int = 8) -> Tensor:
    """exp(x) for x in [-2**(iters+1), 0] (softmax arguments after max-subtraction).

    Under MPC: (1 + y + y²/2)**(2**iters) with y = x / 2**iters; the base stays in
    [0.5, 1] on that range, so the repeated squaring cannot overflow.  Relative error
    ~|x|³/(6·4**iters): 2e-5 at x = -2, where CrypTen's (1 + y)**(2**iters) is off by
    1.6%; one extra round for the y² term.
    """
    if is_plain(x):
        return x.exp()
    y = x * 2.0**-iters
    e = 1 + y + y.square() * 0.5
    for _ in range(iters):
        e = e.square()
    return e


def relu_softmax(a: Tensor, eps: float = ATTN_EPS) -> Tensor:
    r = relu(a)
    s = r.sum(-1, keepdim=True) + eps
    return divide(r, s, lo=eps_range_lo(eps))


def quad2(a: Tensor, c: float = QUAD2_C, eps: float = ATTN_EPS) -> Tensor:
    """MPCFormer's 2Quad: (a + c)² / sum (a + c)²."""
    r = (a + c) * (a + c) if not is_plain(a) else (a + c).square()
    s = r.sum(-1, keepdim=True) + eps
    return divide(r, s)


# --------------------------------------------------------------------------- secure helpers


def eps_range_lo(eps: float) -> int:
    """Lowest power of two a denominator guarded by ``eps`` can reach, clamped at 2**-12
    (below that the secure reciprocal would give up precision at the top of its range)."""
    return max(-12, math.floor(math.log2(eps)))


def _ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n)))


# ----------------------------------------------------------------------------- comparison
# CrypTen's comparison (A2B by a full Kogge-Stone adder, then the sign bit) ANDs 13
# 64-bit words per element, ~430 bytes: it dominates the cost of every ReLU, GeLU, max
# and range test.  Only the carry into the sign bit is needed, and the reduction tree
# for that carry uses 64 / 2**l bit positions at level l, so the live bits of 2**l
# elements are interleaved into one word before each AND: ~3 words per element in the
# same 7 AND rounds + 1 conversion round.


def _bit_mask(level: int) -> int:
    """int64 mask of bit positions i with i mod 2**level == 2**level - 1."""
    m = 0
    for i in range(2**level - 1, 64, 2**level):
        m |= 1 << i
    return m - (1 << 64) if m >= 1 << 63 else m


def _lsr(v: torch.Tensor, j: int) -> torch.Tensor:
    """Logical right shift of int64 words."""
    return v if j == 0 else (v >> j) & ((1 << (64 - j)) - 1)


@cache
def _lane_consts(level: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    lanes = 2**level
    shifts = torch.arange(lanes).unsqueeze(1)
    # Mask applied after the arithmetic right shift by j: the live bits, shifted, with
    # the sign-extension bits cleared (a logical shift).
    m = _bit_mask(level)
    after = torch.tensor([m if j == 0 else (m >> j) & ((1 << (64 - j)) - 1)
                          for j in range(lanes)]).unsqueeze(1)
    return shifts, after, m


def _packed_and(x, y, level: int):
    """x & y for BinarySharedTensors (flat, length divisible by 2**level) whose live bits
    sit only at ``_bit_mask(level)``: lane j of each group of 2**level words is shifted
    right by j and the lanes are summed into one word (their bits are disjoint, so the
    sum is an OR and the packing is local and linear); one Beaver AND on the packed
    words; then the lanes are unpacked."""
    from crypten.mpc.primitives import BinarySharedTensor

    shifts, after, mask = _lane_consts(level)

    def pack(t):
        v = t.share.reshape(shifts.shape[0], -1)
        return BinarySharedTensor.from_shares(((v >> shifts) & after).sum(0))

    z = (pack(x) & pack(y)).share
    return BinarySharedTensor.from_shares(((z.unsqueeze(0) << shifts) & mask).reshape(-1))


def ltz(x: Tensor) -> Tensor:
    """[x < 0] as CrypTen's integer-scale arithmetic bits (like ``MPCTensor._ltz``)."""
    if is_plain(x):
        return (x < 0).long()
    crypten = _crypten()
    if crypten.communicator.get().get_world_size() != 2:
        return x._ltz()
    from crypten.mpc import MPCTensor
    from crypten.mpc.primitives import BinarySharedTensor, beaver

    shape = x.shape
    share = x._tensor.share.reshape(-1)
    n = share.numel()
    pad = (-n) % 64
    if pad:
        share = torch.cat([share, share.new_zeros(pad)])
    # XOR-sharings of each party's additive share: x = a + b over 64-bit integers.
    a = BinarySharedTensor(share, src=0)
    b = BinarySharedTensor(share, src=1)
    top = -(1 << 63)
    p = a ^ b
    sign_in = p.share & top  # a63 ^ b63 (only bit 63 kept)
    g = a & b
    # Bit 63 becomes the identity of the carry operator (g = 0, p = 1), so the root of
    # the reduction tree over bits 0..63 is the carry into bit 63.
    g.share &= ~top
    p.share &= ~top
    if p.rank == 0:
        p.share ^= top
    for level in range(1, 7):
        s = 2 ** (level - 1)
        both_p = BinarySharedTensor.from_shares(torch.cat([p.share, p.share]))
        shifted = BinarySharedTensor.from_shares(torch.cat([g.share << s, p.share << s]))
        prod = _packed_and(both_p, shifted, level).share
        m = _bit_mask(level)
        g.share = (g.share & m) ^ prod[: share.numel()]
        p.share = prod[share.numel():]
    sign = BinarySharedTensor.from_shares(_lsr((g.share & top) ^ sign_in, 63))
    bit = beaver.B2A_single_bit(sign)
    return MPCTensor.from_shares(bit.share[:n].reshape(shape), precision=0)


def relu_bits(x: Tensor) -> Tensor:
    """[x >= 0] as integer-scale bits (exact to multiply with)."""
    return 1 - ltz(x)


def _to_fixed(bits: Tensor) -> Tensor:
    """CrypTen comparison results carry encoder scale 1; rescale them to the default
    fixed-point scale so that multiplying by fractional public constants is exact."""
    from crypten.encoder import FixedPointEncoder

    bits._tensor.encode_(FixedPointEncoder())
    return bits


@cache
def _start_poly(power: float, lo: float, hi: float, degree: int) -> tuple[float, ...]:
    """Polynomial ~ x**power on [lo, hi], least squares in relative error (Newton start)."""
    x = np.linspace(lo, hi, 2001)
    f = x**power
    a = np.stack([x**i for i in range(degree + 1)], 1) / f[:, None]
    return tuple(float(c) for c in np.linalg.lstsq(a, np.ones_like(x), rcond=None)[0])


def _exponent_bits(x: Tensor, base_log2: int, lo: int, hi: int) -> tuple[Tensor, range]:
    """Integer-scale bits [x >= B**k] for the exponents k that split [2**lo, 2**hi] into
    intervals [B**k, B**(k+1)), B = 2**base_log2: one batched comparison."""
    e_lo, e_hi = lo // base_log2, -(-hi // base_log2)  # exponents e_lo .. e_hi - 1
    ks = range(e_lo + 1, e_hi)
    t = torch.tensor([2.0 ** (base_log2 * k) for k in ks]).reshape(-1, *([1] * x.dim()))
    # A real stack, not a broadcast: CrypTen keeps broadcast shares as stride-0 views,
    # which made the comparison circuit several times slower.
    return 1 - ltz(_crypten().stack([x] * len(ks)) - t), range(e_lo, e_hi)


def _select(bits: Tensor, exps: range, value, fixed: bool) -> Tensor:
    """sum over intervals of [x in interval k] * value(k), linear in the bits (no
    multiplication round).  ``fixed=False`` keeps CrypTen's integer scale, exact for
    integer values of any size; ``fixed=True`` gives a fixed-point tensor."""
    vals = [value(k) for k in exps]
    steps = torch.tensor([vals[i + 1] - vals[i] for i in range(len(vals) - 1)],
                         dtype=torch.float64 if fixed else torch.long)
    b = bits.clone()
    if fixed:
        b = _to_fixed(b)
        steps = steps.float()
    return (b * steps.reshape(-1, *([1] * (bits.dim() - 1)))).sum(0) + vals[0]


def _normalise(x: Tensor, base_log2: int, lo: int, hi: int) -> tuple[Tensor, Tensor, range]:
    """x = B**e · d with d in [1, B): returns (d, bits, exponents).

    d = (x · B**(E-e)) / B**E with an exactly represented integer B**(E-e): scaling by
    B**-e directly would need fixed-point values down to 2**-(2·16) for large x.
    """
    bits, exps = _exponent_bits(x, base_log2, lo, hi)
    top = exps[-1]
    up = _select(bits, exps, lambda k: 2 ** (base_log2 * (top - k)), fixed=False)
    return (x * up).div(2 ** (base_log2 * top)), bits, exps


def _recip_unit(d: Tensor, iters: int) -> Tensor:
    """1/d for d in [1, 2): linear start (error <= 6%), Newton y <- y (2 - d y)."""
    c0, c1 = _start_poly(-1.0, 1.0, 2.0, 1)
    y = d * c1 + c0
    for _ in range(iters):
        y = y * (2 - d * y)
    return y


def _inv_sqrt_unit(d: Tensor, iters: int) -> Tensor:
    """1/sqrt(d) for d in [1, 4): quadratic start (error <= 5%), Newton
    y <- y (3 - d y²) / 2 (error e -> 1.5 e²)."""
    c0, c1, c2 = _start_poly(-0.5, 1.0, 4.0, 2)
    y = d * (d * c2 + c1) + c0
    for _ in range(iters):
        y = y * (3 - d * (y * y)) * 0.5
    return y


def divide(num: Tensor, den: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
           iters: int = 2) -> Tensor:
    """num / den for positive den in [2**lo, 2**hi] (broadcast over num).

    Under MPC: s = 2**-floor(log2 den) from one batched comparison, d = den·s in [1, 2),
    Newton for 1/d (2 steps: relative error ~1e-5), result (num·s)·(1/d).  Accurate to
    ~1e-5 relative over the whole range; CrypTen's own reciprocal needs ~10 Newton steps
    plus an exp and still fails outside ~[0.01, 100].
    """
    if is_plain(num) and is_plain(den):
        return num / den
    d, bits, exps = _normalise(den, 1, lo, hi)
    s = _select(bits, exps, lambda k: 2.0**-k, fixed=True)
    return (num * s) * _recip_unit(d, iters)


def reciprocal(x: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
               iters: int = 2) -> Tensor:
    """1/x for x in [2**lo, 2**hi]; prefer :func:`divide` (one fewer rescaling)."""
    if is_plain(x):
        return x.reciprocal()
    d, bits, exps = _normalise(x, 1, lo, hi)
    return _recip_unit(d, iters) * _select(bits, exps, lambda k: 2.0**-k, fixed=True)


def div_sqrt(num: Tensor, x: Tensor, lo: int = INV_SQRT_RANGE[0],
             hi: int = INV_SQRT_RANGE[1], iters: int = 2) -> Tensor:
    """num / sqrt(x) for positive x in [2**lo, 2**hi].

    Under MPC: with x = 4**j · d, d in [1, 4), one batched comparison gives 4**-j and
    2**-j exactly; then (num·2**-j)·(1/sqrt d).  CrypTen's inv_sqrt is off by up to ~79%
    below 0.01 and above ~200; this keeps ~1e-5 relative error over [2**-14, 2**16].
    """
    if is_plain(num) and is_plain(x):
        return num * x.rsqrt()
    d, bits, exps = _normalise(x, 2, lo, hi)
    s = _select(bits, exps, lambda k: 2.0**-k, fixed=True)
    return (num * s) * _inv_sqrt_unit(d, iters)


def inv_sqrt(x: Tensor, lo: int = INV_SQRT_RANGE[0], hi: int = INV_SQRT_RANGE[1],
             iters: int = 2) -> Tensor:
    """1/sqrt(x) for x in [2**lo, 2**hi]; prefer :func:`div_sqrt`."""
    if is_plain(x):
        return x.rsqrt()
    d, bits, exps = _normalise(x, 2, lo, hi)
    return _inv_sqrt_unit(d, iters) * _select(bits, exps, lambda k: 2.0**-k, fixed=True)


def row_max(a: Tensor) -> Tensor:
    """max over the last dim, keepdim, by a pairwise tournament: ceil(log2 N) levels of
    one batched comparison and one multiplication each."""
    if is_plain(a):
        return a.amax(-1, keepdim=True)
    while a.shape[-1] > 1:
        n = a.shape[-1]
        h = n // 2
        x, y = a[..., :h], a[..., h : 2 * h]
        m = y + relu(x - y)
        a = m if n % 2 == 0 else cat([m, a[..., 2 * h :]], dim=-1)
    return a


@cache
def gelu_tail_coeffs(cutoff: float = GELU_CUTOFF, degree: int = GELU_DEGREE) -> tuple[float, ...]:
    """Least-squares p with p(u) ~ t·Φ(-t), u = t / (cutoff/2), t in [0, cutoff]; lowest
    degree first.

    GeLU(x) = relu(x) - |x|·Φ(-|x|), and the second term is even, at most 0.17 and below
    1.3e-4 beyond |x| = 4, so it is fitted once in |x|.  The variable is scaled to
    [0, 2] so that coefficients are O(1): in t the degree-7 coefficient is ~7e-4, which
    16 fractional bits would round by 1% (an error of 0.07 at t = 4).
    """
    # Chebyshev-distributed samples make least squares close to minimax (max error 2e-4).
    t = 0.5 * cutoff * (1.0 - np.cos(np.linspace(0.0, math.pi, 4001)))
    g = t * 0.5 * np.array([math.erfc(v / math.sqrt(2.0)) for v in t])
    u = t / (0.5 * cutoff)
    return tuple(float(c) for c in np.polynomial.polynomial.polyfit(u, g, degree))


def gelu_poly_plain(x: torch.Tensor, cutoff: float = GELU_CUTOFF,
                    degree: int = GELU_DEGREE) -> torch.Tensor:
    """The secure GeLU's exact-arithmetic counterpart (for error studies)."""
    c = gelu_tail_coeffs(cutoff, degree)
    t = x.abs()
    u = t / (0.5 * cutoff)
    p = sum(ci * u**i for i, ci in enumerate(c))
    return F.relu(x) - torch.where(t < cutoff, p, torch.zeros_like(p))


def _sec_gelu(x: Tensor, cutoff: float = GELU_CUTOFF, degree: int = GELU_DEGREE) -> Tensor:
    """GeLU(x) = relu(x) - [|x| < cutoff]·p(|x|).

    Rounds (13): x² (1); one batched comparison for [x < 0] and [x² < cutoff²] (8);
    r = [x >= 0]·x, which gives relu and |x| = 2r - x (1); the remaining powers of
    |x| (2, x² is reused); the mask (1).  Bits stay at CrypTen's integer scale, so bit
    products are exact: outside the mask the high powers may wrap the ring, and the
    exact 0 cancels them.  Two comparisons per element (the comparison is the
    expensive part: ~350 bytes each), where a three-threshold test would need three.
    """
    crypten = _crypten()
    coeffs = gelu_tail_coeffs(cutoff, degree)
    x2 = x.square()
    bits = ltz(crypten.stack([x, x2 - cutoff * cutoff]))
    neg, inside = bits[0], bits[1]
    r = (1 - neg) * x
    k = 2.0 / cutoff
    u = (2 * r - x) * k
    powers = _powers(u, degree, square=x2 * (k * k))
    p = coeffs[0] + sum(c * pw for c, pw in zip(coeffs[1:], powers[1:], strict=True))
    return r - inside * p


def _powers(t: Tensor, degree: int, square: Tensor | None = None) -> list[Tensor]:
    """[1, t, t², ..., t^degree] in ceil(log2 degree) multiplication rounds (one fewer
    if t² is given): each round multiplies every known power by the highest one, as
    one stacked product."""
    pw: list[Tensor | None] = [None, t]
    if square is not None and degree >= 2:
        pw.append(square)
    crypten = _crypten()
    while len(pw) - 1 < degree:
        top = len(pw) - 1
        need = [i for i in range(1, top + 1) if top + i <= degree]
        lhs = crypten.stack([pw[i] for i in need])
        prod = lhs * pw[top].unsqueeze(0)
        pw += [prod[j] for j in range(len(need))]
    return pw  # type: ignore[return-value]


ATTENTION_FNS = {
    "softmax": softmax,
    "relu_softmax": relu_softmax,
    "quad2": quad2,
}

ACTIVATION_FNS = {
    "gelu": gelu,
    "relu": relu,
    "quad": quad,
    "identity": identity,
}
