"""One-round comparisons with keys from the dealer (function secret sharing).

The dealer draws a mask ``r`` for the N elements of a shared x and gives each party its
share of ``r`` and its half of a DCF gate key (``dcf.gate_keygen``).  Online the parties
open ``y = x + r`` (ONE round, which other openings may share) and each evaluates its key
at ``y`` locally: shares of ``[x >= t]`` and ``x·[x >= t]`` for any public thresholds t
(one key per element serves them all), hence ReLU, the sign, range tests and the piece
indicators of splines.  Against the carry-tree comparison (``compare``: 4 rounds + 1) it
trades rounds for dealer material (about 0.6-2 KB per element and party) and local AES.

Tuple kind (``fss_gate``), party half and dealer half:

* unlike CrypTen's kinds, both parties need the dealer's key, so every party fetches its
  own part (``fetched_by = "every"``); the bulk fetch of ``DealerProvider.prepare``
  includes them for party 1 too, and online draws fetch them one by one;
* the key of request ``seq`` of a session is a pure function of a dealer-private session
  secret, ``seq`` (the request's index in the program's trace, the same at both parties)
  and the request: either party may ask first, and the parties' seeded streams are not
  touched, so their replay order is the same as without FSS;
* the dealer keeps the other party's half of a generated pair until it is asked for
  (:class:`KeyCache`, bounded; an evicted half is regenerated), hands each rank its half
  of each request once, and drops a session's keys when it closes or expires.

Under CrypTen's trusted-first-party provider both parties derive the same key pair from
CrypTen's shared ``global`` generator and keep their own half: no dealer, no traffic, and
as insecure as the rest of TFP (each party could compute the other's key).

Exactness window.  A gate compares ``x - t`` on ``bits`` bits after dropping ``shift`` low
bits (``dcf`` module doc): the result is exact for ``x - t`` in
``[-2^(shift+bits-1), 2^(shift+bits-1) - 2^shift]`` except that ``x - t`` in
``(-2^shift, 0)`` may read as non-negative.  The secure functions use

* ``bits = 64`` for :func:`ltz` (exact on the whole ring);
* the plan's ``fss_bits`` (default 32), ``shift = 0`` for ReLU and the max: exact for
  ``|x| < 2^(fss_bits-1)`` fixed-point units, i.e. below 2^15 = 32768 at 32 bits.  Every such
  input in the ViT is a linear layer's output or a difference of attention scores: a
  truncated product.  CrypTen truncates a product of real value v wrongly with
  probability about ``|v|·2^-31`` (docs/gelu.md), so at |v| >= 2^15 one element in 2^16 is
  already garbage: a model whose activations reach the bound does not run correctly under
  CrypTen's fixed point whatever the comparison;
* ``shift = SPLINE_SHIFT`` for spline breakpoints: an x within 2^shift units below a
  breakpoint is evaluated with the next piece's polynomial, which approximates the same
  function a hair outside its piece (the pieces are fitted a little beyond their ends);
* range tests (LayerNorm, division) a width that covers their documented input range.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..compat import import_crypten
from . import dcf, fused
from .tuples import Correction, TupleKind, TupleRequest, register

if TYPE_CHECKING:
    from crypten.encoder import FixedPointEncoder

Tensor = Any  # crypten MPCTensor

KIND = "fss_gate"
MAX_KEY_BYTES = 1 << 29  # one request's key per party (512 MiB; the reply limit is 1 GiB)
REQUEST_KEY_BYTES = 1 << 26  # a gate asks for its keys in requests of at most this size
CACHE_BYTES = 1 << 30  # pending key halves a dealer keeps at once; oldest go first
SPLINE_SHIFT = 8  # low bits dropped by spline breakpoint comparisons (module doc)
_U64 = np.uint64


# ------------------------------------------------------------------------------ requests


def gate_request(n: int, degree: int, bits: int, shift: int = 0) -> TupleRequest:
    """The request for gate keys of ``degree`` over ``n`` elements."""
    opts = {"bits": int(bits), "degree": int(degree), "shift": int(shift)}
    return TupleRequest(KIND, (int(n),), (), "", json.dumps(opts, sort_keys=True))


def _gate_options(req: TupleRequest) -> tuple[int, int, int]:
    opts = req.options()
    try:
        degree, bits, shift = opts["degree"], opts["bits"], opts["shift"]
    except KeyError:
        raise ValueError("an FSS gate request needs 'degree', 'bits' and 'shift'") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (degree, bits, shift)):
        raise ValueError("FSS gate options must be integers")
    return degree, bits, shift


def key_bytes(n: int, degree: int, bits: int) -> int:
    """Bytes of one party's key for ``n`` elements: the gate key, and the mask share when
    the key does not carry it (degree 0)."""
    return n * (dcf.gate_key_bytes(degree, bits) + (8 if degree == 0 else 0))


def make_keys(material: bytes, n: int, degree: int, bits: int, shift: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """Both parties' key blobs (int64 words, zero-padded) for one gate over ``n``
    elements, a pure function of ``material``: the mask ``r``, every seed and every share
    split come from one AES-CTR stream keyed by it (``dcf.KeyStream``)."""
    stream = dcf.KeyStream(int.from_bytes(hashlib.sha256(material).digest(), "little"))
    r = stream.words((n,))
    keys = dcf.gate_keygen(r, degree, bits, shift, rng=stream)
    masks: list[np.ndarray | None] = [None, None]
    if degree == 0:  # the key carries no share of r: add it
        r0 = stream.words((n,))
        masks = [r0, r - r0]
    size = key_bytes(n, degree, bits)
    blobs = []
    for rank, key in enumerate(keys):
        blob = np.zeros(-(-size // 8), np.int64)
        raw = blob.view(np.uint8)
        mask = masks[rank]
        offset = 0 if mask is None else 8 * n
        if mask is not None:
            raw[:offset] = mask.astype("<u8", copy=False).view(np.uint8)
        dcf.serialize_gate_key_into(key, raw[offset:])
        blobs.append(blob)
    return blobs[0], blobs[1]


def parse_key(blob: torch.Tensor, rank: int, req: TupleRequest
              ) -> tuple[torch.Tensor, dcf.GateKey]:
    """This party's mask share (n,) int64 and gate key from its blob."""
    degree, bits, shift = _gate_options(req)
    n = req.size0[0]
    raw = blob.numpy().view(np.uint8)
    if raw.size < key_bytes(n, degree, bits):
        raise ValueError("FSS key blob is shorter than its request")
    offset = 8 * n if degree == 0 else 0
    key = dcf.deserialize_gate_key(raw[offset:key_bytes(n, degree, bits)], rank, degree, bits,
                                   shift)
    mask = raw[:offset].view(_U64) if degree == 0 else dcf.mask_share(key)
    return torch.from_numpy(np.ascontiguousarray(mask).view(np.int64)), key


