"""Several secure products in one communication round.

CrypTen runs every multiplication eagerly and opens its masked operands in a round of
its own, so two products that do not depend on each other still cost two round trips.
On a WAN a round costs RTT/2 whatever its size, so the secure functions of ``ops.py``
gather independent products and open all their masked operands at once:

- :func:`mul_many` is Beaver's protocol (or CrypTen's square protocol) for a list of
  independent ``mul``/``matmul``/square products, with one opening for all of them;
- :func:`bit_products` turns a binary-shared bit ``b`` into an arithmetic bit and
  multiplies it into values ``v`` in the same round: ``b = z ⊕ r`` with ``z`` opened,
  so ``b·v = z·v + (1 − 2z)·(r·v)`` and ``r·v`` is a Beaver product whose masked
  operands travel with ``z``.

The correlated randomness comes from CrypTen's default provider (the dealer or TFP),
with the same tuple types CrypTen's own protocols request, so the offline phase records
and prepares these tuples like any others.  Rounds and bytes are counted by CrypTen's
communicator accounting: one round is one ``all_gather`` of a single flat tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..compat import import_crypten

if TYPE_CHECKING:
    from crypten.mpc.primitives import BinarySharedTensor
    from crypten.mpc.provider.provider import TupleProvider

Tensor = Any  # crypten MPCTensor


def open_round(arith: Sequence[torch.Tensor], binary: Sequence[torch.Tensor] = ()
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Open additive shares (summed) and XOR shares (xored) in one exchange."""
    crypten = import_crypten()
    parts = [t.reshape(-1) for t in (*arith, *binary)]
    if not parts:
        return [], []
    # all_gather returns fresh tensors (its own part cloned), so nothing here copies twice
    flat = torch.cat(parts) if len(parts) > 1 else parts[0]
    gathered = crypten.communicator.get().all_gather(flat)
    n_arith = sum(t.nelement() for t in arith)
    add, xor = gathered[0][:n_arith], gathered[0][n_arith:]
    for other in gathered[1:]:
        add += other[:n_arith]
        xor ^= other[n_arith:]
    out_a, out_b, offset = [], [], 0
    for i, t in enumerate((*arith, *binary)):
        n = t.nelement()
        if i < len(arith):
            out_a.append(add[offset : offset + n].view(t.shape))
        else:
            out_b.append(xor[offset - n_arith : offset - n_arith + n].view(t.shape))
        offset += n
    return out_a, out_b


def rank() -> int:
    return import_crypten().communicator.get().get_rank()


def wrap_product(share: torch.Tensor, x: Tensor, y: Tensor | None) -> Tensor:
    """An MPCTensor for the raw product ``share`` of x and y, rescaled as CrypTen's
    ``mul`` does: divided by the scale when both factors are fixed-point, otherwise
    carrying the encoder of the fixed-point factor."""
    from crypten.mpc import MPCTensor

    out = MPCTensor.from_shares(share, precision=0)
    sx = x.encoder.scale
    sy = sx if y is None else y.encoder.scale
    if sx > 1 and sy > 1:
        out.encoder = x.encoder
        out._tensor.div_(x.encoder.scale)
    else:
        out.encoder = x.encoder if sx > 1 else (x.encoder if y is None else y.encoder)
    return out


def _request(items: Sequence[tuple[Tensor, Tensor | None, str]], provider: TupleProvider,
             opens: list[torch.Tensor]) -> list[tuple]:
    """Fetch a tuple per product and append its masked operands to ``opens``."""
    plans = []
    for x, y, op in items:
        if y is None:
            r, r2 = provider.square(x.size())
            opens.append(x._tensor.share - r.share)
            plans.append(("square", r.share, r2.share))
        else:
            a, b, c = provider.generate_additive_triple(x.size(), y.size(), op)
            opens += [x._tensor.share - a.share, y._tensor.share - b.share]
            plans.append((op, a.share, b.share, c.share))
    return plans


def _finish(items: Sequence[tuple[Tensor, Tensor | None, str]], plans: list[tuple],
            vals: list[torch.Tensor], k: int, rank0: bool) -> list[Tensor]:
    """The products' shares from the opened values ``vals[k:]``."""
    out = []
    for (x, y, _), plan in zip(items, plans, strict=True):
        if plan[0] == "square":
            _, r, r2 = plan
            eps = vals[k]
            k += 1
            z = r2 + 2 * r * eps
            if rank0:
                z = z + eps * eps
        else:
            op, a, b, c = plan
            eps, delta = vals[k], vals[k + 1]
            k += 2
            f = getattr(torch, op)
            z = c + f(eps, b) + f(a, delta)
            if rank0:
                z = z + f(eps, delta)
        out.append(wrap_product(z, x, y))
    return out


def mul_many(items: Sequence[tuple[Tensor, Tensor | None, str]]) -> list[Tensor]:
    """``[op(x, y) for x, y, op in items]`` in one round; ``y=None`` means ``x²``.

    ``op`` is ``"mul"`` (broadcasting like torch) or ``"matmul"``.
    """
    provider = import_crypten().mpc.get_default_provider()
    opens: list[torch.Tensor] = []
    plans = _request(items, provider, opens)
    vals, _ = open_round(opens)
    return _finish(items, plans, vals, 0, rank() == 0)


