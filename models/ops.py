"""Backend-neutral operations: every function takes either torch tensors or CrypTen
``MPCTensor``s and dispatches on the input type.

The model (``vit.py``) is written once against these functions plus the tensor methods
both backends share (``matmul``, ``+``, ``*``, ``sum``, ``mean``, ``reshape``,
``transpose``, ``permute``, slicing).  The plaintext halves here are the exact
definitions; the secure halves are the MPC protocols of
:mod:`mpcvit.mpc.protocols.functions`, approximations chosen for few communication
rounds and checked against these definitions on realistic ranges (see docs/gelu.md).

Every function with more than one secure protocol takes ``protocol``, a
:class:`~mpcvit.mpc.protocols.plan.ProtocolPlan` naming the variant per building block
(None: the default plan).  The plaintext halves ignore it.  The model modules carry their
plan as an attribute (``vit.py``) and pass it here explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.protocols import functions as secure
from mpcvit.mpc.protocols.plan import ProtocolPlan

Plan = ProtocolPlan | None

Tensor = Any  # torch.Tensor or crypten MPCTensor

# Denominator guard of ReLU-softmax and 2Quad: relu(a) / (sum relu(a) + eps).
# The reference MPCViT uses 1e-5, which is below one fixed-point ulp (2**-16 ~ 1.5e-5):
# an all-negative row would then divide by exactly 0.  2**-8 keeps 1/denominator <= 256,
# inside the range the secure reciprocal is accurate on, and changes the output by
# < 0.4% whenever the row sum is >= 1.
ATTN_EPS = 2.0**-8
QUAD2_C = 5.0
# A LayerNorm fuses with the next linear layer only below this many extra opened
# elements (see ``mpcvit.mpc.protocols.functions.FUSE_MAX_EXTRA``).
FUSE_MAX_EXTRA = secure.FUSE_MAX_EXTRA


def is_plain(x: Tensor) -> bool:
    return isinstance(x, torch.Tensor)


# --------------------------------------------------------------------------- structure


def cat(xs: Sequence[Tensor], dim: int = 0) -> Tensor:
    if all(is_plain(x) for x in xs):
        return torch.cat(list(xs), dim=dim)
    return import_crypten().cat(list(xs), dim=dim)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weightᵀ + bias with torch's (out, in) weight layout."""
    if is_plain(x) and is_plain(weight):
        return F.linear(x, weight, bias)
    y = secure.linear(x, weight)
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


def gelu(x: Tensor, protocol: Plan = None) -> Tensor:
    return F.gelu(x) if is_plain(x) else secure.gelu(x, protocol=protocol)


def relu(x: Tensor, protocol: Plan = None) -> Tensor:
    """ReLU; under MPC one comparison with the product in its last round (5 rounds; 1
    with FSS comparisons)."""
    return F.relu(x) if is_plain(x) else secure.relu(x, protocol)


def quad(x: Tensor, protocol: Plan = None) -> Tensor:
    """MPCFormer's GeLU stand-in 0.125x² + 0.25x + 0.5 (one multiplication)."""
    return x * (0.125 * x + 0.25) + 0.5


def identity(x: Tensor, protocol: Plan = None) -> Tensor:
    return x


def ltz(x: Tensor, protocol: Plan = None) -> Tensor:
    """[x < 0]; under MPC as CrypTen's integer-scale arithmetic bits (5 rounds; 1 with
    FSS comparisons)."""
    return (x < 0).long() if is_plain(x) else secure.ltz(x, protocol)


# --------------------------------------------------------------------------- layer norm


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
               protocol: Plan = None) -> Tensor:
    if is_plain(x):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    y = secure.layer_norm(x, eps, protocol)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def norm_linear(x: Tensor, eps: float, weight: Tensor, bias: Tensor | None = None,
                rectify: bool = False, protocol: Plan = None) -> Tensor:
    """linear(layer_norm(x)) for a LayerNorm without affine part (folded away); with
    ``rectify``, relu of it (the layer must then have no bias).  Under MPC the norm's
    first round carries the layer's product and the ReLU's sign test rides in the norm's
    range comparison (``secure.norm_linear``)."""
    if rectify and bias is not None:
        raise ValueError("rectify needs a linear layer without bias")
    if is_plain(x):
        y = linear(F.layer_norm(x, x.shape[-1:], None, None, eps), weight, bias)
        return F.relu(y) if rectify else y
    return secure.norm_linear(x, eps, weight, bias, rectify, protocol)


# --------------------------------------------------------------------------- attention maps
# Each takes scores a (..., N_query, N_key) and returns the attention matrix.


def softmax(a: Tensor, eps: float = ATTN_EPS, protocol: Plan = None) -> Tensor:
    """Standard softmax (``eps`` unused; uniform signature with the other kinds)."""
    return a.softmax(-1) if is_plain(a) else secure.softmax(a, protocol)


def relu_softmax(a: Tensor, eps: float = ATTN_EPS, protocol: Plan = None) -> Tensor:
    r = relu(a, protocol)
    s = r.sum(-1, keepdim=True) + eps
    return divide(r, s, lo=secure.eps_range_lo(eps), protocol=protocol)


def quad2(a: Tensor, c: float = QUAD2_C, eps: float = ATTN_EPS, protocol: Plan = None
          ) -> Tensor:
    """MPCFormer's 2Quad: (a + c)² / sum (a + c)²."""
    r = (a + c) * (a + c) if not is_plain(a) else (a + c).square()
    s = r.sum(-1, keepdim=True) + eps
    return divide(r, s, protocol=protocol)


# --------------------------------------------------------------------------- arithmetic


def divide(num: Tensor, den: Tensor, lo: int = secure.RECIP_RANGE[0],
           hi: int = secure.RECIP_RANGE[1], protocol: Plan = None) -> Tensor:
    """num / den; under MPC for positive den in [2**lo, 2**hi] (9 rounds by default)."""
    if is_plain(num) and is_plain(den):
        return num / den
    return secure.divide(num, den, lo, hi, protocol=protocol)


def div_sqrt(num: Tensor, x: Tensor, lo: int = secure.INV_SQRT_RANGE[0],
             hi: int = secure.INV_SQRT_RANGE[1], sub: int = secure.INV_SQRT_SUB,
             rectify: bool = False, protocol: Plan = None) -> Tensor:
    """num / sqrt(x) (relu(num) / sqrt(x) with ``rectify``); under MPC for positive x in
    [2**lo, 2**hi] (7 or 8 rounds by default)."""
    if is_plain(num) and is_plain(x):
        return (F.relu(num) if rectify else num) * x.rsqrt()
    return secure.div_sqrt(num, x, lo, hi, sub, rectify, protocol)


def row_max(a: Tensor, protocol: Plan = None) -> Tensor:
    """max over the last dim, keepdim; under MPC a pairwise tournament."""
    return a.amax(-1, keepdim=True) if is_plain(a) else secure.row_max(a, protocol)


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
    "relu_nobias": relu,  # the function; the missing biases are the model's (vit.Mlp)
}
