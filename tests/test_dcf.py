"""Function secret sharing (mpc/protocols/dcf.py): both parties simulated, shares added.

Every check compares the sum of the two parties' shares with the plaintext function, mod
2^64.  Comparison gates are checked on edge values with masks chosen so that ``x + r`` wraps
the ring (and the low 63 bits) and so that it does not: the bug class of a comparison that
ignores the wrap-around (seen in a PyPI FSS library).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from mpcvit.mpc.protocols import dcf as fss

U64 = np.uint64
TOP = 1 << 63


def _uniform(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 1 << 64, size=shape, dtype=U64)


def _bits(rng: np.random.Generator, shape, n: int) -> np.ndarray:
    return _uniform(rng, shape) >> U64(64 - n)


def _ring(values) -> np.ndarray:
    """Signed Python/numpy integers as ring words."""
    return np.asarray(values, dtype=np.int64).view(U64)


def _signed(words: np.ndarray) -> np.ndarray:
    return words.view(np.int64)


def _msb(k0, k1, y):
    return fss.msb_eval(0, k0, y) + fss.msb_eval(1, k1, y)


def _relu(k0, k1, y):
    return _signed(fss.relu_eval(0, k0, y) + fss.relu_eval(1, k1, y))


# --------------------------------------------------------------------------- PRG


def test_prg_is_fixed_key_aes_in_mmo_mode():
    prg = fss.AesPrg(b"test-label")
    x = _uniform(np.random.default_rng(0), (37, 2))
    got = prg.seed_into(x, fss._Blocks(37)).copy()
    key = hashlib.sha256(b"test-label/seed").digest()[:16]
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    want = np.frombuffer(enc.update(x.tobytes()), dtype=U64).reshape(37, 2) ^ x
    assert np.array_equal(got, want)
    other = fss.AesPrg(b"other-label").seed_into(x, fss._Blocks(37))
    assert not np.array_equal(got, other)


# --------------------------------------------------------------------------- DCF


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 8, 31, 32, 63, 64])
def test_dcf_matches_plain_comparison(n, k):
    rng = np.random.default_rng(100 * n + k)
    count, top = 3000, U64((1 << n) - 1)
    alpha = _bits(rng, count, n)
    alpha[:3] = [0, 1 & int(top), top]
    beta = _uniform(rng, (count, k))
    k0, k1 = fss.dcf_keygen(alpha, beta, n, rng)
    z = _bits(rng, (count, 6), n)
    z[:, 0] = alpha
    z[:, 1] = (alpha - U64(1)) & top
    z[:, 2] = (alpha + U64(1)) & top
    z[:, 3] = 0
    z[:, 4] = top
    share0 = fss.dcf_eval(k0, z)
    got = share0 + fss.dcf_eval(k1, z)
    want = np.where((z < alpha[:, None])[..., None], beta[:, None, :], U64(0))
    assert got.shape == (count, 6, k)
    assert np.array_equal(got, want)
    if n >= 8:  # a single share says nothing by itself
        assert np.mean(share0 == want) < 0.01
    single = fss.dcf_eval(k0, z[:, 5]) + fss.dcf_eval(k1, z[:, 5])
    assert np.array_equal(single, want[:, 5])


def _reference_eval(key, z: np.ndarray) -> np.ndarray:
    """One point per element, level by level, written from the construction (the module
    doc) with no shortcuts: shares (N, k)."""
    prg = fss.AesPrg()
    n, k, count = key.n, key.k, key.count
    s, t = key.seed.copy(), np.full(count, key.party, U64)
    acc = np.zeros((count, k), U64)

    def payload(x: np.ndarray, cw: np.ndarray) -> None:
        for e in range(k):
            block = prg.value_into(e // 2, x, fss._Blocks(count)).copy()
            acc[:, e] += block[:, e % 2] + cw[e] * t

    for i in range(n):
        child = (z >> U64(n - 1 - i)) & U64(1)
        x = s.copy()
        x[:, 0] |= child
        payload(x, key.vcw[i])
        raw = prg.seed_into(x, fss._Blocks(count)).copy()
        t_raw = raw[:, 0] & U64(1)
        raw[:, 0] ^= t_raw
        s = raw ^ (key.scw[i].T * t[:, None])
        t = t_raw ^ (((key.tcw[i].astype(U64) >> child) & U64(1)) * t)
    payload(s, key.fcw)
    return U64(0) - acc if key.party else acc


@pytest.mark.parametrize("n", [1, 2, 5, 23, 31, 64])
def test_dcf_shares_match_a_plain_level_by_level_walk(n):
    rng = np.random.default_rng(40 + n)
    count, k = 500, 3
    keys = fss.dcf_keygen(_bits(rng, count, n), _uniform(rng, (count, k)), n, rng)
    z = _bits(rng, count, n)
    for key in keys:
        assert np.array_equal(fss.dcf_eval(key, z), _reference_eval(key, z))


def _clustered_points(rng: np.random.Generator, count: int, n: int, offsets) -> np.ndarray:
    """(count, m) points y - o for public offsets o, as the spline thresholds give them:
    close together, so that an element's points share their leading bits."""
    top = U64((1 << n) - 1) if n < 64 else U64(2**64 - 1)
    y = _bits(rng, count, n)
    y[:4] = [0, 1, top, top >> U64(1)]  # around 0, the top and the middle: carries
    return (y[:, None] - np.asarray(offsets, dtype=np.int64).view(U64)[None, :]) & top