_BIT_SHIFTS = torch.arange(64)


def _pack_bits(words: torch.Tensor) -> torch.Tensor:
    """Bit 0 of each word, 64 words to one (local and XOR-linear, so shares pack)."""
    pad = (-words.numel()) % 64
    if pad:
        words = torch.cat([words, words.new_zeros(pad)])
    return ((words.reshape(-1, 64) & 1) << _BIT_SHIFTS).sum(1)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.unsqueeze(1) >> _BIT_SHIFTS) & 1).reshape(-1)[:n]


def sum_squares(x: Tensor) -> Tensor:
    """Σ x² over the last dim (keepdim) in one round that opens x once (CrypTen's square
    protocol), where a (1×D)(D×1) matmul opens x twice.  The squares are summed at the
    product's double scale and truncated once, as the matmul would be."""
    return in_one_round([sum_squares_part(x)])[0]


# A product whose masked operands can share a round with others: the tensors to open
# and what turns their opened values into the product.
Part = tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], Tensor]]


def in_one_round(parts: Sequence[Part]) -> list[Tensor]:
    """Open the masked operands of every part in one exchange, then finish each."""
    opens = [t for tensors, _ in parts for t in tensors]
    vals, _ = open_round(opens)
    out, k = [], 0
    for tensors, finish in parts:
        out.append(finish(vals[k : k + len(tensors)]))
        k += len(tensors)
    return out


def sum_squares_part(x: Tensor) -> Part:
    """:func:`sum_squares` as a :data:`Part`."""
    provider = import_crypten().mpc.get_default_provider()
    r, r2 = provider.square(x.size())

    def finish(vals: list[torch.Tensor]) -> Tensor:
        (eps,) = vals
        z = r2.share + 2 * r.share * eps
        if rank() == 0:
            z = z + eps * eps
        return wrap_product(z.sum(-1, keepdim=True), x, None)

    return [x._tensor.share - r.share], finish


def products_part(items: Sequence[tuple[Tensor, Tensor | None, str]]) -> Part:
    """:func:`mul_many` as a :data:`Part` (its result is the list of products)."""
    provider = import_crypten().mpc.get_default_provider()
    opens: list[torch.Tensor] = []
    plans = _request(items, provider, opens)
    return opens, lambda vals: _finish(items, plans, vals, 0, rank() == 0)


def bit_products(sign: BinarySharedTensor, shape: torch.Size, values: Sequence[Tensor],
                 extra: Sequence[tuple[Tensor, Tensor | None, str]] = ()
                 ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Arithmetic bit ``b`` from the binary-shared bit ``sign`` (bit 0 of each word of a
    flat ``BinarySharedTensor`` whose first ``prod(shape)`` entries are used), the
    products ``b·v`` for each ``v`` in ``values`` (each of ``shape``, or a pair
    ``(v, i)`` for ``b[i]·v``), and the products ``extra`` (as :func:`mul_many`): all in
    one round.

    ``b`` has CrypTen's integer scale, exact to multiply with; each ``b·v`` keeps ``v``'s
    encoder.
    """
    from crypten.mpc import MPCTensor

    provider = import_crypten().mpc.get_default_provider()
    n = 1
    for s in shape:
        n *= s
    bits = sign.share[:n]
    r_arith, r_bin = provider.B2A_rng(shape)
    pairs = [v if isinstance(v, tuple) else (v, None) for v in values]
    triples = [provider.generate_additive_triple(v.size(), v.size(), "mul") for v, _ in pairs]
    opens = []
    for (v, i), (a, b, _) in zip(pairs, triples, strict=True):
        r = r_arith.share if i is None else r_arith.share[i]
        opens += [r - a.share, v._tensor.share - b.share]
    plans = _request(extra, provider, opens)
    # z = b ⊕ r is one bit per element: 64 of them travel in one word.
    vals, (z,) = open_round(opens, [_pack_bits(bits ^ r_bin.share.reshape(-1))])
    z = _unpack_bits(z, n).reshape(shape)
    rank0 = rank() == 0
    b_share = r_arith.share * (1 - 2 * z) + (z if rank0 else 0)
    bit = MPCTensor.from_shares(b_share, precision=0)
    prods = []
    for j, ((v, i), (a, b, c)) in enumerate(zip(pairs, triples, strict=True)):
        eps, delta = vals[2 * j], vals[2 * j + 1]
        rv = c.share + eps * b.share + a.share * delta
        if rank0:
            rv = rv + eps * delta
        zi = z if i is None else z[i]
        share = zi * v._tensor.share + (1 - 2 * zi) * rv  # b·v = z·v + (1 - 2z)·(r·v)
        p = MPCTensor.from_shares(share, precision=0)
        p.encoder = v.encoder
        prods.append(p)
    return bit, prods, _finish(extra, plans, vals, 2 * len(values), rank0)
