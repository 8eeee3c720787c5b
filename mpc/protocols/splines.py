"""Piecewise-quadratic approximations for the ``spline`` protocol variants (plain numpy).

A spline here is breakpoints t_1 < ... < t_P and one quadratic per piece,
``f_j(x) = a_j + b_j (x - c_j) + q_j (x - c_j)²`` on ``[t_j, t_(j+1))`` (piece 0 is
``x < t_1``, piece P is ``x >= t_P``).  Under MPC one comparison per element against every
breakpoint gives the one-hot piece indicators and their products with x, so the linear
part is local; the square part comes from ONE secure square of
``v = sum_j [x in j]·g_j·(x - c_j)`` with ``g_j = sqrt(|q_j|)``, since the indicators are
one-hot (no cross terms).  Pieces where q_j < 0 go into a second square, taken in the
same round.  This is Orca's and SIGMA's idea (the interval chosen by DCFs) with the
quadratic term by a square instead of a degree-2 key: a degree-2 payload would leave the
output at scale 2^48, whose local truncation fails far too often.

The breakpoints are literal constants (found once by :func:`fit_breakpoints`, rounded to
1/64): both parties must use identical public constants, which a search run on each
machine could not promise.  The coefficients are least-squares fits on Chebyshev nodes
reaching a little beyond each piece, because the comparisons may place an x up to
2^-8 below a breakpoint into the next piece (``fss.SPLINE_SHIFT``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np

GELU_CUTOFF = 4.0
# fit_breakpoints(gelu, -4, 4, 4.3e-4): 9 pieces, max fit error 4.3e-4 (the outer pieces
# 0 and x are off by at most 1.3e-4)
GELU_BREAKS = (-4.0, -2.734375, -1.421875, -0.921875, -0.453125, 0.46875, 0.9375, 1.4375,
               2.765625, 4.0)
# fit_breakpoints(exp, -9, 0, 2.8e-4): 8 pieces, max fit error 2.8e-4; exp(-9) = 1.2e-4.
# (12 pieces on [-12, 0] reach 9e-5, at 1.5x the comparison work.)
EXP_BREAKS = (-9.0, -5.40625, -3.78125, -2.734375, -1.953125, -1.328125, -0.8125, -0.375)
EXP_TOP = 0.0  # the last piece is fitted on [-0.375, 0] (softmax's x <= 0)
_BEYOND = 1.03  # fit each piece a little beyond its ends (module doc)


@dataclass(frozen=True)
class Spline:
    """Breakpoints and per-piece (a, b, c, q): f_j(x) = a + b (x - c) + q (x - c)²."""

    breaks: tuple[float, ...]
    pieces: tuple[tuple[float, float, float, float], ...]

    def __post_init__(self) -> None:
        if len(self.pieces) != len(self.breaks) + 1:
            raise ValueError("a spline has one piece more than breakpoints")
        if any(b >= a for a, b in zip(self.breaks[1:], self.breaks, strict=False)):
            raise ValueError("breakpoints must increase")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The spline in exact arithmetic (for error studies and tests)."""
        x = np.asarray(x, dtype=np.float64)
        j = np.searchsorted(np.asarray(self.breaks), x, side="right")
        a, b, c, q = (np.asarray([p[i] for p in self.pieces])[j] for i in range(4))
        return a + b * (x - c) + q * (x - c) ** 2


def fit_quadratic(f: Callable[[np.ndarray], np.ndarray], left: float, right: float,
                  beyond: float = _BEYOND) -> tuple[float, float, float, float]:
    """(a, b, c, q) of a least-squares quadratic for f on [left, right] around its centre
    c, on Chebyshev nodes reaching ``beyond`` times the half-width (close to minimax)."""
    c, h = (left + right) / 2, (right - left) / 2
    u = -h * beyond * np.cos(np.linspace(0.0, math.pi, 801))
    a0, a1, a2 = np.linalg.lstsq(np.stack([u**0, u, u**2], 1), f(c + u), rcond=None)[0]
    return float(a0), float(a1), float(c), float(a2)


def piece_error(f: Callable[[np.ndarray], np.ndarray], left: float, right: float) -> float:
    """Max error of :func:`fit_quadratic` on [left, right]."""
    a, b, c, q = fit_quadratic(f, left, right)
    x = np.linspace(left, right, 2001)
    return float(np.abs(a + b * (x - c) + q * (x - c) ** 2 - f(x)).max())


def fit_breakpoints(f: Callable[[np.ndarray], np.ndarray], lo: float, hi: float, tol: float,
                    step: float = 1 / 64) -> list[float]:
    """Greedy breakpoints on [lo, hi] (multiples of ``step`` from lo): each piece as long
    as its quadratic stays within ``tol`` (how the tables above were made)."""
    out, left = [lo], lo
    while left < hi:
        right = min(hi, left + step)
        while right < hi and piece_error(f, left, min(hi, right + step)) <= tol:
            right = min(hi, right + step)
        out.append(right)
        left = right
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


@cache
def gelu_spline() -> Spline:
    """GeLU: 0 below -4, x from 4, quadratics between."""
    b = GELU_BREAKS
    inner = [fit_quadratic(_gelu, b[i], b[i + 1]) for i in range(len(b) - 1)]
    return Spline(b, ((0.0, 0.0, 0.0, 0.0), *inner, (0.0, 1.0, 0.0, 0.0)))


@cache
def exp_spline() -> Spline:
    """exp on x <= 0: 0 below -9, quadratics up to 0 (the last one also serves x > 0)."""
    b = (*EXP_BREAKS, EXP_TOP)
    inner = [fit_quadratic(np.exp, b[i], b[i + 1]) for i in range(len(b) - 1)]
    return Spline(EXP_BREAKS, ((0.0, 0.0, 0.0, 0.0), *inner))


@cache
def power_pieces(power: float, sub: int, span: int) -> tuple[tuple[float, float, float, float],
                                                            ...]:
    """(c, a, b, g) for each of the span·sub pieces [2**(m/sub), 2**((m+1)/sub)) of
    [1, 2**span): t**power ~ a + b·(t - c) + (g·(t - c))², least squares in relative
    error on Chebyshev nodes (close to minimax).  t**power is convex for power < 0, so
    the square coefficient g² is positive and the per-piece quadratics come from ONE
    secure square (the module doc)."""
    out = []
    for m in range(span * sub):
        left, right = 2.0 ** (m / sub), 2.0 ** ((m + 1) / sub)
        c, h = (left + right) / 2, (right - left) / 2
        # A little beyond the piece: fixed-point thresholds are rounded to 2**-16.
        u = -h * 1.002 * np.cos(np.linspace(0.0, math.pi, 2001))
        f = (c + u) ** power
        a = np.stack([u**i for i in range(3)], 1) / f[:, None]
        c0, c1, c2 = np.linalg.lstsq(a, np.ones_like(u), rcond=None)[0]
        if c2 <= 0:
            raise ValueError(f"t**{power} is not convex on piece {m}")
        out.append((c, float(c0), float(c1), math.sqrt(c2)))
    return tuple(out)


def signs(spline: Spline) -> Sequence[int]:
    """+1/-1/0 per piece: the sign of its square term."""
    return tuple(int(np.sign(q)) for _, _, _, q in spline.pieces)