class FssGate(TupleKind):
    """Gate keys (``dcf.gate_keygen``) for one opening of n elements; each party fetches
    its own (mask share, key) from the dealer."""

    name = KIND
    fetched_by = "every"

    def validate(self, req: TupleRequest, dealer: Any = None) -> None:
        degree, bits, shift = _gate_options(req)
        if not 0 <= degree <= 2 or not 2 <= bits <= 64 or not 0 <= shift <= 64 - bits:
            raise ValueError(f"bad FSS gate: degree {degree}, bits {bits}, shift {shift}")
        if len(req.size0) != 1 or req.size1 or req.size0[0] < 0:
            raise ValueError("FSS gate keys are a flat run of elements")
        if key_bytes(req.size0[0], degree, bits) > MAX_KEY_BYTES:
            raise ValueError("FSS gate request too large")

    def draw(self, g: torch.Generator, req: TupleRequest,
             correction: Correction) -> tuple[Any, ...]:
        if correction is None:
            raise ValueError("FSS gate keys come from the dealer to every party")
        return (correction(),)  # parsed at use (:func:`draw_key`), where the rank is known

    def keyed_share(self, dealer: Any, session: str, secret: bytes, seq: int, rank: int,
                    req: TupleRequest) -> torch.Tensor:
        degree, bits, shift = _gate_options(req)
        material = b"|".join([secret, str(seq).encode(), req.kind.encode(),
                              str(req.size0[0]).encode(), req.kwargs_json.encode()])
        blob = dealer.keys.take(session, seq, rank, lambda: make_keys(
            material, req.size0[0], degree, bits, shift))
        return torch.from_numpy(blob)

    def result_elements(self, req: TupleRequest) -> int:
        degree, bits, _ = _gate_options(req)
        return -(-key_bytes(req.size0[0], degree, bits) // 8)


register(FssGate())


class KeyCache:
    """The dealer's generated key halves not yet handed out, least recent first out beyond
    ``max_bytes`` (an evicted half is regenerated on demand: generation is deterministic).

    Each (session, request, rank) is served once; :meth:`drop` forgets a session."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.held = 0
        self._pending: collections.OrderedDict[tuple[str, int], list[np.ndarray | None]] = (
            collections.OrderedDict())
        self._served: dict[str, set[tuple[int, int]]] = {}
        self._generating: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def take(self, session: str, seq: int, rank: int,
             make: Callable[[], Sequence[np.ndarray]]) -> np.ndarray:
        """``rank``'s half of request ``seq``: cached, else generated by ``make`` (which
        returns every rank's half; the others are kept for their owners)."""
        with self._lock:
            served = self._served.setdefault(session, set())
            if (seq, rank) in served:
                raise PermissionError(f"FSS key {seq} of rank {rank} was already handed out")
            served.add((seq, rank))
            generating = self._generating.setdefault(session, threading.Lock())
        with generating:  # one generation per request even when both parties ask at once
            with self._lock:
                halves = self._pending.pop((session, seq), None)
                if halves is not None:
                    self.held -= _nbytes(halves)
            if halves is None:
                halves = list(make())
            mine, halves[rank] = halves[rank], None
            self._keep(session, seq, halves)
        assert mine is not None
        return mine

    def _keep(self, session: str, seq: int, halves: list[np.ndarray | None]) -> None:
        with self._lock:
            served = self._served.get(session)
            if served is None:  # the session closed meanwhile
                return
            for r in range(len(halves)):
                if (seq, r) in served:
                    halves[r] = None
            size = _nbytes(halves)
            if size == 0 or size > self.max_bytes:
                return
            self._pending[(session, seq)] = halves
            self.held += size
            while self.held > self.max_bytes:
                _, old = self._pending.popitem(last=False)
                self.held -= _nbytes(old)

    def drop(self, session: str) -> None:
        """Forget a closed or expired session's keys."""
        with self._lock:
            self._served.pop(session, None)
            self._generating.pop(session, None)
            for key in [k for k in self._pending if k[0] == session]:
                self.held -= _nbytes(self._pending.pop(key))


def _nbytes(halves: Sequence[np.ndarray | None]) -> int:
    return sum(h.nbytes for h in halves if h is not None)


# ------------------------------------------------------------------------------ party side


def _rank() -> int:
    return import_crypten().communicator.get().get_rank()


def draw_key(n: int, degree: int, bits: int, shift: int = 0
             ) -> tuple[torch.Tensor, dcf.GateKey]:
    """This party's mask share and gate key for ``n`` elements: from the dealer, or under
    CrypTen's trusted-first-party provider derived by both parties from CrypTen's shared
    ``global`` generator (module doc)."""
    crypten = import_crypten()
    provider = crypten.mpc.get_default_provider()
    req = gate_request(n, degree, bits, shift)
    rank = _rank()
    if hasattr(provider, "draw_tuple"):
        (blob,) = provider.draw_tuple(req)
        return parse_key(blob, rank, req)
    g = crypten.generators["global"][torch.device("cpu")]
    seed = torch.randint(-(2**63), 2**63 - 1, (4,), dtype=torch.long, generator=g)
    blobs = make_keys(seed.numpy().tobytes(), n, degree, bits, shift)
    return parse_key(torch.from_numpy(blobs[rank]), rank, req)


class Gate:
    """One gate over the elements of a shared tensor: its opening ``x + r`` is one
    :data:`fused.Part`'s tensor, and once opened it is evaluated at any thresholds.

    Its keys come in requests of at most ``REQUEST_KEY_BYTES`` (a large batch's tensor
    takes several), so that no dealer reply or bulk-fetch batch grows with the input."""

    def __init__(self, share: torch.Tensor, degree: int, bits: int, shift: int = 0) -> None:
        self.shape = share.shape
        self.n = share.numel()
        self.degree = degree
        per = max(1, REQUEST_KEY_BYTES // max(1, key_bytes(1, degree, bits)))
        self.keys, masks = [], []
        for start in range(0, self.n, per):
            mask, key = draw_key(min(per, self.n - start), degree, bits, shift)
            masks.append(mask)
            self.keys.append((start, key))
        mask = torch.cat(masks) if len(masks) > 1 else (masks[0] if masks else share.new_zeros(0))
        self.opening = share.reshape(-1) + mask
        self.rank = _rank()

    def indicators(self, y: torch.Tensor, thresholds: Sequence[int]) -> np.ndarray:
        """Shares (d+1, P, n) uint64 of ``r^j [x >= t_k]`` (``dcf.threshold_eval``)."""
        t = np.array([int(v) for v in thresholds], dtype=object)
        words = y.reshape(-1).numpy()
        parts = [dcf.threshold_eval(self.rank, key, words[start:start + key.count], t)
                 for start, key in self.keys]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.zeros((self.degree + 1, len(t), 0), _U64)
        return np.concatenate(parts, axis=2)

    def ge(self, y: torch.Tensor, thresholds: Sequence[int]
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Shares of ``[x >= t_k]`` and (degree >= 1) of ``x·[x >= t_k]``, each (P, n)
        int64."""
        ind = self.indicators(y, thresholds)
        bit = _torch(ind[0])
        if self.degree == 0:
            return bit, None
        y_u = y.reshape(-1).numpy().view(_U64)
        return bit, _torch(y_u[None, :] * ind[0] - ind[1])


def _torch(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words).view(np.int64))


def _mpc(share: torch.Tensor, encoder: FixedPointEncoder | None = None) -> Tensor:
    """An MPCTensor from raw shares, at integer scale or with ``encoder``."""
    from crypten.mpc import MPCTensor

    out = MPCTensor.from_shares(share, precision=0)
    if encoder is not None:
        out.encoder = encoder
    return out


def sign_part(x: Tensor, bits: int = 64) -> fused.Part:
    """``[x < 0]`` as CrypTen's integer-scale bits, as a :data:`fused.Part` (one opening)."""
    gate = Gate(x._tensor.share, 0, bits)

    def finish(vals: list[torch.Tensor]) -> Tensor:
        ge, _ = gate.ge(vals[0], [0])
        below = -ge[0]
        if gate.rank == 0:
            below += 1
        return _mpc(below.reshape(gate.shape))

    return [gate.opening], finish


def relu_part(x: Tensor, bits: int, shift: int = 0) -> fused.Part:
    """``relu(x)`` (x's encoder) as a :data:`fused.Part`: one opening."""
    gate = Gate(x._tensor.share, 1, bits, shift)

    def finish(vals: list[torch.Tensor]) -> Tensor:
        _, ge_x = gate.ge(vals[0], [0])
        return _mpc(ge_x[0].reshape(gate.shape), x.encoder)

    return [gate.opening], finish


def thresholds_part(x: Tensor, thresholds: Sequence[float], bits: int, shift: int = 0
                    ) -> fused.Part:
    """``(ge, ge_x)`` with ``ge[k] = [x >= t_k]`` (integer-scale bits) and
    ``ge_x[k] = ge[k]·x`` (x's encoder), each of shape (P, *x.shape), for public real
    thresholds, as a :data:`fused.Part`: one opening, one key per element of x."""
    gate = Gate(x._tensor.share, 1, bits, shift)
    scale = x.encoder.scale
    ring_t = [round(float(t) * scale) for t in thresholds]

    def finish(vals: list[torch.Tensor]) -> tuple[Tensor, Tensor]:
        ge, ge_x = gate.ge(vals[0], ring_t)
        shape = (len(ring_t), *gate.shape)
        return _mpc(ge.reshape(shape)), _mpc(ge_x.reshape(shape), x.encoder)

    return [gate.opening], finish


def ltz(x: Tensor) -> Tensor:
    """``[x < 0]`` (integer-scale bits), exact on the whole ring: one round."""
    return fused.in_one_round([sign_part(x)])[0]


def relu(x: Tensor, bits: int) -> Tensor:
    """``relu(x)``, exact for ``|x| < 2^(bits-1)`` fixed-point units: one round."""
    return fused.in_one_round([relu_part(x, bits)])[0]
