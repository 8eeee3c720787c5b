"""Function secret sharing for one-round comparisons: DCF keys and sign/ReLU/spline gates.

A dealer who knows the mask ``r`` of a secret ``x`` (shared additively over Z_{2^64}) hands
each party a key; once ``y = x + r`` is opened (the only online round), each party turns
``y`` and its key into an additive share of ``[x < 0]``, ``relu(x)`` or a piecewise
polynomial of ``x`` with local work only.  This module is the math layer: numpy arrays in,
numpy arrays out, vectorised over elements; it imports neither torch nor the project.

Building blocks (Boyle-Gilboa-Ishai DCF as in Boyle et al., "Function Secret Sharing for
Mixed-Mode and Fixed-Point Secure Computation", EUROCRYPT 2021):

* :class:`AesPrg` -- fixed-key AES-128 (OpenSSL through ``cryptography``) in
  Matyas-Meyer-Oseas mode, ``G(s) = AES_K(s) XOR s``.  A seed is 128 bits whose lowest bit
  is zero; expanding it towards child ``c`` encrypts ``s | c``, so one AES call per level
  serves lanes that go left and lanes that go right.  The control bit ``t`` is the lowest
  bit of the seed output (then cleared); the payload words come from separate keys.
* :func:`dcf_keygen` / :func:`dcf_eval` -- keys for ``f(z) = beta if z < alpha else 0``
  over an ``n``-bit domain (1 <= n <= 64, unsigned) with a payload of ``k`` words in
  Z_{2^64}; ``Eval(k0, z) + Eval(k1, z) = f(z) mod 2^64``.  One key can be evaluated at
  many public points; the points of a key walk the tree levels on which they all agree
  once (a spline's points ``y - t_k`` are close together: of the 23 levels of a 24-bit
  key, about 10 are shared by all ten GeLU breakpoints), with the shares of separate
  walks, bit for bit.
* Gates on top (:func:`gate_keygen`, :func:`msb_eval`, :func:`drelu_eval`,
  :func:`relu_eval`, :func:`spline_eval`): with ``y = x + r`` public,
  ``MSB(x) = MSB(y) XOR MSB(r) XOR [y mod 2^(m-1) < r mod 2^(m-1)]``; the comparison is an
  (m-1)-bit DCF keyed at ``r mod 2^(m-1)`` whose payload folds in ``MSB(r)`` (``1 - 2
  MSB(r)`` plus a share of ``MSB(r)``), so the XORs become additive shares and the result is
  exact for every ``x``, wrap-around included.  Payload words ``r^j (1 - 2 MSB(r))`` let
  the parties multiply the indicator by polynomials of ``x = y - r`` locally.

Reduced bit width: with ``shift = f`` and ``bits = m`` the comparison runs on
``y' = floor(y / 2^f) mod 2^m`` against ``r' = floor(r / 2^f) mod 2^m`` (an (m-1)-bit DCF:
smaller keys, less AES, the same single opening of ``y``).  ``y' - r' = floor(x / 2^f) + e``
with ``e = [x mod 2^f + r mod 2^f >= 2^f]``, so the sign is exact for ``x`` in
``[-2^(f+m-1), -2^f]`` and ``[0, 2^(f+m-1) - 2^f]`` and can only be wrong for ``x`` in
``(-2^f, 0)``, read as non-negative with probability ``(x + 2^f) / 2^f`` over the mask (ReLU
then returns ``x`` instead of 0: an error below ``2^f`` ulps).  For f = 0 it is exact on
``[-2^(m-1), 2^(m-1))``.  The variant where each party truncates its own share
(:func:`reduce_bits`) and an m-bit ``x' + r'`` is opened instead (sign only; use
``shift=0, bits=m`` with ``r'`` as the mask) sees ``floor(x / 2^f) - c`` with
``c = [x_0 mod 2^f > x mod 2^f]``: exact on ``[-2^(f+m-1) + 2^f - 1, 0)`` and
``[2^f - 1, 2^(f+m-1))``, wrong only on ``[0, 2^f - 1)`` (read as negative).

Spline scaling: a piece is an integer polynomial ``P(x) = sum_i c_i x^i`` evaluated exactly
in Z_{2^64} on the ring element ``x``.  For fixed-point ``x = 2^f x_real``,
:func:`fixed_point_coeffs` picks ``c_i = round(a_i 2^(s - f i))`` so the output has scale
``2^s`` (default ``s = f (d + 1)``: 2^16, 2^32, 2^48 for degree 0, 1, 2 at f = 16).  Ring
arithmetic makes every intermediate overflow harmless; the only limits are that the active
piece's value fits the signed ring, ``|p(x_real)| < 2^(63 - s)`` (below 2^15 for degree 2 at
f = 16, below 2^31 for degree 1), and that each comparison ``x - t_k`` stays inside the
comparison domain (``|x - t_k| < 2^63`` at full width, the reduced-width ranges above
otherwise).  Truncating the 2^s output back to 2^f is the caller's business.

Randomness: key generation takes a numpy ``Generator`` (the dealer's per-session one), an int
seed, or ``None`` (``os.urandom``).  It draws one 128-bit AES key from it and expands every
seed and share split with AES-CTR (:class:`KeyStream`): deterministic given the generator, and
a party's key material reveals nothing about the generator's state.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import comb
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike

U64 = np.uint64
DEFAULT_LABEL = b"mpcvit/fss/aes-mmo/v1"
_CLEAR_LOW = U64(0xFFFF_FFFF_FFFF_FFFE)
_EVAL_LANES = 16384  # lanes per chunk and block: numpy call overhead vs cache (L2)
_ONE = np.array(1, dtype=U64)
_GEN_LANES = 8192


# --------------------------------------------------------------------------- PRG


class AesPrg:
    """Fixed-key AES-128 in Matyas-Meyer-Oseas mode over (L, 2) uint64 blocks.

    Keys are public, derived from ``label`` with SHA-256: one for seeds, one per 128-bit
    block of payload words.  Outputs go into caller-owned buffers (``update_into``) so the
    level loop allocates nothing.
    """

    def __init__(self, label: bytes = DEFAULT_LABEL) -> None:
        self.label = label
        self._seed = self._encryptor(b"seed")
        self._values: list = []

    def _encryptor(self, role: bytes) -> CipherContext:
        key = hashlib.sha256(self.label + b"/" + role).digest()[:16]
        return Cipher(algorithms.AES(key), modes.ECB()).encryptor()

    def _value_encryptor(self, j: int) -> CipherContext:
        while len(self._values) <= j:
            self._values.append(self._encryptor(b"value/%d" % len(self._values)))
        return self._values[j]

    def seed_into(self, x: np.ndarray, out: _Blocks) -> np.ndarray:
        """``AES_seed(x) XOR x`` for the C-contiguous uint64 block array ``x``."""
        return self._mmo(self._seed, x, out)

    def value_into(self, j: int, x: np.ndarray, out: _Blocks) -> np.ndarray:
        """Payload block ``j`` (words 2j, 2j+1) of the seeds ``x``."""
        return self._mmo(self._value_encryptor(j), x, out)

    def encrypt_value(self, j: int, x: np.ndarray, out: _Blocks) -> np.ndarray:
        """``AES_value_j(x)`` without the feed-forward (callers XOR ``x`` word by word)."""
        nblocks = x.size // 2
        self._value_encryptor(j).update_into(x.reshape(-1).view(np.uint8),
                                             out.raw[: 16 * nblocks + 15])
        return out.words(nblocks).reshape(x.shape)

    @staticmethod
    def _mmo(enc: CipherContext, x: np.ndarray, out: _Blocks) -> np.ndarray:
        nblocks = x.size // 2
        enc.update_into(x.reshape(-1).view(np.uint8), out.raw[: 16 * nblocks + 15])
        words = out.words(nblocks).reshape(x.shape)
        np.bitwise_xor(words, x, out=words)
        return words

    def throughput(self, nbytes: int = 1 << 26, block_bytes: int = 1 << 18) -> float:
        """Raw AES-ECB speed of the seed key in GB/s of thread CPU time (for benchmarks)."""
        x = np.zeros(block_bytes // 8, dtype=U64)
        out = _Blocks(block_bytes // 16)
        reps = max(1, nbytes // block_bytes)
        start = time.thread_time()
        for _ in range(reps):
            self._seed.update_into(x.view(np.uint8), out.raw)
        return reps * block_bytes / max(time.thread_time() - start, 1e-9) / 1e9


class _Blocks:
    """A reusable output buffer of 16-byte blocks with the slack ``update_into`` wants."""

    def __init__(self, capacity: int) -> None:
        self.raw = np.empty(16 * capacity + 16, dtype=np.uint8)

    def words(self, nblocks: int) -> np.ndarray:
        return self.raw[: 16 * nblocks].view(U64)


_THREAD_PRG = threading.local()


def default_prg() -> AesPrg:
    """This thread's PRG with the default label (cipher contexts are not shared between
    threads; key schedules are built once per thread)."""
    prg = getattr(_THREAD_PRG, "prg", None)
    if prg is None:
        prg = _THREAD_PRG.prg = AesPrg()
    return prg


def make_rng(rng: np.random.Generator | int | None = None) -> np.random.Generator:
    """The keygen generator: passed through, seeded from an int, or from ``os.urandom``."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        rng = int.from_bytes(os.urandom(32), "little")
    return np.random.default_rng(rng)


