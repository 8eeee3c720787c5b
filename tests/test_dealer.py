"""Dealer arithmetic and request validation, without a network.

The parties' side (DealerProvider over gRPC) is exercised by tests/test_runtime.py;
here each party's draws are replayed from its seed to check the dealer's products.
"""

from __future__ import annotations

import json

import pytest
import torch
from mpcvit.mpc.compat import import_crypten

import_crypten()
from crypten.common.rng import generate_kbit_random_tensor, generate_random_ring_element  # noqa: E402
from crypten.common.util import count_wraps  # noqa: E402
from mpcvit.mpc.dealer import DealerState  # noqa: E402
from mpcvit.mpc.protocols import carry  # noqa: E402
from mpcvit.proto.generated import dealer_pb2  # noqa: E402


def _parties(state: DealerState, session: str, world: int = 2) -> list[torch.Generator]:
    gens = []
    for rank in range(world):
        g = torch.Generator()
        g.manual_seed(int.from_bytes(state.open(session, rank, world), "little"))
        gens.append(g)
    return gens


def _req(session, kind, size0, size1=(), op="", seq=0, **kwargs):
    return dealer_pb2.CorrectionRequest(
        session=session, kind=kind, size0=list(size0), size1=list(size1), op=op,
        op_kwargs_json=json.dumps(kwargs), seq=seq,
    )


@pytest.mark.parametrize("world", [2, 3])
def test_additive_triples_multiply(world):
    state = DealerState()
    gens = _parties(state, "s", world)
    for seq, (op, s0, s1, kw) in enumerate([
        ("mul", (3, 4), (3, 4), {}),
        ("matmul", (2, 5), (5, 3), {}),
        ("conv2d", (1, 2, 6, 6), (4, 2, 3, 3), {"padding": 1, "stride": 2}),
    ]):
        a = [generate_random_ring_element(s0, generator=g) for g in gens]
        b = [generate_random_ring_element(s1, generator=g) for g in gens]
        c0 = state.correction(_req("s", "additive", s0, s1, op, seq, **kw))
        c = [c0] + [generate_random_ring_element(c0.shape, generator=g) for g in gens[1:]]
        want = getattr(torch, op)(sum(a), sum(b), **kw)
        assert torch.equal(sum(c), want), op


def test_square_wraps_binary_and_b2a():
    state = DealerState()
    g0, g1 = _parties(state, "s")
    size = (4, 3)
    r = [generate_random_ring_element(size, generator=g) for g in (g0, g1)]
    r2 = [state.correction(_req("s", "square", size, seq=0)),
          generate_random_ring_element(size, generator=g1)]
    assert torch.equal(r2[0] + r2[1], (r[0] + r[1]) ** 2)

    w = [generate_random_ring_element(size, generator=g) for g in (g0, g1)]
    theta = [state.correction(_req("s", "wraps", size, seq=1)),
             generate_random_ring_element(size, generator=g1)]
    assert torch.equal(theta[0] + theta[1], count_wraps(w))

    a = [generate_kbit_random_tensor(size, generator=g) for g in (g0, g1)]
    b = [generate_kbit_random_tensor(size, generator=g) for g in (g0, g1)]
    c = [state.correction(_req("s", "binary", size, size, seq=2)),
         generate_kbit_random_tensor(size, generator=g1)]
    assert torch.equal(c[0] ^ c[1], (a[0] ^ a[1]) & (b[0] ^ b[1]))

    bits = [generate_kbit_random_tensor(size, bitlength=1, generator=g) for g in (g0, g1)]
    arith = [state.correction(_req("s", "b2a", size, seq=3)),
             generate_random_ring_element(size, generator=g1)]
    assert torch.equal(arith[0] + arith[1], bits[0] ^ bits[1])
    assert set((bits[0] ^ bits[1]).unique().tolist()) <= {0, 1}


def test_seed_is_handed_out_once_per_rank():
    state = DealerState()
    state.open("s", 0, 2)
    with pytest.raises(PermissionError):
        state.open("s", 0, 2)


def test_bad_requests_are_refused():
    state = DealerState()
    _parties(state, "s")
    with pytest.raises(KeyError):
        state.correction(_req("nope", "square", (2,)))
    with pytest.raises(ValueError, match="unknown correction kind"):
        state.correction(_req("s", "bogus", (2,)))
    with pytest.raises(ValueError, match="not allowed"):
        state.correction(_req("s", "additive", (2,), (2,), op="__import__"))
    with pytest.raises(ValueError, match="out of order"):
        state.correction(_req("s", "square", (2,), seq=5))
    with pytest.raises(ValueError, match="size out of range"):
        state.correction(_req("s", "square", (1 << 20, 1 << 20)))
    with pytest.raises(ValueError, match="world size"):
        state.open("t", 0, 1)


def test_sessions_are_bounded_and_closed():
    state = DealerState(max_sessions=1)
    _parties(state, "a")
    with pytest.raises(OverflowError):
        state.open("b", 0, 2)
    state.close("a", 0)
    state.close("a", 1)
    state.open("b", 0, 2)  # room again


