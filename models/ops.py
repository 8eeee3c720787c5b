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
    return F.relu(x) if is_plain(x) else x.relu()


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
    var = (xc * xc).mean(-1, keepdim=True)
    y = div_sqrt(xc, var + eps)
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
    e = (a - row_max(a)).exp()
    return divide(e, e.sum(-1, keepdim=True), lo=0, hi=_ceil_log2(a.shape[-1]) + 1)


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


def _to_fixed(bits: Tensor) -> Tensor:
    """CrypTen comparison results carry encoder scale 1; rescale them to the default
    fixed-point scale so that multiplying by fractional public constants is exact."""
    from crypten.encoder import FixedPointEncoder

    bits._tensor.encode_(FixedPointEncoder())
    return bits


def stacked_ge(x: Tensor, thresholds: Sequence[float]) -> Tensor:
    """[x >= t] for every threshold t, as one batched comparison: shape (T, *x.shape).

    One comparison costs the same number of rounds whatever the number of elements, so
    all thresholds are compared at once.
    """
    t = torch.tensor(list(thresholds), dtype=torch.float32).reshape(-1, *([1] * x.dim()))
    d = x.unsqueeze(0) - t  # broadcasts to (T, *x.shape)
    return _to_fixed(1 - d._ltz())


def _dyadic_guess(x: Tensor, lo: int, hi: int, power: float, m: int) -> Tensor:
    """Piecewise-constant 2**m * x**power for x in [2**lo, 2**hi]: the value at the
    geometric centre of whichever dyadic interval [2**k, 2**(k+1)) holds x.  One batched
    comparison, no multiplication; relative error at most 2**(|power|/2) - 1."""
    ks = list(range(lo + 1, hi))
    centres = [2.0 ** (m + (k + 0.5) * power) for k in range(lo, hi)]
    steps = torch.tensor([centres[i + 1] - centres[i] for i in range(len(ks))])
    bits = stacked_ge(x, [2.0**k for k in ks])
    steps = steps.reshape(-1, *([1] * x.dim()))
    return (bits * steps).sum(0) + centres[0]


# Reciprocals are carried as z = 2**m * f(x), m chosen so that z <= ~2**FIXED_HEADROOM:
# 1/x for large x is then not a handful of ulps but keeps ~16 significant bits.
FIXED_HEADROOM = 14


def _scaled_recip(x: Tensor, lo: int, hi: int, iters: int) -> tuple[Tensor, int]:
    """(z, m) with z ~ 2**m / x: dyadic guess (error <= 41%), then Newton
    z <- z (2 - x z 2**-m), whose relative error squares each step (3 steps: < 1e-4)."""
    m = FIXED_HEADROOM + lo
    z = _dyadic_guess(x, lo, hi, -1.0, m)
    for _ in range(iters):
        z = z * (2 - (x * z) * 2.0**-m)
    return z, m


def _scaled_inv_sqrt(x: Tensor, lo: int, hi: int, iters: int) -> tuple[Tensor, int]:
    """(z, m) with z ~ 2**m / sqrt(x): dyadic guess (error <= 19%), then Newton
    z <- z (3 - (x z) z 2**-2m) / 2 (3 steps: < 1e-4); (x z) z keeps precision where
    z² alone would underflow."""
    m = FIXED_HEADROOM + lo // 2
    z = _dyadic_guess(x, lo, hi, -0.5, m)
    for _ in range(iters):
        z = z * (3 - ((x * z) * z) * 2.0 ** (-2 * m)) * 0.5
    return z, m


def divide(num: Tensor, den: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
           iters: int = 3) -> Tensor:
    """num / den for positive den in [2**lo, 2**hi] (secret; broadcast over num).

    Under MPC computes (num z) 2**-m with z ~ 2**m / den: multiplying before rescaling
    keeps precision that a tiny 1/den would lose in 16 fractional bits.
    """
    if is_plain(num) and is_plain(den):
        return num / den
    z, m = _scaled_recip(den, lo, hi, iters)
    return (num * z) * 2.0**-m


def reciprocal(x: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
               iters: int = 3) -> Tensor:
    """1/x for x in [2**lo, 2**hi]; prefer :func:`divide` (more precise) when possible."""
    if is_plain(x):
        return x.reciprocal()
    z, m = _scaled_recip(x, lo, hi, iters)
    return z * 2.0**-m


def div_sqrt(num: Tensor, x: Tensor, lo: int = INV_SQRT_RANGE[0],
             hi: int = INV_SQRT_RANGE[1], iters: int = 3) -> Tensor:
    """num / sqrt(x) for positive x in [2**lo, 2**hi] (CrypTen's own inv_sqrt is off by up
    to ~79% below 0.01 and above ~200)."""
    if is_plain(num) and is_plain(x):
        return num * x.rsqrt()
    z, m = _scaled_inv_sqrt(x, lo, hi, iters)
    return (num * z) * 2.0**-m


def inv_sqrt(x: Tensor, lo: int = INV_SQRT_RANGE[0], hi: int = INV_SQRT_RANGE[1],
             iters: int = 3) -> Tensor:
    """1/sqrt(x) for x in [2**lo, 2**hi]; prefer :func:`div_sqrt` when possible."""
    if is_plain(x):
        return x.rsqrt()
    z, m = _scaled_inv_sqrt(x, lo, hi, iters)
    return z * 2.0**-m


def row_max(a: Tensor) -> Tensor:
    """max over the last dim, keepdim, by a pairwise tournament: ceil(log2 N) levels of
    one batched comparison and one multiplication each."""
    if is_plain(a):
        return a.amax(-1, keepdim=True)
    while a.shape[-1] > 1:
        n = a.shape[-1]
        h = n // 2
        x, y = a[..., :h], a[..., h : 2 * h]
        m = y + (x - y).relu()
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

    Rounds: one batched comparison for [x >= 0], [x >= -cutoff], [x >= cutoff]; one
    multiplication for c·x (giving relu and |x| = 2cx - x); ceil(log2 degree)
    multiplications for the powers of |x|; one for the mask.  Outside the mask the
    powers may wrap the ring, which the exact 0 of the mask cancels.
    """
    coeffs = gelu_tail_coeffs(cutoff, degree)
    bits = stacked_ge(x, [0.0, -cutoff, cutoff])
    pos, above_lo, above_hi = bits[0], bits[1], bits[2]
    inside = above_lo - above_hi
    r = pos * x
    u = (2 * r - x) * (2.0 / cutoff)
    powers = _powers(u, degree)
    p = coeffs[0] + sum(c * pw for c, pw in zip(coeffs[1:], powers[1:], strict=True))
    return r - inside * p


def _powers(t: Tensor, degree: int) -> list[Tensor]:
    """[1, t, t², ..., t^degree] in ceil(log2 degree) multiplication rounds: each round
    multiplies every known power by the highest one (batched into one stacked product)."""
    pw: list[Tensor | None] = [None, t]
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
