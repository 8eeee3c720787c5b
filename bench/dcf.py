"""Micro-benchmark of the FSS comparison layer (``python -m mpcvit.bench.dcf``).

Times DCF key generation (both keys) and evaluation (per party) for several input widths
and payload sizes, next to the raw fixed-key AES work the evaluation must do (the same
number of blocks through the same PRG, measured in the same run), then the sign/ReLU gates
at full and reduced width, the spline gates (one key per element evaluated at the GeLU and
exp breakpoints, with the walk shared by an element's points, against one walk per point
in the same run), and the sign error rate of reduced-width gates on N(0, 1) activations at
scale 2^16.  Everything runs on one core; times are the best of
``--repeats`` runs in CPU time of the thread (on an idle machine the same as wall-clock
time, and robust when other jobs share the cores; the JSON also has wall-clock times).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

import numpy as np

from ..mpc.protocols import dcf as fss
from ..mpc.protocols import splines

SPLINE_WINDOW = (24, 8)  # bits, shift of spline comparisons under the default plan (fss.py)
SPLINES = {"gelu": splines.GELU_BREAKS, "exp": splines.EXP_BREAKS}

U64 = np.uint64


_WALL: list[float] = []  # wall-clock seconds of the last _best call


def _best(fn: Callable[[], object], repeats: int) -> float:
    """Best CPU seconds of ``repeats`` calls (the best wall-clock time goes to ``_WALL``)."""
    best, wall = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        fn()
        best = min(best, time.thread_time() - cpu)
        wall = min(wall, time.perf_counter() - start)
    _WALL[:] = [wall]
    return best


def _aes_seconds(prg: fss.AesPrg, blocks: int, repeats: int) -> float:
    """Raw AES-ECB time for ``blocks`` blocks in chunks of the evaluation's lane count."""
    lanes = fss._EVAL_LANES
    data = np.zeros((lanes, 2), dtype=U64)
    out = fss._Blocks(lanes)
    calls, rest = divmod(blocks, lanes)
    enc = prg._seed

    def run() -> None:
        for _ in range(calls):
            enc.update_into(data.reshape(-1).view(np.uint8), out.raw)
        if rest:
            enc.update_into(data[:rest].reshape(-1).view(np.uint8), out.raw[: 16 * rest + 15])

    return _best(run, repeats)