@pytest.mark.parametrize("n", [1, 3, 8, 23, 31, 63, 64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_shared_walk_equals_separate_walks(n, k, monkeypatch):
    """Several points per element walk their common levels once: the shares equal those
    of one walk per point, bit for bit, for clustered, spread, repeated and identical
    points, across chunk and block boundaries."""
    monkeypatch.setattr(fss, "_EVAL_LANES", 96)  # many chunks and branch blocks
    rng = np.random.default_rng(10 * n + k)
    count = 700
    keys = fss.dcf_keygen(_bits(rng, count, n), _uniform(rng, (count, k)), n, rng)
    clustered = _clustered_points(rng, count, n, [-700, -5, -1, 0, 3, 256, 1024])
    spread = _bits(rng, (count, 4), n)
    repeated = np.repeat(_bits(rng, (count, 1), n), 3, axis=1)
    repeated[::2, 1] = _bits(rng, count // 2 + count % 2, n)  # some elements split, some not
    for z in (clustered, spread, repeated, np.repeat(spread[:, :1], 2, axis=1)):
        for key in keys:
            together = fss.dcf_eval(key, z)
            for j in range(z.shape[1]):
                assert np.array_equal(together[:, j], fss.dcf_eval(key, z[:, j])), (j, z.shape)


def test_shared_walk_on_many_points_matches_the_reference():
    rng = np.random.default_rng(12)
    n, count = 43, 300
    keys = fss.dcf_keygen(_bits(rng, count, n), _uniform(rng, (count, 2)), n, rng)
    z = _clustered_points(rng, count, n, list(range(-(1 << 20), 1 << 20, 1 << 15)))
    for key in keys[:1]:
        together = fss.dcf_eval(key, z)
        for j in (0, 1, 31, 63):
            assert np.array_equal(together[:, j], _reference_eval(key, z[:, j]))


def test_dcf_keys_are_deterministic_given_the_generator():
    alpha, beta = np.arange(50, dtype=U64), np.arange(50, dtype=U64) * U64(3)
    first = fss.dcf_keygen(alpha, beta, 16, np.random.default_rng(7))
    again = fss.dcf_keygen(alpha, beta, 16, np.random.default_rng(7))
    other = fss.dcf_keygen(alpha, beta, 16, np.random.default_rng(8))
    assert fss.serialize_dcf_key(first[0]) == fss.serialize_dcf_key(again[0])
    assert fss.serialize_dcf_key(first[1]) == fss.serialize_dcf_key(again[1])
    assert fss.serialize_dcf_key(first[0]) != fss.serialize_dcf_key(other[0])
    assert fss.serialize_dcf_key(first[0]) != fss.serialize_dcf_key(first[1])


def test_dcf_rejects_out_of_domain_inputs():
    with pytest.raises(ValueError, match="alpha"):
        fss.dcf_keygen(np.array([256], U64), np.array([1], U64), 8)
    k0, _ = fss.dcf_keygen(np.array([5], U64), np.array([1], U64), 8)
    with pytest.raises(ValueError, match="z"):
        fss.dcf_eval(k0, np.array([256], U64))
    with pytest.raises(ValueError):
        fss.dcf_keygen(np.array([0], U64), np.array([1], U64), 65)


# --------------------------------------------------------------------------- serialisation


@pytest.mark.parametrize(("n", "k"), [(1, 1), (7, 2), (23, 1), (31, 3), (63, 2), (64, 1)])
def test_dcf_serialisation_round_trip_and_size(n, k):
    rng = np.random.default_rng(n + k)
    count = 333
    alpha, beta = _bits(rng, count, n), _uniform(rng, (count, k))
    keys = fss.dcf_keygen(alpha, beta, n, rng)
    z = _bits(rng, (count, 2), n)
    for party, key in enumerate(keys):
        buf = fss.serialize_dcf_key(key)
        assert len(buf) == count * fss.dcf_key_bytes(n, k)
        back = fss.deserialize_dcf_key(buf, party, n, k)
        assert np.array_equal(fss.dcf_eval(back, z), fss.dcf_eval(key, z))
    with pytest.raises(ValueError, match="multiple"):
        fss.deserialize_dcf_key(buf[:-1], 1, n, k)


def test_key_size_formula():
    assert fss.dcf_key_bytes(63, 1) == 16 + 63 * 16 + 64 * 8 + 16
    assert fss.dcf_key_bytes(64, 1) == 1576
    assert fss.gate_key_bytes(0, 64) == fss.dcf_key_bytes(63, 1) + 8
    assert fss.gate_key_bytes(1, 24) == fss.dcf_key_bytes(23, 2) + 24
    assert fss.gate_key_bytes(0, 16) < fss.gate_key_bytes(0, 32) < fss.gate_key_bytes(0, 64)


@pytest.mark.parametrize(("degree", "bits", "shift"), [(0, 64, 0), (1, 24, 12), (2, 40, 0)])
def test_gate_serialisation_round_trip_and_size(degree, bits, shift):
    rng = np.random.default_rng(degree)
    count = 257
    r = _uniform(rng, count)
    keys = fss.gate_keygen(r, degree, bits, shift, rng)
    x = rng.integers(-(1 << 20), 1 << 20, size=count)
    y = _ring(x) + r
    for party, key in enumerate(keys):
        buf = fss.serialize_gate_key(key)
        assert len(buf) == count * fss.gate_key_bytes(degree, bits)
        back = fss.deserialize_gate_key(buf, party, degree, bits, shift)
        assert np.array_equal(fss.msb_eval(party, back, y), fss.msb_eval(party, key, y))


# --------------------------------------------------------------------------- sign gate


def _edge_values() -> np.ndarray:
    values = {0, 1, -1, TOP - 1, -TOP, TOP - 2, -TOP + 1}
    for k in range(63):
        values |= {1 << k, -(1 << k), (1 << k) - 1, -(1 << k) + 1, (1 << k) + 1, -(1 << k) - 1}
    return np.array(sorted(v for v in values if -TOP <= v < TOP), dtype=np.int64)


def _edge_cases(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each edge x with masks that put y = x + r on both sides of 0 and of 2^63, fixed
    masks at the ring's ends, and random masks."""
    x = _edge_values()
    xu = _ring(x)
    masks = [U64(0) - xu + U64(d) for d in (0, 1, 2**64 - 1, 5)]  # y = d: wraps for x > 0
    masks += [U64(TOP) - xu + U64(d) for d in (0, 1, 2**64 - 1)]  # y next to 2^63
    masks += [np.full_like(xu, U64(v)) for v in (0, 1, 2**64 - 1, TOP, TOP - 1)]
    masks += [_uniform(rng, xu.shape) for _ in range(3)]
    return np.tile(x, len(masks)), np.concatenate(masks)


def test_sign_is_exact_on_edge_values_with_wrapping_masks():
    rng = np.random.default_rng(1)
    x, r = _edge_cases(rng)
    y = _ring(x) + r
    k0, k1 = fss.sign_keygen(r, rng=rng)
    assert np.array_equal(_msb(k0, k1, y), (x < 0).astype(U64))
    drelu = fss.drelu_eval(0, k0, y) + fss.drelu_eval(1, k1, y)
    assert np.array_equal(drelu, (x >= 0).astype(U64))
    # The data discriminates: both wrapping and non-wrapping cases are present, and the
    # comparison that ignores the wrap ([y < r] for [x < 0]) fails on it.
    wraps = y < r
    assert wraps.any() and (~wraps).any()
    assert np.count_nonzero((y < r) != (x < 0)) > 0


def test_sign_is_exact_on_a_million_random_elements():
    rng = np.random.default_rng(2)
    batch, total_wraps = 1 << 17, 0
    for step in range(8):  # 2^20 elements in all, in batches to bound key memory
        half = batch // 2
        x = np.empty(batch, np.int64)
        x[:half] = rng.integers(-TOP, TOP, size=half, dtype=np.int64)
        x[half:] = rng.integers(-(1 << 20) + 1, 1 << 20, size=half)
        r = _uniform(rng, batch)
        # small x: a quarter of masks near 0 (x + r wraps the ring), a quarter near 2^63
        quarter = batch // 4
        near = rng.integers(-(1 << 21), 1 << 21, size=quarter // 2).view(U64)
        r[half:half + quarter // 2] = near
        r[half + quarter // 2:half + quarter] = _uniform(rng, quarter // 2) >> U64(43)
        r[half + quarter // 2:half + quarter] += U64(TOP - (1 << 20))
        y = _ring(x) + r
        k0, k1 = fss.sign_keygen(r, rng=rng)
        assert np.array_equal(_msb(k0, k1, y), (x < 0).astype(U64)), f"batch {step}"
        total_wraps += int(np.count_nonzero(y < r))
    assert total_wraps > 1000


def test_sign_on_a_32_bit_domain_with_small_inputs():
    """The setting where the wrap bug shows at random: |x| < 2^20 on a 32-bit ring."""
    rng = np.random.default_rng(3)
    count = 200_000
    x = rng.integers(-(1 << 20) + 1, 1 << 20, size=count)
    r = _uniform(rng, count)
    y = _ring(x) + r
    k0, k1 = fss.sign_keygen(r, bits=32, rng=rng)
    assert np.array_equal(_msb(k0, k1, y), (x < 0).astype(U64))
    y32, r32 = y & U64(0xFFFF_FFFF), r & U64(0xFFFF_FFFF)
    assert np.count_nonzero((y32 < r32) != (x < 0)) > 5  # what ignoring the wrap gets wrong


def test_sign_on_the_smallest_domain():
    """bits=2: a 1-bit DCF plus the MSB term; x in [-2, 2) is exact."""
    rng = np.random.default_rng(10)
    x = rng.integers(-2, 2, size=4000)
    r = _uniform(rng, x.size)
    k0, k1 = fss.sign_keygen(r, bits=2, rng=rng)
    assert np.array_equal(_msb(k0, k1, _ring(x) + r), (x < 0).astype(U64))


def test_gate_keys_check_the_party():
    k0, _ = fss.sign_keygen(np.array([3], U64))
    with pytest.raises(ValueError, match="party"):
        fss.msb_eval(1, k0, np.array([5], U64))


# --------------------------------------------------------------------------- ReLU and splines


def test_relu_is_exact():
    rng = np.random.default_rng(4)
    x, r = _edge_cases(rng)
    extra = 1 << 16
    x = np.concatenate([x, rng.integers(-TOP, TOP, size=extra, dtype=np.int64),
                        rng.integers(-(1 << 20), 1 << 20, size=extra)])
    r = np.concatenate([r, _uniform(rng, 2 * extra)])
    k0, k1 = fss.relu_keygen(r, rng=rng)
    assert np.array_equal(_relu(k0, k1, _ring(x) + r), np.maximum(x, 0))


def _plain_spline(x: np.ndarray, thresholds, coeffs) -> np.ndarray:
    piece = np.searchsorted(np.asarray(thresholds, dtype=np.int64), x, side="right")
    table = _ring(np.asarray(coeffs, dtype=np.int64))[piece]
    xu, out = _ring(x), np.zeros(x.shape, U64)
    for i in reversed(range(table.shape[1])):  # Horner, mod 2^64
        out = out * xu + table[:, i]
    return _signed(out)


@pytest.mark.parametrize("width", [1, 2, 3])
def test_spline_matches_the_plain_piecewise_polynomial(width):
    rng = np.random.default_rng(5 + width)
    thresholds = [-(1 << 40), -5, 0, 7, 1 << 33]
    coeffs = rng.integers(-(1 << 12), 1 << 12, size=(len(thresholds) + 1, width))
    near = np.array([t + d for t in thresholds for d in (-2, -1, 0, 1, 2)])
    x = np.concatenate([near, rng.integers(-(1 << 45), 1 << 45, size=20_000),
                        rng.integers(-(1 << 61), 1 << 61, size=20_000)])
    r = _uniform(rng, x.size)
    r[: near.size] = U64(0) - _ring(near)  # y = 0 for the threshold neighbours
    k0, k1 = fss.gate_keygen(r, 2, rng=rng)  # a degree-2 key serves every width
    y = _ring(x) + r
    got = _signed(fss.spline_eval(0, k0, y, thresholds, coeffs)
                  + fss.spline_eval(1, k1, y, thresholds, coeffs))
    assert np.array_equal(got, _plain_spline(x, thresholds, coeffs))


def test_spline_without_thresholds_is_the_polynomial():
    rng = np.random.default_rng(11)
    x = rng.integers(-(1 << 30), 1 << 30, size=1000)
    r = _uniform(rng, x.size)
    k0, k1 = fss.gate_keygen(r, 2, rng=rng)
    y = _ring(x) + r
    got = _signed(fss.spline_eval(0, k0, y, [], [[7, -3, 2]])
                  + fss.spline_eval(1, k1, y, [], [[7, -3, 2]]))
    assert np.array_equal(got, _plain_spline(x, [], [[7, -3, 2]]))


def test_spline_rejects_bad_tables():
    k0, _ = fss.gate_keygen(np.array([1], U64), 1)
    y = np.array([4], U64)
    with pytest.raises(ValueError, match="coeffs"):
        fss.spline_eval(0, k0, y, [0], [[1, 2, 3], [0, 0, 0]])  # degree 2 > key degree 1
    with pytest.raises(ValueError, match="increasing"):
        fss.spline_eval(0, k0, y, [3, 1], [[0], [1], [2]])


def test_fixed_point_spline_tracks_the_real_polynomials():
    """A GELU-like spline at scale 2^16 with output scale 2^48: the ring result is the exact
    integer polynomial, and it decodes to the real one up to the coefficients' rounding
    (c_2 keeps 16 fractional bits: at most 2^-17 * 8^2 < 5e-4 on |x| <= 8)."""
    f = 16
    pieces = [[0.0], [-0.02, -0.05, 0.04], [0.0, 0.5, 0.25], [0.0, 1.0]]
    knots = [-4.0, 0.0, 2.0]
    thresholds = [round(t * 2**f) for t in knots]
    coeffs = [fss.fixed_point_coeffs(p + [0.0] * (3 - len(p)), f, out_bits=3 * f)
              for p in pieces]
    rng = np.random.default_rng(6)
    x_real = np.concatenate([rng.uniform(-8, 8, 5000), knots])
    x = np.round(x_real * 2**f).astype(np.int64)
    r = _uniform(rng, x.size)
    k0, k1 = fss.gate_keygen(r, 2, rng=rng)
    y = _ring(x) + r
    out = _signed(fss.spline_eval(0, k0, y, thresholds, coeffs)
                  + fss.spline_eval(1, k1, y, thresholds, coeffs))
    assert np.array_equal(out, _plain_spline(x, thresholds, coeffs))
    xr = x / 2**f
    piece = np.searchsorted(np.array(knots), xr, side="right")
    want = np.array([np.polyval(pieces[p][::-1], v) for p, v in zip(piece, xr, strict=True)])
    error = np.abs(out / 2.0 ** (3 * f) - want)
    assert 0 < np.max(error) < 5e-4


# --------------------------------------------------------------------------- reduced width


def test_reduced_width_on_the_opened_value():
    """bits=m, shift=f on floor(y/2^f) vs floor(r/2^f): exact outside (-2^f, 0) within range,
    inside it only ever reads 'non-negative'; ReLU off by less than 2^f there."""
    m, f = 16, 12
    rng = np.random.default_rng(7)
    limit = 1 << (f + m - 1)
    band = np.arange(-(1 << f) + 1, 0)
    x = np.concatenate([rng.integers(-limit, limit - (1 << f) + 1, size=100_000),
                        np.tile(band, 8), [-limit, -(1 << f), 0, limit - (1 << f)]])
    r = _uniform(rng, x.size)
    y = _ring(x) + r
    k0, k1 = fss.sign_keygen(r, bits=m, shift=f, rng=rng)
    msb = _msb(k0, k1, y).astype(np.int64)
    wrong = msb != (x < 0)
    in_band = (x > -(1 << f)) & (x < 0)
    assert not wrong[~in_band].any()
    assert np.all(msb[wrong] == 0)  # errors only read a tiny negative as non-negative
    rate = wrong[in_band].mean()
    assert 0.4 < rate < 0.6  # P(error | x) = (x + 2^f) / 2^f: one half over the band
    r0, r1 = fss.relu_keygen(r, bits=m, shift=f, rng=rng)
    relu = _relu(r0, r1, y)
    error = relu - np.maximum(x, 0)
    assert not error[~in_band].any()
    assert np.all(np.abs(error) < (1 << f))
    assert np.count_nonzero(error) > 0


def test_reduced_width_on_truncated_shares():
    """Each party truncates its own share; an m-bit x' + r' is opened: exact outside
    [0, 2^f - 1), inside it only ever reads 'negative'."""
    m, f = 20, 8
    rng = np.random.default_rng(8)
    limit = 1 << (f + m - 1)
    x = np.concatenate([rng.integers(-limit + (1 << f), limit, size=100_000),
                        np.tile(np.arange(0, 1 << f), 8)])
    x0 = _uniform(rng, x.size)
    x1 = _ring(x) - x0
    mask = U64((1 << m) - 1)
    r_cmp = _bits(rng, x.size, m)
    y_cmp = (fss.reduce_bits(x0, f, m) + fss.reduce_bits(x1, f, m) + r_cmp) & mask
    k0, k1 = fss.sign_keygen(r_cmp, bits=m, rng=rng)
    msb = _msb(k0, k1, y_cmp).astype(np.int64)
    wrong = msb != (x < 0)
    in_band = (x >= 0) & (x < (1 << f) - 1)
    assert not wrong[~in_band].any()
    assert np.all(msb[wrong] == 1)
    assert 0.4 < wrong[in_band].mean() < 0.6


def test_reduced_width_spline_is_exact_away_from_the_thresholds():
    m, f = 24, 8
    rng = np.random.default_rng(9)
    thresholds = [-(1 << 20), 0, 1 << 18]
    coeffs = [[3, 1], [0, 2], [5, -1], [1, 0]]
    x = rng.integers(-(1 << 28), 1 << 28, size=50_000)
    near = np.zeros(x.size, bool)
    for t in thresholds:
        near |= (x - t > -(1 << f)) & (x - t < 0)
    x = x[~near]
    r = _uniform(rng, x.size)
    k0, k1 = fss.gate_keygen(r, 1, bits=m, shift=f, rng=rng)
    y = _ring(x) + r
    got = _signed(fss.spline_eval(0, k0, y, thresholds, coeffs)
                  + fss.spline_eval(1, k1, y, thresholds, coeffs))
    assert np.array_equal(got, _plain_spline(x, thresholds, coeffs))


def test_benchmark_runs_on_a_tiny_grid():
    from mpcvit.bench import dcf as bench

    result = bench.run([256], [16], [1, 2], repeats=1)
    assert [(row["n"], row["k"]) for row in result["dcf"]] == [(16, 1), (16, 2)]
    assert [row["key_bytes"] for row in result["dcf"]] == [fss.dcf_key_bytes(16, k)
                                                          for k in (1, 2)]
    assert {row["gate"] for row in result["gates"]} == {"sign", "relu"}
    gelu = result["splines"][0]
    assert (gelu["spline"], gelu["points"]) == ("gelu", 10)
    # the points of an element share their leading levels: fewer walked than separately
    assert 23 <= gelu["levels"] < gelu["levels_separate"] == 10 * 23
    exact = result["reduced"][0]
    assert (exact["bits"], exact["shift"], exact["sign_error_rate"]) == (32, 0, 0.0)
