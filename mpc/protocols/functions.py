"""Secure nonlinear functions on CrypTen ``MPCTensor``s, built for few rounds.

Each function here is the MPC half of an operation of ``mpcvit.models.ops``, which
dispatches to it when its input is secret-shared; the plaintext halves there are the
exact definitions these approximate, checked against them on realistic ranges (see
docs/gelu.md).

Fixed-point notes (CrypTen: int64 ring, 16 fractional bits): a secret value must stay
well below 2**47/2**16 ~ 2**31 in magnitude after a product, so no intermediate here
squares anything larger than ~4e4; comparisons are the round-expensive primitive, so
independent comparisons are stacked into one call.

Protocol variants: every function that compares or approximates takes ``protocol``, a
:class:`~mpcvit.mpc.protocols.plan.ProtocolPlan` (None is the default plan, the
protocols described here without FSS).  With ``comparison="fss"`` each comparison is one
opening of x + r and a dealer key per element (``fss``); the ``spline`` variants select a
quadratic per piece by comparisons against every breakpoint (``splines``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..compat import import_crypten
from . import compare, fss, fused, splines
from .plan import ProtocolPlan, resolve

if TYPE_CHECKING:
    from crypten.mpc.primitives import BinarySharedTensor

Tensor = Any  # crypten MPCTensor

# Input ranges the secure iterative functions are built for (powers of two).
RECIP_RANGE = (-8, 14)  # reciprocal: denominators in [2**-8, 2**14]
INV_SQRT_RANGE = (-14, 16)  # LayerNorm variance + eps in [2**-14, 2**16]
INV_SQRT_SUB = 4  # secure 1/sqrt: pieces per octave (relative error 5.3e-5)
# The pieces save a round over octaves with a polynomial but compare each value against
# (sub - 1)·octaves more thresholds.  At batch 1 (50-65 tokens, ~5000 extra comparisons
# per LayerNorm) that breaks even on loopback and gains a little on WAN; with pieces at
# every batch size, 32 clients' batched throughput fell from 5.8-6.3 to 4.9 images/s.
# So: pieces up to this many extra compared elements, octaves beyond.
PIECES_MAX_EXTRA = 8192
# ``norm_linear`` saves a round but scales the layer's output (twice: by 2**-E/2, then
# by the polynomial) instead of its input: 2·(out − in) more opened elements per row.
# On the WAN preset (100 Mbps, 40 ms) a round costs as much as ~31k opened elements
# (8 bytes each way), so LayerNorms fuse only below that.
FUSE_MAX_EXTRA = 32_768
GELU_CUTOFF = 4.0  # secure GeLU: exact relu outside [-4, 4]
GELU_DEGREE = 7
RECIP_SUB = 8  # spline reciprocal: pieces per octave (relative error 2.1e-5)


def eps_range_lo(eps: float) -> int:
    """Lowest power of two a denominator guarded by ``eps`` can reach, clamped at 2**-12
    (below that the secure reciprocal would give up precision at the top of its range)."""
    return max(-12, math.floor(math.log2(eps)))


def _ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n)))


# ----------------------------------------------------------------------------- comparison
# CrypTen's comparison (A2B by a full Kogge-Stone adder, then the sign bit) ANDs 13
# 64-bit words per element in 7 rounds: it dominates the cost of every ReLU, GeLU, max
# and range test.  Only the carry into the sign bit is needed: ``compare.sign_bits``
# gets it in 4 rounds (one AND, three radix-4 levels) sending ~3.6 words per element.


def _sign_binary(x: Tensor) -> BinarySharedTensor:
    """[x < 0] as bit 0 of a flat XOR-shared ``BinarySharedTensor`` (padded; the first
    ``x.numel()`` words are x's elements): 4 rounds for two parties."""
    crypten = import_crypten()
    from crypten.mpc.primitives import BinarySharedTensor

    if crypten.communicator.get().get_world_size() != 2:
        from crypten.mpc.primitives.converters import convert
        from crypten.mpc.ptype import ptype as Ptype

        b = convert(x._tensor, Ptype.binary)
        return BinarySharedTensor.from_shares((b.share.reshape(-1) >> 63) & 1)
    return BinarySharedTensor.from_shares(compare.sign_bits(x._tensor.share.reshape(-1)))


def _fss(plan: ProtocolPlan) -> bool:
    """Whether comparisons use FSS keys (two parties only: the keys are 2-party)."""
    if not plan.fss:
        return False
    if import_crypten().communicator.get().get_world_size() != 2:
        raise ValueError("FSS comparisons run between exactly two parties")
    return True


def ltz(x: Tensor, protocol: ProtocolPlan | None = None) -> Tensor:
    """[x < 0] as CrypTen's integer-scale arithmetic bits (like ``MPCTensor._ltz``):
    5 rounds, where CrypTen's own comparison needs 8 with ~3.6x the bytes; with FSS one
    round, exact on the whole ring (64-bit keys)."""
    if _fss(resolve(protocol)):
        return fss.ltz(x)
    return fused.bit_products(_sign_binary(x), x.shape, [])[0]


def ltz_products(x: Tensor, values: Sequence[Tensor],
                 extra: Sequence[tuple[Tensor, Tensor | None, str]] = ()
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """``(b, [b·v for v in values], extra products)`` with b = [x < 0], each v of x's
    shape: the products ride in the comparison's last round (``fused.bit_products``)."""
    return fused.bit_products(_sign_binary(x), x.shape, values, extra)


def relu(x: Tensor, protocol: ProtocolPlan | None = None) -> Tensor:
    """x - [x < 0]·x, the product taken in the comparison's last round
    (``fused.bit_products``): 5 rounds.  With FSS the gate gives relu(x) itself: one
    round, exact for |x| below 2^(fss_bits - 1) fixed-point units (``fss`` module doc)."""
    plan = resolve(protocol)
    if _fss(plan):
        return fss.relu(x, plan.fss_bits)
    _, (neg_x,), _ = ltz_products(x, [x])
    return x - neg_x


def layer_norm(x: Tensor, eps: float, protocol: ProtocolPlan | None = None) -> Tensor:
    """LayerNorm over the last dim without its affine part.

    xc / sqrt(var + eps) = xc·sqrt(D) / sqrt(ss + D·eps) with ss the sum of squares:
    ss keeps log2(D) more significant bits than var (a variance of 1e-3 is only 65
    fixed-point ulps), and ``fused.sum_squares`` truncates it once per row rather than
    D times with a bias.  Rounds: ss (1), then div_sqrt (7 for a batch-1 input, 8 for
    larger ones).  With the affine part folded into the next linear layer
    (``models.secure.fold_norms``) there is no further multiplication, and
    :func:`norm_linear` also overlaps that layer's round.
    """
    xc = x - x.mean(-1, keepdim=True)
    ss = fused.sum_squares(xc)
    return _normalize(xc * math.sqrt(x.shape[-1]), ss, x.shape[-1], eps, protocol=protocol)


def norm_linear(x: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None,
                rectify: bool = False, protocol: ProtocolPlan | None = None) -> Tensor:
    """linear(layer_norm(x)) for a LayerNorm without affine part; with ``rectify``,
    relu of it (the layer must then have no bias).

    The norm scales each row by 1/sqrt(var + eps), which commutes with the linear layer:
    the layer's product xc·Wᵀ shares the first round with Σ xc², and the scale is
    applied to its output.  The pair takes one round fewer, at the price of scaling the
    (wider) output rather than the input (``FUSE_MAX_EXTRA``).  The positive scale also
    commutes with a ReLU when there is no bias in between, so the ReLU's sign test
    joins the norm's range comparison: no round of its own.
    """
    if rectify and bias is not None:
        raise ValueError("rectify needs a linear layer without bias")
    d = x.shape[-1]
    xc = x - x.mean(-1, keepdim=True)
    ss, h = fused.in_one_round([fused.sum_squares_part(xc), _linear_part(xc, weight)])
    y = _normalize(h * math.sqrt(d), ss, d, eps, rectify, protocol)
    return y if bias is None else y + bias


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x @ weightᵀ (no bias); a masked weight (``masked.MaskedWeight``) opens only x's
    mask."""
    if hasattr(weight, "linear"):
        return weight.linear(x)
    return x.matmul(weight.t())


def _linear_part(x: Tensor, weight: Tensor) -> fused.Part:
    """x @ weightᵀ (no bias) as a ``fused.Part`` whose result is the product."""
    if hasattr(weight, "linear_part"):  # a MaskedWeight: only x's mask is opened
        return weight.linear_part(x)
    opens, finish = fused.products_part([(x, weight.t(), "matmul")])
    return opens, lambda vals: finish(vals)[0]


def _normalize(num: Tensor, ss: Tensor, d: int, eps: float, rectify: bool = False,
               protocol: ProtocolPlan | None = None) -> Tensor:
    """num / sqrt(ss + D·eps) (relu(num) with ``rectify``) on the range a LayerNorm over
    D features needs."""
    lo = INV_SQRT_RANGE[0] + math.floor(math.log2(d))
    hi = INV_SQRT_RANGE[1] + math.ceil(math.log2(d))
    return div_sqrt(num, ss + d * eps, lo, hi, rectify=rectify, protocol=protocol)


def softmax(a: Tensor, protocol: ProtocolPlan | None = None) -> Tensor:
    """softmax over the last dim: exp overflows the fixed-point ring for arguments
    above ~10, so the row max is subtracted first."""
    e = exp_nonpositive(a - row_max(a, protocol), protocol=protocol)
    return divide(e, e.sum(-1, keepdim=True), lo=0, hi=_ceil_log2(a.shape[-1]) + 1,
                  protocol=protocol)


def exp_nonpositive(x: Tensor, iters: int = 8, protocol: ProtocolPlan | None = None
                    ) -> Tensor:
    """exp(x) for x in [-2**(iters+1), 0] (softmax arguments after max-subtraction):
    (1 + y + y²/2)**(2**iters) with y = x / 2**iters; the base stays in [0.5, 1] on that
    range, so the repeated squaring cannot overflow.  Relative error ~|x|³/(6·4**iters):
    2e-5 at x = -2, where CrypTen's (1 + y)**(2**iters) is off by 1.6%; one extra round
    for the y² term.

    The ``spline`` variant: 8 quadratic pieces on [-9, 0] and 0 below (absolute error
    about 3e-4, where this one's rounding reaches 3e-3 near 0), 2 rounds with FSS
    comparisons (``spline``)."""
    plan = resolve(protocol)
    if plan.exp == "spline":
        return spline(x, splines.exp_spline(), plan)
    y = x * 2.0**-iters
    e = 1 + y + y.square() * 0.5
    for _ in range(iters):
        e = e.square()
    return e


@cache
def _unit_poly(power: float, degree: int) -> tuple[float, ...]:
    """p(u) ~ t**power for t = 1.5 + u in [1, 2], least squares in relative error on
    Chebyshev nodes (close to minimax); lowest degree first.  The centred variable keeps
    the powers of u below 1, so their fixed-point rounding is not amplified."""
    u = -0.5 * np.cos(np.linspace(0.0, math.pi, 4001))
    f = (1.5 + u) ** power
    a = np.stack([u**i for i in range(degree + 1)], 1) / f[:, None]
    return tuple(float(c) for c in np.linalg.lstsq(a, np.ones_like(u), rcond=None)[0])


def _select(bits: Tensor, exps: range, value: Callable[[int], float]) -> Tensor:
    """sum over intervals of [x in interval k] * value(k) as a fixed-point tensor, linear
    in the bits (no multiplication round).  Each value(k) is rounded once to the
    fixed-point grid and the steps between the encoded values are integers, so the
    integer-scale bits select exactly one encoding."""
    from crypten.encoder import FixedPointEncoder

    encoder = FixedPointEncoder()
    vals = [round(value(k) * encoder.scale) for k in exps]
    steps = torch.tensor([vals[i + 1] - vals[i] for i in range(len(vals) - 1)])
    out = (bits * steps.reshape(-1, *([1] * (bits.dim() - 1)))).sum(0) + vals[0]
    out.encoder = encoder
    return out


def _range_comparison(d: Tensor, v: Tensor, rectify: Tensor | None = None
                      ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(b, b·v)`` for b = [d < 0] (``ltz_products``) and, given ``rectify``,
    relu(rectify) from the same comparison: one sign test on both sets of elements, so
    the ReLU adds bytes and per-value work but no round, nor the comparison's fixed
    cost."""
    if rectify is None:
        below, (below_v,), _ = ltz_products(d, [v])
        return below, below_v, None
    from crypten.mpc import MPCTensor

    if rectify.encoder.scale != d.encoder.scale or v.encoder.scale != d.encoder.scale:
        raise ValueError("rectify must share the compared tensor's fixed-point scale")

    def flat(a: Tensor, b: Tensor) -> Tensor:
        t = MPCTensor.from_shares(
            torch.cat([a._tensor.share.reshape(-1), b._tensor.share.reshape(-1)]), precision=0)
        t.encoder = a.encoder
        return t

    n = d.numel()
    below, (below_v,), _ = ltz_products(flat(d, rectify), [flat(v, rectify)])
    negative = below_v[n:].reshape(rectify.shape)  # [r < 0]·r
    return below[:n].reshape(d.shape), below_v[:n].reshape(d.shape), rectify - negative


def range_bits(hi: int, scale: float) -> int:
    """FSS comparison width for range tests of x in [0, 2**hi] against thresholds there:
    exact while |x - t| < 2**(hi + 2) (``fss`` module doc)."""
    return int(min(64, max(20, hi + round(math.log2(scale)) + 3)))


def threshold_products(x: Tensor, thresholds: Sequence[float], plan: ProtocolPlan,
                       bits: int = 64, shift: int = 0, rectify: Tensor | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(below, below_x, relu(rectify))`` with ``below[k] = [x < t_k]`` (integer-scale
    bits) and ``below_x[k] = below[k]·x`` (x's encoder), each (P, *x.shape), for public
    thresholds; ``rectify``'s ReLU rides in the same comparison round.

    With the carry comparison: one packed comparison of P copies of x (4 + 1 rounds, the
    products in its last round).  With FSS: ONE key per element of x evaluated at all P
    thresholds (``bits``/``shift`` set its exactness window), and a ReLU key per element
    of ``rectify``, all opened in one round."""
    if not _fss(plan):
        shape = (-1, *([1] * x.dim()))
        xs = _repeat(x, len(thresholds))
        return _range_comparison(xs - torch.tensor(list(thresholds)).reshape(shape), xs,
                                 rectify)
    parts = [fss.thresholds_part(x, thresholds, bits, shift)]
    if rectify is not None:
        parts.append(fss.relu_part(rectify, plan.fss_bits))
    done = fused.in_one_round(parts)
    ge, ge_x = done[0]
    one = int(fused.rank() == 0)
    below = _like(one - ge._tensor.share, ge)
    below_x = _like(x._tensor.share.unsqueeze(0) - ge_x._tensor.share, ge_x)
    return below, below_x, (done[1] if rectify is not None else None)


def _like(share: torch.Tensor, model: Tensor) -> Tensor:
    """An MPCTensor of raw ``share`` with ``model``'s encoder."""
    from crypten.mpc import MPCTensor

    out = MPCTensor.from_shares(share, precision=0)
    out.encoder = model.encoder
    return out


def _unit_range(x: Tensor, lo: int, hi: int, rectify: Tensor | None = None,
                plan: ProtocolPlan | None = None
                ) -> tuple[Tensor, Tensor, range, Tensor | None]:
    """Write positive x in [2**lo, 2**hi] as 2**e · t with t in [1, 2).

    Returns (u = t - 1.5, bits [x >= 2**k] for k = lo+1 .. hi-1, exponents lo .. hi-1,
    relu(rectify) or None).
    One batched comparison; the products [x < 2**k]·x that give t = x · 2**(top - e) /
    2**top ride in its last round, so t costs no round of its own.  x · 2**(top - e) is
    an exact integer multiple of x's shares (2**-e itself would need fixed-point values
    down to 2**-(2·16) for large x).
    """
    from crypten.mpc import MPCTensor

    plan = resolve(plan)
    ks = range(lo + 1, hi)
    exps = range(lo, hi)
    shape = (-1, *([1] * x.dim()))
    below, below_x, rectified = threshold_products(
        x, [2.0**k for k in ks], plan, range_bits(hi, x.encoder.scale), rectify=rectify)
    top = exps[-1]
    ups = [2 ** (top - e) for e in exps]
    steps = torch.tensor([ups[i + 1] - ups[i] for i in range(len(ks))]).reshape(shape)
    # x·up(e) = x·ups[0] + sum_k steps_k·[x >= 2**k]·x = x·ups[-1] - sum_k steps_k·below_k·x
    share = x._tensor.share * ups[-1] - (below_x._tensor.share * steps).sum(0)
    scaled = MPCTensor.from_shares(share, precision=0)
    scaled.encoder = x.encoder
    return scaled.div(2**top) - 1.5, 1 - below, exps, rectified


def _repeat(x: Tensor, k: int) -> Tensor:
    """``crypten.stack([x] * k)`` without its per-tensor overhead (~1.5 ms for the 119
    copies of a LayerNorm's range test).  A real copy, not a broadcast view: stride-0
    shares made the comparison circuit several times slower."""
    from crypten.mpc import MPCTensor

    share = x._tensor.share.unsqueeze(0).expand(k, *x.shape).contiguous()
    out = MPCTensor.from_shares(share, precision=0)
    out.encoder = x.encoder
    return out


def _poly(coeffs: Sequence[float], powers: Sequence[Tensor]) -> Tensor:
    """c0 + c1·u + ... from [u, u², ...] (public scalings only: no round)."""
    return sum((c * p for c, p in zip(coeffs[1:], powers, strict=True)), coeffs[0])


def _scaled_unit_power(num: Tensor, x: Tensor, power: float, lo: int, hi: int,
                       degree: int, rectify: bool = False,
                       plan: ProtocolPlan | None = None) -> Tensor:
    """num · x**power for positive x in [2**lo, 2**hi] (power -1 or -1/2).

    x = 2**e·t: the range comparison gives u = t - 1.5 and the bits that select the
    public 2**(e·power); t**power is a polynomial in u whose powers come in
    ceil(log2 degree) rounds, the first shared with num·2**(e·power); one last product.
    Rounds: 5 + ceil(log2 degree) + 1 (1 + ... with FSS).  2**(e·power) is applied as an
    exact power of two times a factor in [1, 2) (√2 for odd e when power = -1/2), the
    factor in the second round: a lone fixed-point 2**-10.5 would carry a 0.5% rounding
    error.  With ``rectify``, relu(num) replaces num, its sign test in the range
    comparison.
    """
    u, bits, exps, rectified = _unit_range(x, lo, hi, num if rectify else None, plan)
    if rectify:
        num = rectified
    whole = {k: math.floor(k * power) for k in exps}
    s = _select(bits, exps, lambda k: 2.0 ** whole[k])
    pending = []
    if any(k * power != whole[k] for k in exps):
        f = _select(bits, exps, lambda k: 2.0 ** (k * power - whole[k]))
        pending = [f]
    u2, ns = fused.mul_many([(u, None, "mul"), (num, s, "mul")])
    pw = [u, u2]  # pw[i] = u**(i + 1)
    while len(pw) < degree or pending:
        top = len(pw)
        need = [i for i in range(1, top + 1) if top + i <= degree]
        items = [(pw[i - 1], pw[top - 1], "mul") if i != top else (pw[top - 1], None, "mul")
                 for i in need]
        res = fused.mul_many(items + [(ns, f, "mul") for f in pending])
        if pending:
            ns, res, pending = res[-1], res[:-1], []
        pw += res
    return ns * _poly(_unit_poly(power, degree), pw[:degree])


def divide(num: Tensor, den: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
           degree: int = 6, protocol: ProtocolPlan | None = None) -> Tensor:
    """num / den for positive den in [2**lo, 2**hi] (broadcast over num).

    Under MPC (9 rounds): den = 2**e·t, t in [1, 2), then (num·2**-e)·p(t - 1.5) with p
    of degree 6 (relative error 1e-5 over the whole range).  CrypTen's own reciprocal
    needs ~10 Newton steps plus an exp and still fails outside ~[0.01, 100].  The
    ``spline`` variant splits each octave into ``RECIP_SUB`` pieces with a quadratic each
    (relative error 2.1e-5), as :func:`div_sqrt` does: 3 rounds with FSS comparisons.
    """
    plan = resolve(protocol)
    if plan.reciprocal == "spline":
        return _pieces_power(num, den, lo, hi, RECIP_SUB, -1.0, plan=plan)
    return _scaled_unit_power(num, den, -1.0, lo, hi, degree, plan=plan)


def reciprocal(x: Tensor, lo: int = RECIP_RANGE[0], hi: int = RECIP_RANGE[1],
               protocol: ProtocolPlan | None = None) -> Tensor:
    """1/x for x in [2**lo, 2**hi]; prefer :func:`divide` (no extra product)."""
    return divide(x * 0 + 1, x, lo, hi, protocol=protocol)


def div_sqrt(num: Tensor, x: Tensor, lo: int = INV_SQRT_RANGE[0],
             hi: int = INV_SQRT_RANGE[1], sub: int = INV_SQRT_SUB,
             rectify: bool = False, protocol: ProtocolPlan | None = None) -> Tensor:
    """num / sqrt(x) for positive x in [2**lo, 2**hi]; relu(num) / sqrt(x) with
    ``rectify``, whose sign test rides in the range comparison below (no extra round).

    Under MPC, for few values x (``PIECES_MAX_EXTRA``) or with the ``spline`` variant,
    7 rounds (3 with FSS): one comparison against every 2**(k/sub) splits x into 2**E·t
    with E even and t in one of 2·sub pieces of [1, 4); t**-1/2 is a quadratic on each
    piece (relative error 5.3e-5 for sub = 4), whose square term comes in the round that
    also forms num·2**(-E/2).  Otherwise 8 rounds (4 with FSS): x = 2**e·t with t in
    [1, 2) from one comparison per octave, and a degree-4 polynomial in t (relative error
    8.6e-5), whose powers take a round more.  CrypTen's inv_sqrt is off by up to ~79%
    below 0.01 and above ~200.
    """
    plan = resolve(protocol)
    if plan.rsqrt == "spline" or x.numel() * (sub - 1) * (hi - lo) <= PIECES_MAX_EXTRA:
        return _pieces_power(num, x, lo, hi, sub, -0.5, rectify, plan)
    return _scaled_unit_power(num, x, -0.5, lo, hi, degree=4, rectify=rectify, plan=plan)


@cache
def _pieces_plan(lo: int, hi: int, sub: int, power: float = -0.5
                 ) -> dict[str, torch.Tensor | int]:
    """The public constants of :func:`_pieces_power` for x in [2**lo, 2**hi], as integer
    tensors over the n = (hi - lo)·sub pieces j of x's range.

    x is scaled by 2**-E into [1, 2**span) with span = 2 for power -1/2 (E even, so that
    2**(E·power) is an exact power of two; lo and hi even) and 1 for power -1.  Piece j
    lies in the span of octaves starting at E_j = lo + span·floor(j / (span·sub)) and is
    piece m_j = j mod (span·sub) of [1, 2**span) after scaling by 2**-E_j."""
    from crypten.encoder import FixedPointEncoder

    span = 2 if power == -0.5 else 1
    scale = FixedPointEncoder().scale
    n = (hi - lo) * sub
    per = span * sub
    exps = [lo + span * (j // per) for j in range(n)]
    piece = [j % per for j in range(n)]
    top = exps[-1]
    coeffs = splines.power_pieces(power, sub, span)
    return {
        "n": n,
        "top": top,
        "thresholds": torch.tensor([2.0 ** (lo + k / sub) for k in range(1, n)]),
        # s = 2**(E·power): exact fixed-point encodings (|E·power| <= 16).
        "s": torch.tensor([round(2.0 ** (e * power) * scale) for e in exps]),
        # select[m, j] = [m_j = m]; ups[m, j] = [m_j = m]·2**(top - E_j) (exact integers)
        "select": torch.tensor([[int(piece[j] == m) for j in range(n)] for m in range(per)]),
        "ups": torch.tensor([[2 ** (top - exps[j]) if piece[j] == m else 0 for j in range(n)]
                             for m in range(per)]),
        # per piece m, at the fixed-point scale of w_m and the double scale of h_m:
        # lin = b_m·w_m + (a_m - b_m·c_m)·h_m and v = g_m·w_m - g_m·c_m·h_m
        "lin_w": torch.tensor([round(b * scale) for c, a, b, g in coeffs]),
        "lin_h": torch.tensor([round((a - b * c) * scale * scale) for c, a, b, g in coeffs]),
        "v_w": torch.tensor([round(g * scale) for c, a, b, g in coeffs]),
        "v_h": torch.tensor([-round(g * c * scale * scale) for c, a, b, g in coeffs]),
    }


def _combine(weights: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """sum_j weights[..., j]·shares[j] for integer ``weights`` (exact in the ring)."""
    w = weights.reshape(*weights.shape, *([1] * (shares.dim() - 1)))
    return (w * shares.unsqueeze(0) if weights.dim() == 2 else w * shares).sum(-shares.dim())


def _onehot(below: Tensor, below_x: Tensor, x: Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot piece indicators o_j = ge_j - ge_(j+1) (ge_k = [x >= threshold k], with
    ge_0 = 1 and ge_n = 0) and the o_j·x, from the range test's raw shares: (n, *shape)
    integer-scale shares and x-scale shares."""
    one = x._tensor.share.new_full((1, *x.shape), int(fused.rank() == 0))
    zero = torch.zeros_like(one)
    ge = torch.cat([one, one - below._tensor.share, zero])
    xsh = x._tensor.share.unsqueeze(0)
    ge_x = torch.cat([xsh, xsh - below_x._tensor.share, zero])
    return ge[:-1] - ge[1:], ge_x[:-1] - ge_x[1:]


def _fixed(share: torch.Tensor, divisor: int = 1) -> Tensor:
    """A fixed-point MPCTensor of raw ``share`` (truncated by ``divisor``)."""
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc import MPCTensor

    t = MPCTensor.from_shares(share, precision=0)
    t.encoder = FixedPointEncoder()
    return t.div(divisor) if divisor > 1 else t


def _pieces_power(num: Tensor, x: Tensor, lo: int, hi: int, sub: int, power: float,
                  rectify: bool = False, plan: ProtocolPlan | None = None) -> Tensor:
    """num · x**power (power -1/2 or -1) for positive x in [2**lo, 2**hi] by pieces of
    octaves; see :func:`div_sqrt`.  Rounds: comparison (4 + 1 with the products
    [x >= 2**(k/sub)]·x; 1 with FSS), then {num·s, v²}, then the product."""
    from crypten.encoder import FixedPointEncoder

    plan = resolve(plan)
    if power == -0.5:  # even bounds, so every double octave [2**E, 2**(E+2)) starts at an even E
        lo, hi = lo - lo % 2, hi + hi % 2
    pp = _pieces_plan(lo, hi, sub, power)
    top = pp["top"]
    below, below_x, rectified = threshold_products(
        x, pp["thresholds"].tolist(), plan, range_bits(hi, x.encoder.scale),
        rectify=num if rectify else None)
    if rectify:
        num = rectified
    onehot, onehot_x = _onehot(below, below_x, x)
    s_share = _combine(pp["s"], onehot)
    # Per piece m of [1, 2**span): h_m = [t in m] and w_m = h_m·t, the powers of two
    # 2**-E_j applied as exact integers 2**(top - E_j) and one division.
    h = _combine(pp["select"], onehot)
    w = _like(_combine(pp["ups"], onehot_x), x).div(2**top)._tensor.share
    # lin and v at the double scale, truncated once each.
    lin_share = _combine(pp["lin_w"], w) + _combine(pp["lin_h"], h)
    v_share = _combine(pp["v_w"], w) + _combine(pp["v_h"], h)
    scale = FixedPointEncoder().scale
    lin, v, s = _fixed(lin_share, scale), _fixed(v_share, scale), _fixed(s_share)
    ns, v2 = fused.mul_many([(num, s, "mul"), (v, None, "mul")])
    return ns * (lin + v2)


def inv_sqrt(x: Tensor, lo: int = INV_SQRT_RANGE[0], hi: int = INV_SQRT_RANGE[1],
             protocol: ProtocolPlan | None = None) -> Tensor:
    """1/sqrt(x) for x in [2**lo, 2**hi]; prefer :func:`div_sqrt`."""
    return div_sqrt(x * 0 + 1, x, lo, hi, protocol=protocol)


def row_max(a: Tensor, protocol: ProtocolPlan | None = None) -> Tensor:
    """max over the last dim, keepdim, by a pairwise tournament: ceil(log2 N) levels of
    one batched comparison (its product in the comparison's last round; with FSS one
    round per level) each."""
    while a.shape[-1] > 1:
        n = a.shape[-1]
        h = n // 2
        x, y = a[..., :h], a[..., h : 2 * h]
        m = y + relu(x - y, protocol)
        a = m if n % 2 == 0 else import_crypten().cat([m, a[..., 2 * h :]], dim=-1)
    return a


def spline(x: Tensor, sp: splines.Spline, protocol: ProtocolPlan | None = None) -> Tensor:
    """A piecewise quadratic (``splines.Spline``) of x: one comparison of every element
    against every breakpoint (1 round with FSS, 5 with the carry tree), the linear part
    local, the square parts from one or two secure squares in one more round."""
    from crypten.encoder import FixedPointEncoder

    plan = resolve(protocol)
    scale = FixedPointEncoder().scale
    if _fss(plan):
        window = (plan.fss_bits - fss.SPLINE_SHIFT, fss.SPLINE_SHIFT)
    else:
        window = (64, 0)
    below, below_x, _ = threshold_products(x, sp.breaks, plan, *window)
    onehot, onehot_x = _onehot(below, below_x, x)

    def table(values: Sequence[float], factor: float) -> torch.Tensor:
        return torch.tensor([round(v * factor) for v in values])

    a, b, c, q = (list(col) for col in zip(*sp.pieces, strict=True))
    # lin_j = (a_j - b_j c_j) + b_j x ; v_j = g_j (x - c_j), g_j = sqrt|q_j|; double scale
    lin = _fixed(_combine(table(b, scale), onehot_x)
                 + _combine(table([ai - bi * ci for ai, bi, ci in zip(a, b, c, strict=True)],
                                  scale * scale), onehot), scale)
    squares = []
    for sign in (1, -1):
        g = [math.sqrt(abs(qi)) if qi * sign > 0 else 0.0 for qi in q]
        if any(g):
            v_share = (_combine(table(g, scale), onehot_x)
                       - _combine(table([gi * ci for gi, ci in zip(g, c, strict=True)],
                                        scale * scale), onehot))
            squares.append((sign, _fixed(v_share, scale)))
    out = lin
    for sign, sq in zip((s for s, _ in squares),
                        fused.mul_many([(v, None, "mul") for _, v in squares]), strict=True):
        out = out + sq if sign > 0 else out - sq
    return out


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
    return torch.relu(x) - torch.where(t < cutoff, p, torch.zeros_like(p))


def gelu(x: Tensor, cutoff: float = GELU_CUTOFF, degree: int = GELU_DEGREE,
         protocol: ProtocolPlan | None = None) -> Tensor:
    """GeLU(x) = relu(x) - [|x| < cutoff]·p(|x|).

    Rounds (9): x² (1); one batched comparison for [x < 0] and [x² < cutoff²] (5),
    whose last round also gives r = [x >= 0]·x, hence relu and |x| = 2r - x; the
    remaining powers of |x| (2, x² is reused); the mask (1).  Bits stay at CrypTen's
    integer scale, so bit products are exact: outside the mask the high powers may wrap
    the ring, and the exact 0 cancels them.  Two comparisons per element (the comparison
    is the expensive part: ~350 bytes each), where a three-threshold test would need
    three.

    With FSS comparisons (4 rounds): one key per element evaluated at -cutoff, 0 and
    cutoff gives relu(x) and iu = [|x| < cutoff]·|x|·2/cutoff locally; the tail is a
    polynomial in iu (the indicator is 0 or 1, so iu**k = [|x| < cutoff]·u**k: no mask
    product, and no power exceeds 2**degree).  The ``spline`` variant: 9 quadratic pieces
    on [-4, 4] (``splines.gelu_spline``, max error 4.3e-4 + rounding), 2 rounds with FSS.
    """
    plan = resolve(protocol)
    if plan.gelu == "spline":
        return spline(x, splines.gelu_spline(), plan)
    if _fss(plan):
        return _gelu_fss(x, cutoff, degree, plan)
    crypten = import_crypten()
    coeffs = gelu_tail_coeffs(cutoff, degree)
    x2 = x.square()
    cmp = crypten.stack([x, x2 - cutoff * cutoff])
    bits, (neg_x,), _ = ltz_products(cmp, [(x, 0)])
    inside = bits[1]
    r = x - neg_x  # [x >= 0]·x
    k = 2.0 / cutoff
    u = (2 * r - x) * k
    powers = _powers(u, degree, square=x2 * (k * k))
    p = _poly(coeffs, powers[1:])
    return r - inside * p


def _gelu_fss(x: Tensor, cutoff: float, degree: int, plan: ProtocolPlan) -> Tensor:
    """:func:`gelu` with one FSS key per element (see there): 1 + ceil(log2 degree)
    rounds."""
    below, below_x, _ = threshold_products(x, (-cutoff, 0.0, cutoff), plan, plan.fss_bits)
    ge = (-below._tensor.share).add_(int(fused.rank() == 0))  # [x >= t_k], integer scale
    ge_x = x._tensor.share.unsqueeze(0) - below_x._tensor.share  # [x >= t_k]·x
    r = _like(ge_x[1], x)
    # [|x| < c]·|x| = -x·[-c <= x < 0] + x·[0 <= x < c]
    iu = _like(2 * ge_x[1] - ge_x[0] - ge_x[2], x) * (2.0 / cutoff)
    coeffs = gelu_tail_coeffs(cutoff, degree)
    inside = _fixed((ge[0] - ge[2]) * round(coeffs[0] * x.encoder.scale))  # c0·[|x| < c]
    powers = _powers(iu, degree)
    return r - (inside + _poly((0.0, *coeffs[1:]), powers[1:]))


def _powers(t: Tensor, degree: int, square: Tensor | None = None) -> list[Tensor]:
    """[1, t, t², ..., t^degree] in ceil(log2 degree) multiplication rounds (one fewer
    if t² is given): each round multiplies every known power by the highest one, as
    one stacked product."""
    pw: list[Tensor | None] = [None, t]
    if square is not None and degree >= 2:
        pw.append(square)
    crypten = import_crypten()
    while len(pw) - 1 < degree:
        top = len(pw) - 1
        need = [i for i in range(1, top + 1) if top + i <= degree]
        lhs = crypten.stack([pw[i] for i in need])
        prod = lhs * pw[top].unsqueeze(0)
        pw += [prod[j] for j in range(len(need))]
    return pw  # type: ignore[return-value]