def dcf_row(n: int, k: int, count: int, repeats: int, rng: np.random.Generator,
            prg: fss.AesPrg) -> dict:
    """Keygen and evaluation time per element for one (n, k, N)."""
    alpha = rng.integers(0, 1 << 64, size=count, dtype=U64) >> U64(64 - n)
    beta = rng.integers(0, 1 << 64, size=(count, k), dtype=U64)
    z = rng.integers(0, 1 << 64, size=count, dtype=U64) >> U64(64 - n)
    keys: list = []
    gen = _best(lambda: keys.append(fss.dcf_keygen(alpha, beta, n, rng, prg)),
                max(1, repeats - 1))
    k0, k1 = keys[-1]
    gen_wall = _WALL[0]
    eval0 = _best(lambda: fss.dcf_eval(k0, z, prg), repeats)
    eval1 = _best(lambda: fss.dcf_eval(k1, z, prg), repeats)
    eval_wall = _WALL[0]
    blocks = count * (n + 1) * (1 + (k + 1) // 2) - count  # no seed block at the leaf
    aes = _aes_seconds(prg, blocks, repeats)
    evaluation = (eval0 + eval1) / 2
    return {"n": n, "k": k, "N": count,
            "keygen_us": 1e6 * gen / count, "eval_us": 1e6 * evaluation / count,
            "aes_us": 1e6 * aes / count, "eval_over_aes": evaluation / aes,
            "key_bytes": fss.dcf_key_bytes(n, k),
            "keygen_wall_us": 1e6 * gen_wall / count, "eval_wall_us": 1e6 * eval_wall / count}


def gate_row(kind: str, bits: int, count: int, repeats: int, rng: np.random.Generator,
             prg: fss.AesPrg) -> dict:
    """Sign or ReLU gate (keygen from the mask, evaluation from the opened value)."""
    degree = 0 if kind == "sign" else 1
    r = rng.integers(0, 1 << 64, size=count, dtype=U64)
    y = rng.integers(0, 1 << 64, size=count, dtype=U64)
    keys: list = []
    gen = _best(lambda: keys.append(fss.gate_keygen(r, degree, bits, 0, rng, prg)),
                max(1, repeats - 1))
    k0, _ = keys[-1]
    evaluate = fss.msb_eval if kind == "sign" else fss.relu_eval
    ev = _best(lambda: evaluate(0, k0, y, prg), repeats)
    return {"gate": kind, "bits": bits, "N": count, "keygen_us": 1e6 * gen / count,
            "eval_us": 1e6 * ev / count, "key_bytes": fss.gate_key_bytes(degree, bits)}


def walked_levels(y: np.ndarray, thresholds: list[int], bits: int, shift: int) -> float:
    """Tree levels walked per element when an element's points share the levels on which
    they all agree (``dcf._eval_chunk``): n for the first point, n - D for each other."""
    n = bits - 1
    t = np.array([v % (1 << 64) for v in thresholds], dtype=U64)
    z = fss.reduce_bits(y[None, :] - t[:, None], shift, bits) & U64((1 << n) - 1)
    spread = np.zeros(y.shape, U64)
    for row in z[1:]:
        spread |= row ^ z[0]
    depth = n - fss._bit_length(spread)
    return float(n + (len(thresholds) - 1) * np.mean(n - depth))


def spline_row(name: str, count: int, repeats: int, rng: np.random.Generator,
               prg: fss.AesPrg) -> dict:
    """A degree-1 gate evaluated at a spline's breakpoints (x at scale 2^16): the shared
    walk against one evaluation per breakpoint, same keys, same run."""
    bits, shift = SPLINE_WINDOW
    thresholds = [round(t * 2**16) for t in SPLINES[name]]
    r = rng.integers(0, 1 << 64, size=count, dtype=U64)
    x = np.round(rng.standard_normal(count) * 2**17).astype(np.int64)
    y = x.view(U64) + r
    keys: list = []
    gen = _best(lambda: keys.append(fss.gate_keygen(r, 1, bits, shift, rng, prg)),
                max(1, repeats - 1))
    k0, _ = keys[-1]
    shared = _best(lambda: fss.threshold_eval(0, k0, y, thresholds, prg), repeats)
    separate = _best(lambda: [fss.threshold_eval(0, k0, y, [t], prg) for t in thresholds],
                     repeats)
    return {"spline": name, "points": len(thresholds), "bits": bits, "shift": shift,
            "N": count, "keygen_us": 1e6 * gen / count, "eval_us": 1e6 * shared / count,
            "separate_us": 1e6 * separate / count, "speedup": separate / shared,
            "levels": walked_levels(y, thresholds, bits, shift),
            "levels_separate": len(thresholds) * (bits - 1)}


def error_row(bits: int, shift: int, count: int, rng: np.random.Generator,
              prg: fss.AesPrg) -> dict:
    """Reduced-width sign/ReLU on x = round(N(0,1) 2^16): error rates of the real gates."""
    x = np.round(rng.standard_normal(count) * 2**16).astype(np.int64)
    r = rng.integers(0, 1 << 64, size=count, dtype=U64)
    y = x.view(U64) + r
    k0, k1 = fss.relu_keygen(r, bits, shift, rng, prg)
    msb = (fss.msb_eval(0, k0, y, prg) + fss.msb_eval(1, k1, y, prg)).view(np.int64)
    relu = (fss.relu_eval(0, k0, y, prg) + fss.relu_eval(1, k1, y, prg)).view(np.int64)
    error = np.abs(relu - np.maximum(x, 0))
    safe = (1 << (shift + bits - 1)) - (1 << shift)
    return {"bits": bits, "shift": shift, "N": count,
            "in_safe_range": float(np.mean(np.abs(x) <= safe)),
            "sign_error_rate": float(np.mean(msb != (x < 0))),
            "relu_max_error_ulps": int(error.max()), "relu_mean_error_ulps": float(error.mean()),
            "key_bytes": fss.gate_key_bytes(1, bits)}


def run(sizes: list[int], widths: list[int], payloads: list[int], repeats: int,
        seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prg = fss.AesPrg()
    result = {"aes_gb_per_s": prg.throughput(), "dcf": [], "gates": [], "splines": [],
              "reduced": []}
    for count in sizes:
        for n in widths:
            for k in payloads:
                result["dcf"].append(dcf_row(n, k, count, repeats, rng, prg))
    big = max(sizes)
    for kind in ("sign", "relu"):
        for bits in widths:
            result["gates"].append(gate_row(kind, bits, big, repeats, rng, prg))
    for name in SPLINES:
        result["splines"].append(spline_row(name, big, repeats, rng, prg))
    for bits, shift in ((32, 0), (24, 8), (16, 8), (16, 12), (12, 12)):
        result["reduced"].append(error_row(bits, shift, min(big, 1 << 16), rng, prg))
    return result


def _print(result: dict) -> None:
    print(f"fixed-key AES-128 (cryptography/OpenSSL, ECB): {result['aes_gb_per_s']:.2f} GB/s "
          "on one core; times below are per element, CPU time of one core")
    print("\nDCF: keygen = both keys; eval = one party; aes = raw AES for the blocks eval needs")
    print(f"{'n':>3}{'k':>3}{'N':>8}{'keygen us/el':>14}{'eval us/el':>12}{'aes us/el':>11}"
          f"{'eval/aes':>10}{'key B/el':>10}")
    for row in result["dcf"]:
        print(f"{row['n']:>3}{row['k']:>3}{row['N']:>8}{row['keygen_us']:>14.3f}"
              f"{row['eval_us']:>12.3f}{row['aes_us']:>11.3f}{row['eval_over_aes']:>10.2f}"
              f"{row['key_bytes']:>10}")
    print("\nGates (DCF on bits-1 bits; eval = one party, from the opened y)")
    print(f"{'gate':>5}{'bits':>6}{'N':>8}{'keygen us/el':>14}{'eval us/el':>12}{'key B/el':>10}")
    for row in result["gates"]:
        print(f"{row['gate']:>5}{row['bits']:>6}{row['N']:>8}{row['keygen_us']:>14.3f}"
              f"{row['eval_us']:>12.3f}{row['key_bytes']:>10}")
    print("\nSpline gates: one degree-1 key per element at every breakpoint (eval = one party; "
          "separate = one evaluation per breakpoint, same keys; levels = tree levels walked "
          "per element)")
    print(f"{'spline':>7}{'points':>7}{'bits':>5}{'N':>8}{'eval us/el':>12}{'separate':>10}"
          f"{'speedup':>9}{'levels':>8}{'of':>5}")
    for row in result["splines"]:
        print(f"{row['spline']:>7}{row['points']:>7}{row['bits']:>5}{row['N']:>8}"
              f"{row['eval_us']:>12.3f}{row['separate_us']:>10.3f}{row['speedup']:>9.2f}"
              f"{row['levels']:>8.1f}{row['levels_separate']:>5}")
    print("\nReduced width (comparison on floor(y/2^f) mod 2^m), x = round(N(0,1) * 2^16)")
    print(f"{'m':>3}{'f':>4}{'in range':>10}{'sign err':>10}{'relu max ulps':>15}"
          f"{'relu mean ulps':>16}{'key B/el':>10}")
    for row in result["reduced"]:
        print(f"{row['bits']:>3}{row['shift']:>4}{row['in_safe_range']:>10.4f}"
              f"{row['sign_error_rate']:>10.4f}{row['relu_max_error_ulps']:>15}"
              f"{row['relu_mean_error_ulps']:>16.2f}{row['key_bytes']:>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="14,17", help="log2 of element counts")
    parser.add_argument("--bits", default="64,32,24,16", help="DCF input widths n")
    parser.add_argument("--payload", default="1,2,3", help="payload words k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args(argv)
    result = run([1 << int(s) for s in args.sizes.split(",")],
                 [int(b) for b in args.bits.split(",")],
                 [int(k) for k in args.payload.split(",")], args.repeats)
    _print(result)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