def test_weight_masks_serve_products_with_the_kept_mask():
    state = DealerState()
    g0, g1 = _parties(state, "load")
    size = (5, 3)
    b = [generate_random_ring_element(size, generator=g) for g in (g0, g1)]
    assert state.weight_masks == 0
    handle = state.correction(_req("load", "mask", size, seq=0))
    assert state.weight_masks == 1  # the metrics gauge counts what the store keeps
    key = "".join(f"{int(v) & (2**64 - 1):016x}" for v in handle)
    state.close("load", 0)
    state.close("load", 1)
    # A later session (fresh seeds) multiplies by the same b.
    h0, h1 = _parties(state, "infer")
    x_size = (2, 4, 5)
    a = [generate_random_ring_element(x_size, generator=g) for g in (h0, h1)]
    c0 = state.correction(_req("infer", "masked_matmul", x_size, size, "matmul", 0, mask=key))
    c1 = generate_random_ring_element(c0.shape, generator=h1)
    assert torch.equal(c0 + c1, torch.matmul(a[0] + a[1], b[0] + b[1]))
    with pytest.raises(KeyError, match="unknown weight mask"):
        state.correction(_req("infer", "masked_matmul", x_size, size, "matmul", 1, mask="00"))
    with pytest.raises(ValueError, match="masked matmul"):
        state.correction(_req("infer", "masked_matmul", (2, 4), size, "matmul", 1, mask=key))
    with pytest.raises(ValueError, match="matrix"):
        state.correction(_req("infer", "mask", (2, 3, 4), seq=1))


@pytest.mark.parametrize("final", [False, True])
def test_carry_levels_get_every_mask_product(final):
    state = DealerState()
    g0, g1 = _parties(state, "s")
    size = (8,)
    masks = [(generate_kbit_random_tensor(size, generator=g),
              generate_kbit_random_tensor(size, generator=g)) for g in (g0, g1)]
    rho0 = state.correction(_req("s", "carry", size, seq=0, shift=4, final=final))
    monos = carry.carry_monomials(final)
    rho1 = generate_kbit_random_tensor((len(monos), 2), generator=g1)  # packed 4 to 1
    r_g, r_p = masks[0][0] ^ masks[1][0], masks[0][1] ^ masks[1][1]
    rho = rho0 ^ rho1
    for i, mono in enumerate(monos):
        want = None
        for name in mono:
            w = carry.shifted(r_g, r_p, name, 4)
            want = w if want is None else want & w
        # exact on every output bit (the packing itself: the test below)
        assert torch.equal(rho[i], carry.pack_live(want, 4)), mono
    assert len(monos) == (15 if final else 22)
    with pytest.raises(ValueError, match="shift"):
        state.correction(_req("s", "carry", size, seq=1, shift=70, final=final))


def test_private_and_shares_the_product_of_the_parties_masks():
    state = DealerState()
    g0, g1 = _parties(state, "s")
    size = (6,)
    u = generate_kbit_random_tensor(size, generator=g0)
    v = generate_kbit_random_tensor(size, generator=g1)
    w0 = state.correction(_req("s", "private_and", size, seq=0))
    w1 = generate_kbit_random_tensor(size, generator=g1)
    assert torch.equal(w0 ^ w1, u & v)
    state3 = DealerState()
    _parties(state3, "t", world=3)
    with pytest.raises(ValueError, match="two-party"):
        state3.correction(_req("t", "private_and", size, seq=0))


@pytest.mark.parametrize("shift", [1, 4, 16])
def test_carry_products_pack_to_their_output_bits(shift):
    g = torch.Generator().manual_seed(shift)
    words = generate_kbit_random_tensor((3, 8), generator=g)
    packed = carry.pack_live(words, shift)
    assert packed.shape == (3, 2)
    live = carry.live_mask(shift) % (1 << 64)
    assert bin(live).count("1") == 16
    # Only the level's output bits survive: bit i of word k·2 + w (block k) lands at
    # bit i − k·shift of packed word w, and the four blocks never overlap.
    for row in range(3):
        for w in range(2):
            want = 0
            for k in range(4):
                v = int(words[row, k * 2 + w]) % (1 << 64)
                for i in range(64):
                    if (live >> i) & (v >> i) & 1:
                        want |= 1 << (i - k * shift)
            assert int(packed[row, w]) % (1 << 64) == want


@pytest.mark.parametrize("op, s0, s1", [
    ("mul", (2, 1, 3), (4, 3)), ("mul", (), (3,)), ("mul", (5, 1), (1, 6)),
    ("matmul", (3,), (3,)), ("matmul", (2, 3), (3,)), ("matmul", (3,), (3, 4)),
    ("matmul", (5, 2, 3), (3, 4)), ("matmul", (1, 3, 4), (7, 1, 4, 2)),
    ("matmul", (65, 64), (64, 128)),
])
def test_result_size_worked_out_without_meta_tensors_matches_torch(op, s0, s1) -> None:
    """Party 1 sizes its share of c = op(a, b) without computing it; the direct rules for
    mul and matmul (no meta tensors, whose first use costs seconds) agree with torch."""
    from mpcvit.mpc.protocols.tuples import op_result_size

    want = getattr(torch, op)(torch.zeros(s0), torch.zeros(s1)).shape
    assert op_result_size(op, s0, s1, {}) == want