class KeyStream:
    """Key-generation randomness: AES-128-CTR under a key drawn from a numpy generator.

    numpy's generators are not cryptographic (PCG64's state can be recovered from enough
    raw output), and a party sees its own seeds and shares; expanding everything from a
    secret AES key keeps the dealer's generator state out of the parties' reach while the
    keys stay a deterministic function of the generator.
    """

    def __init__(self, rng: np.random.Generator | int | None = None) -> None:
        key = os.urandom(16) if rng is None else make_rng(rng).bytes(16)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def words(self, shape: tuple[int, ...]) -> np.ndarray:
        """Uniform uint64 words of the given shape."""
        count = int(np.prod(shape))
        return np.frombuffer(self._enc.update(bytes(8 * count)), dtype="<u8").astype(
            U64).reshape(shape)


# --------------------------------------------------------------------------- DCF keys


@dataclass(frozen=True, eq=False)
class DcfKey:
    """One party's DCF keys for N elements (correction words are common to both parties).

    Layouts are level-major and word-planar so that a level's words for a chunk of
    elements are contiguous.
    """

    party: int
    n: int  # input bits
    k: int  # payload words
    seed: np.ndarray  # (N, 2) uint64, lowest bit zero
    scw: np.ndarray  # (n, 2, N) uint64 seed correction words (low, high), lowest bit zero
    vcw: np.ndarray  # (n, k, N) uint64 payload correction words
    tcw: np.ndarray  # (n, N) uint8: bit 0 = t_cw for the left child, bit 1 = right
    fcw: np.ndarray  # (k, N) uint64 leaf correction word

    @property
    def count(self) -> int:
        return self.seed.shape[0]


def dcf_key_bytes(n: int, k: int) -> int:
    """Serialised bytes per element and party: seed, n x (seed CW, k payload CWs, 2 bits),
    the leaf CW."""
    return 16 + 16 * n + 8 * k * (n + 1) + (2 * n + 7) // 8


def _check_domain(n: int, k: int) -> None:
    if not 1 <= n <= 64:
        raise ValueError(f"DCF input bits must be in 1..64, got {n}")
    if k < 1:
        raise ValueError(f"DCF payload needs at least one word, got {k}")


