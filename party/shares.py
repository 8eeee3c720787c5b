"""Fixed-point encoding and additive secret sharing over the int64 ring (numpy only).

The client and the party servers must agree bit for bit on how a real number becomes a
ring element, so both use this module.  It matches CrypTen's ``ArithmeticSharedTensor``:
values are ``round(x * 2^precision_bits)`` as int64, shares add up modulo 2^64 (numpy
``uint64`` arithmetic wraps, which is exactly the ring), and decoding divides by the scale.

CrypTen's own ``FixedPointEncoder`` truncates toward zero when it encodes a float tensor;
we round to nearest instead, which halves the encoding error and stays within one unit in
the last place of CrypTen's value, so a secure model cannot tell the difference.

Torch-free on purpose: the client SDK imports this.
"""

from __future__ import annotations

import os

import numpy as np

#: CrypTen's default ``cfg.encoder.precision_bits``.
DEFAULT_PRECISION_BITS = 16
#: Bytes of one ring element on the wire (little-endian int64).
RING_BYTES = 8
_WIRE_DTYPE = np.dtype("<i8")


def encode(values: np.ndarray, precision_bits: int = DEFAULT_PRECISION_BITS) -> np.ndarray:
    """Real numbers -> int64 fixed point, rounding to nearest.

    Raises ValueError for NaN/inf or magnitudes the ring cannot hold, rather than
    silently wrapping them into garbage.
    """
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("cannot encode NaN or infinite values")
    scaled = np.rint(x * float(1 << precision_bits))
    # Stay well inside int64 so a secure multiply's intermediate cannot overflow by design.
    limit = float(1 << 62)
    if scaled.size and np.max(np.abs(scaled)) >= limit:
        raise ValueError(f"values too large for {precision_bits}-bit fixed point in int64")
    return scaled.astype(np.int64)


def decode(encoded: np.ndarray, precision_bits: int = DEFAULT_PRECISION_BITS) -> np.ndarray:
    """int64 fixed point -> float64."""
    return np.asarray(encoded, dtype=np.int64).astype(np.float64) / float(1 << precision_bits)


def random_ring(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform ring elements from the OS's secure random source (never numpy's PRNG)."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(os.urandom(RING_BYTES * count), dtype=np.uint64).reshape(shape).copy()


def split(encoded: np.ndarray, parties: int = 2) -> list[np.ndarray]:
    """Split an int64 array into ``parties`` additive shares mod 2^64 (each uniform alone)."""
    if parties < 2:
        raise ValueError("need at least two shares")
    secret = np.asarray(encoded, dtype=np.int64).view(np.uint64)
    randoms = [random_ring(secret.shape) for _ in range(parties - 1)]
    last = secret.copy()
    for r in randoms:
        last -= r  # uint64 wraps: this is subtraction in Z_{2^64}
    return [s.view(np.int64) for s in (*randoms, last)]


def reconstruct(shares: list[np.ndarray]) -> np.ndarray:
    """Sum additive shares mod 2^64 back into the int64 secret."""
    if not shares:
        raise ValueError("no shares to reconstruct")
    total = np.zeros(np.shape(shares[0]), dtype=np.uint64)
    for s in shares:
        s = np.asarray(s, dtype=np.int64)
        if s.shape != total.shape:
            raise ValueError(f"share shapes differ: {s.shape} vs {total.shape}")
        total += s.view(np.uint64)
    return total.view(np.int64)


def to_bytes(share: np.ndarray) -> bytes:
    """Wire format of a share: little-endian int64, C order."""
    return np.ascontiguousarray(share, dtype=_WIRE_DTYPE).tobytes()


def from_bytes(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Parse a share from the wire, checking its length against ``shape``."""
    if any(int(d) <= 0 for d in shape):
        raise ValueError(f"shape must have positive dimensions, got {tuple(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * RING_BYTES:
        raise ValueError(
            f"share has {len(data)} bytes; shape {tuple(shape)} needs {count * RING_BYTES}"
        )
    return np.frombuffer(data, dtype=_WIRE_DTYPE).astype(np.int64).reshape(shape)