def _payload_words(blocks: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Word e of the payload is word e % 2 of block e // 2 (strided views, no copies)."""
    return [blocks[e // 2][..., e % 2] for e in range(k)]


def dcf_keygen(
    alpha: np.ndarray, beta: np.ndarray, n: int,
    rng: KeyStream | np.random.Generator | int | None = None, prg: AesPrg | None = None,
) -> tuple[DcfKey, DcfKey]:
    """Keys for ``f_i(z) = beta_i if z < alpha_i else 0`` (unsigned ``n``-bit ``z``).

    ``alpha``: (N,) integers in [0, 2^n); ``beta``: (N,) or (N, k) words of Z_{2^64}.
    """
    alpha = np.asarray(alpha).astype(U64, copy=False).reshape(-1)
    beta = np.asarray(beta).astype(U64, copy=False)
    beta = beta.reshape(-1, 1) if beta.ndim == 1 else beta
    count, k = beta.shape
    _check_domain(n, k)
    if alpha.shape[0] != count:
        raise ValueError("alpha and beta need the same number of elements")
    if n < 64 and alpha.size and int(alpha.max()) >> n:
        raise ValueError(f"alpha does not fit in {n} bits")
    stream = rng if isinstance(rng, KeyStream) else KeyStream(rng)
    prg = prg or default_prg()
    seeds = stream.words((2, count, 2))
    seeds[..., 0] &= _CLEAR_LOW
    common = (_touched((n, 2, count), U64), _touched((n, k, count), U64),
              _touched((n, count), np.uint8), _touched((k, count), U64))
    keys = (DcfKey(0, n, k, seeds[0], *common), DcfKey(1, n, k, seeds[1], *common))
    scratch = _GenScratch(min(count, _GEN_LANES), k)
    beta_t = np.ascontiguousarray(beta.T)
    for c0 in range(0, count, _GEN_LANES):
        c1 = min(count, c0 + _GEN_LANES)
        _keygen_chunk(keys[0], alpha[c0:c1], beta_t[:, c0:c1], seeds[:, c0:c1], c0, prg,
                      scratch)
    return keys


def _touched(shape: tuple[int, ...], dtype: DTypeLike) -> np.ndarray:
    """A zeroed array whose pages are already mapped: first-touch page faults in the
    level-major write pattern of key generation cost several times a sequential fill."""
    arr = np.empty(shape, dtype)
    arr.fill(0)
    return arr


class _GenScratch:
    def __init__(self, lanes: int, k: int) -> None:
        self.seed = _Blocks(4 * lanes)
        self.values = [_Blocks(4 * lanes) for _ in range((k + 1) // 2)]
        self.x = np.empty(8 * lanes, U64)


def _keygen_chunk(key: DcfKey, alpha: np.ndarray, beta: np.ndarray, seeds: np.ndarray, c0: int,
                  prg: AesPrg, scratch: _GenScratch) -> None:
    """Key generation for elements c0 .. c0 + len(alpha) (both parties at once).

    Control bits are kept as masks (0 or all ones): on the path the parties' bits differ,
    so ``tm[1] = ~tm[0]`` and ``(-1)^{t_1} v = (v XOR tm1) - tm1``.
    """
    n, k, size = key.n, key.k, alpha.shape[0]
    c1 = c0 + size
    s = np.ascontiguousarray(seeds.transpose(2, 0, 1))  # (word, party, C)
    tm = np.zeros((2, size), U64)
    tm[1] = ~U64(0)
    v_alpha = np.zeros((k, size), U64)
    x = scratch.x[: 8 * size].reshape(2, 2, size, 2)  # (child, party, C, word)
    planes = np.empty((2 + k, 2, 2, size), U64)  # (lo, hi, payload..., child, party, C)
    for i in range(n):
        a = (alpha >> U64(n - 1 - i)) & U64(1)
        mask = U64(0) - a
        x[..., 0] = s[0]
        x[1, ..., 0] |= U64(1)
        x[..., 1] = s[1]
        out = prg.seed_into(x, scratch.seed)
        planes[0] = out[..., 0]
        planes[1] = out[..., 1]
        blocks = [prg.value_into(j, x, v) for j, v in enumerate(scratch.values)]
        for e, word in enumerate(_payload_words(blocks, k)):
            planes[2 + e] = word
        t_raw = planes[0] & U64(1)  # (child, party, C)
        planes[0] ^= t_raw
        diff = planes[:, 0] ^ planes[:, 1]  # (plane, party, C)
        keep = planes[:, 0] ^ (diff & mask)
        lose = keep ^ diff
        cw_seed = lose[:2, 0] ^ lose[:2, 1]  # (word, C)
        tm1 = tm[1]
        delta = lose[2:, 1] - lose[2:, 0] - v_alpha  # (k, C)
        delta += beta & mask
        vcw = (delta ^ tm1) - tm1  # (-1)^{t_1} (delta + [alpha_i = 1] beta)
        v_alpha += keep[2:, 0] - keep[2:, 1]
        v_alpha += (vcw ^ tm1) - tm1
        tcw_l = t_raw[0, 0] ^ t_raw[0, 1] ^ a ^ U64(1)
        tcw_r = t_raw[1, 0] ^ t_raw[1, 1] ^ a
        tcw_keep = tcw_l ^ ((tcw_l ^ tcw_r) & mask)
        t_keep = t_raw[0] ^ ((t_raw[0] ^ t_raw[1]) & mask)
        s = keep[:2] ^ (cw_seed[:, None, :] & tm)
        tm = U64(0) - (t_keep ^ (tcw_keep & tm))
        key.scw[i, :, c0:c1] = cw_seed
        key.vcw[i, :, c0:c1] = vcw
        key.tcw[i, c0:c1] = tcw_l | (tcw_r << U64(1))
    leaf_in = np.stack([s[0], s[1]], axis=-1)  # (party, C, 2)
    leaf = np.stack(_payload_words([prg.value_into(j, leaf_in, v) for j, v in
                                    enumerate(scratch.values)], k), axis=1)  # (party, k, C)
    delta = leaf[1] - leaf[0] - v_alpha
    key.fcw[:, c0:c1] = (delta ^ tm[1]) - tm[1]


def dcf_eval(key: DcfKey, z: np.ndarray, prg: AesPrg | None = None) -> np.ndarray:
    """This party's shares of ``f_i(z_i)``: z (N,) -> (N, k); z (N, m) -> (N, m, k).

    The m points of a row share element i's key; ``z < 2^n`` unsigned.
    """
    z = np.asarray(z).astype(U64, copy=False)
    if z.ndim not in (1, 2) or z.shape[0] != key.count:
        raise ValueError(f"z must have shape (N,) or (N, m) with N = {key.count}")
    if key.n < 64 and z.size and int(z.max()) >> key.n:
        raise ValueError(f"z does not fit in {key.n} bits")
    raw = dcf_eval_raw(key, z.T if z.ndim == 2 else z[None, :], prg)  # (k, m, N)
    return np.ascontiguousarray(raw.transpose(2, 1, 0) if z.ndim == 2 else raw[:, 0].T)


def dcf_eval_raw(key: DcfKey, z: np.ndarray, prg: AesPrg | None = None) -> np.ndarray:
    """Shares as a (k, m, N) array for points z of shape (m, N) (no input checks).

    An element's points share the tree levels on which they all agree: those are walked
    once (:func:`_eval_chunk`); the shares are those of separate walks, bit for bit.
    """
    prg = prg or default_prg()
    points, count = z.shape
    out = np.empty((key.k, points, count), U64)
    if out.size == 0:
        return out
    trunk = _Block(1, min(count, _EVAL_LANES), key.k)
    branch = None
    for c0 in range(0, count, _EVAL_LANES):
        c1 = min(count, c0 + _EVAL_LANES)
        if points == 1:
            part = _KeyPart(key, slice(c0, c1), 0)
            _walk(trunk, part, z[:, c0:c1], np.zeros(c1 - c0, np.int64), prg, out[:, :, c0:c1])
            continue
        branch = branch or _Block(points - 1, min(count, max(1, _EVAL_LANES // (points - 1))),
                                  key.k)
        _eval_chunk(key, z[:, c0:c1], c0, trunk, branch, prg, out[:, :, c0:c1])
    return out


class _KeyPart:
    """Key words of some elements (``cols``: a slice, views; or indices, copies) from
    level ``first`` on; tcw widened to words for the shifts."""

    def __init__(self, key: DcfKey, cols: slice | np.ndarray, first: int) -> None:
        self.party, self.n, self.k, self.first = key.party, key.n, key.k, first
        if isinstance(cols, slice):
            self.seed, self.scw = key.seed[cols], key.scw[first:, :, cols]
            self.vcw, self.fcw = key.vcw[first:, :, cols], key.fcw[:, cols]
            self.tcw = key.tcw[first:, cols].astype(U64)
            return
        self.seed = np.take(key.seed, cols, axis=0, mode="clip")
        self.scw = np.take(key.scw[first:], cols, axis=2, mode="clip")
        self.vcw = np.take(key.vcw[first:], cols, axis=2, mode="clip")
        self.tcw = np.take(key.tcw[first:], cols, axis=1, mode="clip").astype(U64)
        self.fcw = np.take(key.fcw, cols, axis=1, mode="clip")


class _Block:
    """Walk state of ``rows`` points for each of up to ``cols`` elements (row-major) and
    the buffers of one level.  A level acts on the first ``c`` columns of every row;
    key words (w, c) broadcast over the rows.

    The seed ``s`` is the AES input: 128-bit blocks with the child bit (also in
    ``child``) in the low word's free lowest bit.  Payload words accumulate interleaved
    like the AES payload blocks (``acc``), control-bit corrections separately
    (``corr``); the control bit is kept as 0/1 (``t``) and as a mask (``tmask``, 0 or all
    ones) so that corrections are ANDs.
    """

    def __init__(self, rows: int, cols: int, k: int) -> None:
        self.rows, self.cols, self.k = rows, cols, k
        blocks, shape, size = (k + 1) // 2, (rows, cols), rows * cols
        self.s = np.empty((rows, cols, 2), U64)
        self.stage = np.empty((size, 2), U64)  # contiguous AES input for a partial block
        self.raw_seed = np.empty(16 * size + 16, np.uint8)
        self.raw_values = [np.empty(16 * size + 16, np.uint8) for _ in range(blocks)]
        self.acc = np.empty((blocks, rows, cols, 2), U64)
        self.corr = np.empty((k, rows, cols), U64)
        self.mask_seed = np.empty((2, rows, cols), U64)
        self.mask_value = np.empty((k, rows, cols), U64)
        self.z, self.t, self.tmask, self.t_raw, self.child, self.next_bit, self.tmp = (
            np.empty(shape, U64) for _ in range(7))

    def aes_input(self, c: int) -> np.ndarray:
        """The seeds of the first c columns as one contiguous (rows, c, 2) array."""
        s = self.s[:, :c]
        if c == self.cols or self.rows == 1:
            return s
        stage = self.stage[: self.rows * c].reshape(self.rows, c, 2)
        np.copyto(stage, s)
        return stage

    @staticmethod
    def aes(enc: CipherContext, x: np.ndarray, raw: np.ndarray) -> np.ndarray:
        """AES-ECB of the contiguous blocks x (rows, c, 2) into ``raw``: same shape."""
        size = 8 * x.size
        enc.update_into(x.reshape(-1).view(np.uint8), raw[: size + 15])
        return raw[:size].view(U64).reshape(x.shape)


def _payload(block: _Block, x: np.ndarray, prg: AesPrg, cw: np.ndarray) -> None:
    """acc += payload words of the seeds x (MMO), corr += cw (k, c) where t = 1."""
    c = x.shape[1]
    for j, raw in enumerate(block.raw_values):
        words = block.aes(prg._value_encryptor(j), x, raw)
        np.bitwise_xor(words, x, out=words)
        acc = block.acc[j, :, :c]
        np.add(acc, words, out=acc)
    mask = block.mask_value[:, :, :c]
    np.bitwise_and(cw[:, None, :], block.tmask[None, :, :c], out=mask)
    corr = block.corr[:, :, :c]
    np.add(corr, mask, out=corr)


def _level(block: _Block, c: int, prg: AesPrg, scw: np.ndarray, vcw: np.ndarray,
           tcw: np.ndarray, position: int) -> None:
    """One tree level for the first c columns: payload, then the child seed and control
    bit, with the next level's child bit (bit ``position`` of the point; none when
    negative) set in the seed.  Key words: scw (2, c), vcw (k, c), tcw (c,)."""
    s, t = block.s[:, :c], block.t[:, :c]
    t_raw, tmp = block.t_raw[:, :c], block.tmp[:, :c]
    x = block.aes_input(c)
    _payload(block, x, prg, vcw)
    mask = block.mask_seed[:, :, :c]
    np.bitwise_and(scw[:, None, :], block.tmask[None, :, :c], out=mask)
    out = block.aes(prg._seed, x, block.raw_seed)
    np.bitwise_xor(out, x, out=out)  # MMO: the raw child seed
    np.bitwise_and(out[..., 0], _ONE, out=t_raw)
    # low word: seed correction, clear the control bit, set the next child bit
    np.bitwise_xor(mask[0], t_raw, out=mask[0])
    if position >= 0:
        nxt = block.next_bit[:, :c]
        _bit(block.z[:, :c], position, nxt)
        np.bitwise_xor(mask[0], nxt, out=mask[0])
    np.bitwise_xor(out[..., 0], mask[0], out=s[..., 0])
    np.bitwise_xor(out[..., 1], mask[1], out=s[..., 1])
    # control bit: t' = t_raw XOR (t AND t_cw[child]), t in {0, 1}
    np.right_shift(tcw[None, :], block.child[:, :c], out=tmp)
    np.bitwise_and(tmp, t, out=tmp)
    np.bitwise_xor(t_raw, tmp, out=t)
    np.negative(t, out=block.tmask[:, :c])
    block.child, block.next_bit = block.next_bit, block.child


def _walk(block: _Block, part: _KeyPart, z: np.ndarray, depth: np.ndarray, prg: AesPrg,
          out: np.ndarray,
          start: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
          base: np.ndarray | None = None,
          snapshot: Callable[[int], None] | None = None) -> None:
    """Walk the points z (rows, c) of the part's elements through every level and the
    leaf; writes out (k, rows, c) (party 1 negated).

    Element j joins at level ``depth[j]`` (non-decreasing) with the seed and control bit
    ``start(lo, hi)`` gives for elements lo..hi-1 and a zero payload; ``base`` (k, c) is
    added at the end.  The trunk (depth 0) starts from the key's seeds.  ``snapshot(i)``
    runs at depth i before level i."""
    n, c = part.n, z.shape[1]
    block.z[:, :c] = z
    joined = np.searchsorted(depth, np.arange(part.first, n + 1), side="right")
    active = 0
    for i in range(part.first, n):
        hi = int(joined[i - part.first])
        if hi > active:
            seed, t = (part.seed, part.party) if start is None else start(active, hi)
            _join(block, active, hi, seed, t, n - 1 - i)
            active = hi
        if snapshot is not None:
            snapshot(i)
        j = i - part.first
        _level(block, active, prg, part.scw[j, :, :active], part.vcw[j, :, :active],
               part.tcw[j, :active], n - 2 - i)
    x = block.aes_input(active)
    _payload(block, x, prg, part.fcw[:, :active])
    for e in range(part.k):
        words = out[e]
        np.add(block.acc[e // 2, :, :c, e % 2], block.corr[e, :, :c], out=words)
        if base is not None:
            np.add(words, base[e][None, :], out=words)
    if part.party == 1:
        np.negative(out, out=out)


def _join(block: _Block, lo: int, hi: int, seed: np.ndarray, t: int | np.ndarray,
          position: int) -> None:
    """Columns lo..hi-1 start walking: seeds (hi-lo, 2) (lowest bit zero) with each row's
    child bit (bit ``position`` of its point), control bits t, zero payload."""
    s = block.s[:, lo:hi]
    s[...] = seed[None]
    child = block.child[:, lo:hi]
    _bit(block.z[:, lo:hi], position, child)
    np.bitwise_or(s[..., 0], child, out=s[..., 0])
    block.t[:, lo:hi] = t
    np.negative(block.t[:, lo:hi], out=block.tmask[:, lo:hi])
    block.acc[:, :, lo:hi] = 0
    block.corr[:, :, lo:hi] = 0


def _bit_length(v: np.ndarray) -> np.ndarray:
    """Bit length of each uint64 word (0 for 0)."""
    v = v.copy()
    length = np.zeros(v.shape, np.int64)
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= U64(1 << step)
        length += big * step
        np.right_shift(v, U64(step), out=v, where=big)
    return length + (v > 0)


def _eval_chunk(key: DcfKey, z: np.ndarray, c0: int, trunk: _Block, branch: _Block,
                prg: AesPrg, out: np.ndarray) -> None:
    """Points z (m, c), m >= 2, of elements c0..c0+c-1; writes out (k, m, c).

    Above the depth D where an element's points stop agreeing they all follow one path,
    so only point 0 walks it (the trunk); the other m - 1 points start at depth D from
    the trunk's seed and control bit there, with a zero payload, and the trunk's payload
    so far is added to their results.  They walk in blocks of elements sorted by D, so
    that a block's active columns are a prefix and its levels mostly full.
    """
    n, k = key.n, key.k
    points, c = z.shape
    rows = points - 1
    spread = np.zeros(c, U64)
    for row in z[1:]:
        spread |= row ^ z[0]
    depth = n - _bit_length(spread)  # n: all points equal
    order = np.argsort(depth, kind="stable")
    ranked_depth = depth[order]
    bounds = np.searchsorted(ranked_depth, np.arange(n + 1), side="left")
    seeds = np.empty((c, 2), U64)  # the trunk at each element's split, in split order
    t_split = np.empty(c, U64)
    base = np.empty((k, c), U64)

    def snapshot(i: int) -> None:
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            idx = order[lo:hi]
            seeds[lo:hi] = trunk.s[0, idx]
            seeds[lo:hi, 0] &= _CLEAR_LOW
            t_split[lo:hi] = trunk.t[0, idx]
            for e in range(k):
                base[e, lo:hi] = trunk.acc[e // 2, 0, idx, e % 2] + trunk.corr[e, 0, idx]

    _walk(trunk, _KeyPart(key, slice(c0, c0 + c), 0), z[:1], np.zeros(c, np.int64), prg,
          out[:, :1], snapshot=snapshot)
    split = int(bounds[n])  # elements whose points do not all agree, in split order
    ranked = np.empty((k, rows, c), U64)
    ranked[:, :, split:] = out[:, :1, order[split:]]
    for a in range(0, split, branch.cols):
        b = min(split, a + branch.cols)
        first = int(ranked_depth[a])
        part = _KeyPart(key, c0 + order[a:b], first)
        _walk(branch, part, z[1:, order[a:b]], ranked_depth[a:b], prg, ranked[:, :, a:b],
              lambda lo, hi, a=a: (seeds[a + lo:a + hi], t_split[a + lo:a + hi]),
              base[:, a:b])
    inverse = np.empty(c, np.intp)
    inverse[order] = np.arange(c)
    out[:, 1:] = np.take(ranked, inverse, axis=2, mode="clip")


def _bit(z: np.ndarray, position: int, out: np.ndarray) -> None:
    """Bit ``position`` of each word of z (0 or 1)."""
    np.right_shift(z, U64(position), out=out)
    np.bitwise_and(out, _ONE, out=out)


# --------------------------------------------------------------------------- serialisation


def _dcf_parts(key: DcfKey) -> list[np.ndarray]:
    """The serialised key's parts, in order, as little-endian arrays."""
    bits = np.stack([key.tcw & 1, key.tcw >> 1], axis=-1)  # (n, N, 2)
    packed = np.packbits(bits.transpose(1, 0, 2).reshape(key.count, 2 * key.n), axis=1)
    return [p.astype("<u8", copy=False) for p in (key.seed, key.scw, key.vcw, key.fcw)] + [
        packed]


def _write(parts: list[np.ndarray], out: np.ndarray) -> int:
    """Copy ``parts`` back to back into the uint8 buffer ``out``; returns bytes written."""
    offset = 0
    for p in parts:
        raw = np.ascontiguousarray(p).reshape(-1).view(np.uint8)
        out[offset:offset + raw.size] = raw
        offset += raw.size
    return offset


def serialize_dcf_key(key: DcfKey) -> bytes:
    """One contiguous little-endian buffer of ``key.count * dcf_key_bytes(n, k)`` bytes."""
    return b"".join(p.tobytes() for p in _dcf_parts(key))


def deserialize_dcf_key(buf: bytes | bytearray | memoryview | np.ndarray, party: int, n: int,
                        k: int) -> DcfKey:
    """Inverse of :func:`serialize_dcf_key`; arrays are read-only views into ``buf`` where
    possible."""
    _check_domain(n, k)
    data = np.frombuffer(buf, dtype=np.uint8)
    per = dcf_key_bytes(n, k)
    if data.size % per:
        raise ValueError(f"DCF key buffer of {data.size} bytes is not a multiple of {per}")
    count = data.size // per
    offset = 0

    def take(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal offset
        words = int(np.prod(shape))
        arr = np.frombuffer(data, dtype="<u8", count=words, offset=offset).reshape(shape)
        offset += 8 * words
        return arr.astype(U64, copy=False)

    seed, scw = take((count, 2)), take((n, 2, count))
    vcw, fcw = take((n, k, count)), take((k, count))
    packed = data[offset:].reshape(count, (2 * n + 7) // 8)
    bits = np.unpackbits(packed, axis=1, count=2 * n).reshape(count, n, 2)
    tcw = np.ascontiguousarray((bits[..., 0] | (bits[..., 1] << 1)).T)
    return DcfKey(party, n, k, seed, scw, vcw, tcw, fcw)


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True, eq=False)
class GateKey:
    """One party's key for the sign (degree 0), ReLU (1) or spline (<= 2) gate.

    ``extra`` holds additive shares (2d+1, N): ``r^j MSB(r')`` for j = 0..d, then ``r^j``
    for j = 1..d, where ``r`` is the 64-bit mask and ``r'`` the comparison mask.
    """

    party: int
    degree: int
    bits: int
    shift: int
    dcf: DcfKey
    extra: np.ndarray

    @property
    def count(self) -> int:
        return self.dcf.count


def _check_gate(degree: int, bits: int, shift: int) -> None:
    if not 0 <= degree <= 2:
        raise ValueError(f"gate degree must be 0, 1 or 2, got {degree}")
    if not 2 <= bits <= 64 or shift < 0 or shift + bits > 64:
        raise ValueError(f"need 2 <= bits <= 64 and 0 <= shift <= 64 - bits, got {bits}, {shift}")


def gate_key_bytes(degree: int, bits: int = 64) -> int:
    """Serialised bytes per element and party of a gate key."""
    _check_gate(degree, bits, 0)
    return dcf_key_bytes(bits - 1, degree + 1) + 8 * (2 * degree + 1)


def reduce_bits(v: np.ndarray, shift: int, bits: int) -> np.ndarray:
    """``floor(v / 2^shift) mod 2^bits`` of uint64 words (logical shift).

    Applied by each party to its own share, the shares then sum to ``floor(x / 2^shift) - e``
    mod 2^bits with e in {0, 1}.
    """
    v = np.asarray(v).astype(U64, copy=False) >> U64(shift)
    return v if bits == 64 else v & U64((1 << bits) - 1)


def _split(stream: KeyStream, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    share0 = stream.words(values.shape)
    return share0, values - share0


def gate_keygen(
    r: np.ndarray, degree: int, bits: int = 64, shift: int = 0,
    rng: KeyStream | np.random.Generator | int | None = None, prg: AesPrg | None = None,
) -> tuple[GateKey, GateKey]:
    """Dealer side: keys for a gate on ``x`` masked by ``r`` ((N,) uint64/int64 words).

    The comparison runs on ``r' = floor(r / 2^shift) mod 2^bits`` with an (bits-1)-bit DCF;
    ``degree`` 0 serves :func:`msb_eval`/:func:`drelu_eval`, 1 :func:`relu_eval`, 2 the
    quadratic :func:`spline_eval` (a key of degree d serves splines of degree <= d).
    """
    _check_gate(degree, bits, shift)
    stream = rng if isinstance(rng, KeyStream) else KeyStream(rng)
    r = _u64(r)
    r_cmp = reduce_bits(r, shift, bits)
    r_msb = r_cmp >> U64(bits - 1)
    alpha = r_cmp & U64((1 << (bits - 1)) - 1)
    powers = [np.ones_like(r)]
    for _ in range(degree):
        powers.append(powers[-1] * r)
    beta = np.stack([(U64(1) - (r_msb << U64(1))) * p for p in powers], axis=1)
    dcf0, dcf1 = dcf_keygen(alpha, beta, bits - 1, stream, prg)
    extra = np.stack([p * r_msb for p in powers] + powers[1:])
    extra0, extra1 = _split(stream, extra)
    return (GateKey(0, degree, bits, shift, dcf0, extra0),
            GateKey(1, degree, bits, shift, dcf1, extra1))


def sign_keygen(
    r: np.ndarray, bits: int = 64, shift: int = 0,
    rng: KeyStream | np.random.Generator | int | None = None, prg: AesPrg | None = None,
) -> tuple[GateKey, GateKey]:
    """Keys for :func:`msb_eval` / :func:`drelu_eval` (a degree-0 gate)."""
    return gate_keygen(r, 0, bits, shift, rng, prg)


def relu_keygen(
    r: np.ndarray, bits: int = 64, shift: int = 0,
    rng: KeyStream | np.random.Generator | int | None = None, prg: AesPrg | None = None,
) -> tuple[GateKey, GateKey]:
    """Keys for :func:`relu_eval` (a degree-1 gate; also serves linear splines)."""
    return gate_keygen(r, 1, bits, shift, rng, prg)


def serialize_gate_key(key: GateKey) -> bytes:
    """``gate_key_bytes(degree, bits) * count`` bytes: extra shares, then the DCF key."""
    return key.extra.astype("<u8", copy=False).tobytes() + serialize_dcf_key(key.dcf)


def serialize_gate_key_into(key: GateKey, out: np.ndarray) -> int:
    """:func:`serialize_gate_key` written into the uint8 buffer ``out`` (one copy of each
    part, for large keys); returns the bytes written."""
    return _write([key.extra.astype("<u8", copy=False), *_dcf_parts(key.dcf)], out)


def deserialize_gate_key(buf: bytes | bytearray | memoryview | np.ndarray, party: int,
                         degree: int, bits: int = 64, shift: int = 0) -> GateKey:
    """Inverse of :func:`serialize_gate_key` (the shape parameters are not stored)."""
    per = gate_key_bytes(degree, bits)
    _check_gate(degree, bits, shift)
    data = np.frombuffer(buf, dtype=np.uint8)
    if data.size % per:
        raise ValueError(f"gate key buffer of {data.size} bytes is not a multiple of {per}")
    count = data.size // per
    words = (2 * degree + 1) * count
    extra = np.frombuffer(data, dtype="<u8", count=words).reshape(2 * degree + 1, count)
    dcf = deserialize_dcf_key(data[8 * words:], party, bits - 1, degree + 1)
    return GateKey(party, degree, bits, shift, dcf, extra.astype(U64, copy=False))


def _as_words(values: ArrayLike) -> np.ndarray:
    """Small tables of Python/numpy integers (possibly negative) as words mod 2^64."""
    arr = np.asarray(values, dtype=object)
    flat = [int(v) % (1 << 64) for v in arr.reshape(-1)]
    return np.array(flat, dtype=U64).reshape(arr.shape)


def _u64(values: np.ndarray) -> np.ndarray:
    """Ring words as a flat uint64 array (int64 input is reinterpreted, not converted)."""
    arr = np.asarray(values)
    if arr.dtype != U64:
        arr = arr.astype(np.int64, copy=False).view(U64)
    return arr.reshape(-1)


def _opened(y: np.ndarray, key: GateKey) -> np.ndarray:
    y = _u64(y)
    if y.shape[0] != key.count:
        raise ValueError(f"y has {y.shape[0]} elements, the key {key.count}")
    return y


def _r_powers(key: GateKey) -> np.ndarray:
    """Shares of ``r^j`` for j = 0..d as (d+1, N); party 0 holds r^0 = 1."""
    d = key.degree
    r_pow = np.empty((d + 1, key.count), U64)
    r_pow[0] = 1 - key.party
    r_pow[1:] = key.extra[d + 1:]
    return r_pow


def _compare(key: GateKey, y: np.ndarray, thresholds: np.ndarray, r_pow: np.ndarray,
             prg: AesPrg | None) -> np.ndarray:
    """Shares of ``r^j [x - t_k >= 0]`` as (d+1, P, N)."""
    bits = key.bits
    cmp = reduce_bits(y[None, :] - thresholds[:, None], key.shift, bits)  # (P, N)
    y_msb = cmp >> U64(bits - 1)
    low = cmp & U64((1 << (bits - 1)) - 1)
    words = dcf_eval_raw(key.dcf, low, prg)  # (d+1, P, N): r^j (1 - 2 MSB(r')) [low < r'_low]
    coef_a = U64(1) - y_msb  # [x >= t] = A + B w with w = MSB(r') XOR carry
    coef_b = (y_msb << U64(1)) - U64(1)
    for j in range(key.degree + 1):
        words[j] += key.extra[j]  # now shares of r^j w
        words[j] *= coef_b
        words[j] += coef_a * r_pow[j]
    return words


def threshold_eval(party: int, key: GateKey, y: np.ndarray, thresholds: ArrayLike,
                   prg: AesPrg | None = None) -> np.ndarray:
    """Party side: shares (d+1, P, N) uint64 of ``r^j [x - t_k >= 0]`` for j = 0..d and the P
    public thresholds (ring integers, signed), from the opened ``y = x + r``.

    Row j = 0 is the indicator itself; with the rows j >= 1, ``x^i [x >= t_k]`` for
    i <= d is local, since ``x = y - r`` with ``y`` public (``x [x >= t] = y row0 - row1``).
    One key per element serves all P thresholds (the exactness window of each comparison
    ``x - t_k`` is the key's, see the module doc).
    """
    _check_party(party, key)
    y = _opened(y, key)
    return _compare(key, y, _as_words(thresholds).reshape(-1), _r_powers(key), prg)


def mask_share(key: GateKey) -> np.ndarray | None:
    """This party's additive share (N,) of the 64-bit mask ``r`` when the key carries one
    (degree >= 1: the ``r^1`` row of ``extra``), else None."""
    return key.extra[key.degree + 1] if key.degree >= 1 else None


def msb_eval(party: int, key: GateKey, y: np.ndarray, prg: AesPrg | None = None) -> np.ndarray:
    """Party side: additive share (N,) uint64 of ``[x < 0]`` from the opened ``y = x + r``."""
    _check_party(party, key)
    y = _opened(y, key)
    bits = key.bits
    cmp = reduce_bits(y, key.shift, bits)
    y_msb = cmp >> U64(bits - 1)
    low = cmp & U64((1 << (bits - 1)) - 1)
    w = dcf_eval_raw(key.dcf, low[None, :], prg)[0, 0]
    w += key.extra[0]  # share of MSB(r') XOR [low < r'_low]
    # MSB(x) = MSB(y) XOR w = MSB(y) + (1 - 2 MSB(y)) w; the public term goes to party 0.
    w *= U64(1) - (y_msb << U64(1))
    if party == 0:
        w += y_msb
    return w


def drelu_eval(party: int, key: GateKey, y: np.ndarray, prg: AesPrg | None = None) -> np.ndarray:
    """Party side: additive share (N,) uint64 of ``[x >= 0]``."""
    share = msb_eval(party, key, y, prg)
    np.negative(share, out=share)
    if party == 0:
        share += U64(1)
    return share


def relu_eval(party: int, key: GateKey, y: np.ndarray, prg: AesPrg | None = None) -> np.ndarray:
    """Party side: additive share (N,) uint64 of ``x [x >= 0]`` (key degree >= 1)."""
    return spline_eval(party, key, y, [0], [[0, 0], [0, 1]], prg)


def _check_party(party: int, key: GateKey) -> None:
    if party != key.party:
        raise ValueError(f"key belongs to party {key.party}, not {party}")


def _shifted_coeffs(coeffs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """e_j(y) with p(y - r) = sum_j e_j(y) r^j: (P, d+1) coefficients -> (P, d+1, N)."""
    pieces, width = coeffs.shape
    out = np.zeros((pieces, width, y.shape[0]), U64)
    y_pow = [np.ones_like(y)]
    for _ in range(width - 1):
        y_pow.append(y_pow[-1] * y)
    for j in range(width):
        sign = U64(1) if j % 2 == 0 else U64((1 << 64) - 1)
        for i in range(j, width):
            binom = U64(comb(i, j))
            out[:, j] += (coeffs[:, i, None] * binom * sign) * y_pow[i - j][None, :]
    return out


def spline_eval(
    party: int, key: GateKey, y: np.ndarray, thresholds: ArrayLike, coeffs: ArrayLike,
    prg: AesPrg | None = None,
) -> np.ndarray:
    """Party side: share (N,) of ``p_j(x)`` for ``x`` in the j-th interval.

    ``thresholds``: P = m-1 increasing public integers t_1 < ... < t_{m-1} (ring values,
    signed); ``coeffs``: (m, d+1) integers, row j = coefficients of p_j (constant first),
    d <= key degree.  Interval 0 is x < t_1, interval j is t_j <= x < t_{j+1}.  One DCF key
    per element is evaluated at the P points ``y - t_k``.
    """
    _check_party(party, key)
    y = _opened(y, key)
    t = _as_words(thresholds).reshape(-1)
    c = _as_words(coeffs)
    if c.ndim != 2 or c.shape[0] != t.size + 1 or c.shape[1] > key.degree + 1:
        raise ValueError(f"coeffs must be ({t.size + 1}, <= {key.degree + 1})")
    signed = t.view(np.int64)
    if t.size > 1 and not np.all(signed[1:] > signed[:-1]):
        raise ValueError("thresholds must be strictly increasing")
    c = np.pad(c, ((0, 0), (0, key.degree + 1 - c.shape[1])))
    diffs = np.concatenate([c[:1], c[1:] - c[:-1]])  # p_0, then q_k = p_k - p_{k-1}
    e = _shifted_coeffs(diffs, y)  # (m, d+1, N)
    r_pow = _r_powers(key)  # (d+1, N)
    ind = _compare(key, y, t, r_pow, prg)  # (d+1, P, N)
    share = np.zeros(key.count, U64)
    for j in range(key.degree + 1):
        share += e[0, j] * r_pow[j]
        share += (e[1:, j] * ind[j]).sum(axis=0, dtype=U64)
    return share


def fixed_point_coeffs(poly: Sequence[float], frac_bits: int = 16,
                       out_bits: int | None = None) -> list[int]:
    """Integer coefficients of a real polynomial for :func:`spline_eval`.

    ``poly``: real coefficients a_0..a_d of p(x_real); inputs have scale ``2^frac_bits``.
    Returns ``c_i = round(a_i 2^(out_bits - frac_bits i))`` so that ``sum c_i x^i`` has scale
    ``2^out_bits`` (default ``frac_bits (d + 1)``; every piece of one spline must use the
    same ``out_bits``).
    """
    degree = len(poly) - 1
    out_bits = frac_bits * (degree + 1) if out_bits is None else out_bits
    if out_bits < frac_bits * degree:
        raise ValueError("out_bits must be at least frac_bits * degree")
    return [round(a * 2.0 ** (out_bits - frac_bits * i)) for i, a in enumerate(poly)]
