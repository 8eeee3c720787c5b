"""Throughput of the party service with and without batching (``mpcvit bench throughput``).

The real service (dealer + two party processes on this machine) is driven by N client
threads, each sending single-image requests back to back.  With ``max_batch > 1`` party
0 groups queued requests into one secure session, so the requests share its rounds and
per-operation overheads.

With ``--pairs 1,2`` it measures scaling out instead: P independent pairs (each with its
own dealer, as on Kubernetes), driven by N threads sharing one client
:class:`~mpcvit.party.pool.PairPool`, which sends each request to the serving pair with
the fewest of its requests in flight.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def measure(
    checkpoint: str, images: np.ndarray, clients: int, requests_per_client: int,
    max_batch: int, max_wait: float, provider: str = "dealer",
) -> dict:
    """Start a local cluster with the batching knobs, run the load, stop it."""
    from mpcvit.party.client import PrivateInferenceClient

    return measure_pairs(checkpoint, images, 1, clients, requests_per_client, max_batch,
                         max_wait, provider,
                         client_for=lambda c: PrivateInferenceClient(c[0].party_addresses,
                                                                     timeout=1800))


def measure_pairs(
    checkpoint: str, images: np.ndarray, pairs: int, clients: int, requests_per_client: int,
    max_batch: int, max_wait: float, provider: str = "dealer",
    client_for: Callable[[list[Any]], Any] | None = None, warmup: bool = False,
) -> dict:
    """Start ``pairs`` local clusters (dealer + two parties each), run the load, stop them.

    ``client_for(clusters)`` makes each client thread's client; by default every thread
    shares one PairPool over all the pairs.  ``warmup`` sends one untimed image to each
    pair first, so that no pair's first session (lazy set-up) falls in the timed part."""
    from mpcvit.party.client import PrivateInferenceClient
    from mpcvit.party.local import LocalCluster
    from mpcvit.party.pool import PairPool

    limits = {"limits": {"max_batch": max_batch, "max_wait": max_wait,
                         "max_pending": max(256, 4 * clients)}}
    with tempfile.TemporaryDirectory(prefix="mpcvit-tput-") as tmp:
        clusters = [LocalCluster(Path(tmp) / f"pair{k}", model=checkpoint, provider=provider,
                                 party_overrides=limits) for k in range(pairs)]
        pool = None
        try:
            for cluster in clusters:
                cluster.start()
            for cluster in clusters:
                cluster.wait_ready(600)
            for cluster in clusters if warmup else ():
                with PrivateInferenceClient(cluster.party_addresses, timeout=1800) as client:
                    client.infer(images[0], preprocessed=True)
            if client_for is None:
                shared = pool = PairPool([c.party_addresses for c in clusters], timeout=1800)
                make_client: Callable[[], Any] = lambda: contextlib.nullcontext(shared)  # noqa: E731
            else:
                make_client = lambda: client_for(clusters)  # noqa: E731
            load = _run_load(make_client, images, clients, requests_per_client)
        finally:
            if pool is not None:
                pool.close()
            for cluster in clusters:
                cluster.stop()
    done = len(load["latencies"])
    wall = load["wall"]
    return {
        "pairs": pairs, "clients": clients, "max_batch": max_batch, "max_wait": max_wait,
        "requests": clients * requests_per_client, "completed": done,
        "errors": load["errors"][:3], "images_per_s": done / wall if wall > 0 else 0.0,
        "wall_s": wall, "p50_s": _percentile(load["latencies"], 50),
        "p95_s": _percentile(load["latencies"], 95),
        "mean_batch": statistics.mean(load["batches"]) if load["batches"] else 0.0,
        "mb_per_image": statistics.mean(load["megabytes"]) if load["megabytes"] else 0.0,
        "per_pair": {str(k): n for k, n in sorted(load["per_pair"].items())},
    }


def _run_load(make_client: Callable[[], Any], images: np.ndarray, clients: int,
              requests_per_client: int) -> dict:
    """``clients`` threads, each sending its requests one after another; all start at once."""
    latencies: list[float] = []
    batches: list[int] = []
    megabytes: list[float] = []  # between the parties, per image (a session's / its batch)
    errors: list[str] = []
    per_pair: Counter = Counter()
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)

    def client_loop(k: int) -> None:
        with make_client() as client:
            client.model_info()
            start_gate.wait()
            for i in range(requests_per_client):
                x = images[(k * requests_per_client + i) % len(images)]
                try:
                    p = client.infer(x, preprocessed=True)
                except Exception as exc:  # reported, not hidden
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                batch = max(s.batch_size for s in p.stats)
                with lock:
                    latencies.append(p.seconds)
                    batches.append(batch)
                    megabytes.append(p.megabytes / max(1, batch))
                    per_pair[p.pair if p.pair is not None else 0] += 1

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    tic = time.perf_counter()
    for t in threads:
        t.join()
    return {"latencies": latencies, "batches": batches, "megabytes": megabytes,
            "errors": errors,
            "per_pair": per_pair, "wall": time.perf_counter() - tic}


def throughput_table(checkpoint: str, data: str = "fashion-mnist",
                     client_counts: Sequence[int] = (1, 8, 32), requests_per_client: int = 2,
                     max_batch: int = 32, max_wait: float = 0.05,
                     provider: str = "dealer",
                     progress: Callable[[str], object] = print) -> list[dict]:
    """One-at-a-time baseline (max_batch 1) and batched runs for each client count."""
    from mpcvit.models.data import load_dataset

    images = load_dataset(data).test.images[:64]
    rows = []
    runs = [(1, 1, 0.0)] + [(c, max_batch, max_wait) for c in client_counts]
    for clients, mb, mw in runs:
        n = requests_per_client if clients > 1 else max(requests_per_client, 3)
        row = measure(checkpoint, images, clients, n, mb, mw, provider)
        rows.append(row)
        progress(f"clients {clients:>3}  max_batch {mb:>3}: {row['images_per_s']:.2f} images/s, "
                 f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, "
                 f"mean batch {row['mean_batch']:.1f}, {row['completed']}/{row['requests']} ok")
    return rows


def pairs_table(checkpoint: str, data: str = "fashion-mnist",
                pair_counts: Sequence[int] = (1, 2), client_counts: Sequence[int] = (8,),
                requests_per_client: int = 4, max_batch: int = 32,
                max_wait: float = 0.05, provider: str = "dealer",
                progress: Callable[[str], object] = print) -> list[dict]:
    """Images/s for each number of pairs and of client threads; the ratio is against one
    pair with the same clients, measured in the same run."""
    from mpcvit.models.data import load_dataset

    images = load_dataset(data).test.images[:64]
    rows = []
    for clients in client_counts:
        base = None
        for pairs in pair_counts:
            row = measure_pairs(checkpoint, images, pairs, clients, requests_per_client,
                                max_batch, max_wait, provider, warmup=True)
            if pairs == 1:
                base = row["images_per_s"]
            row["vs_one_pair"] = row["images_per_s"] / base if base else float("nan")
            rows.append(row)
            progress(f"pairs {pairs}  clients {clients:>3}  max_batch {max_batch:>3}: "
                     f"{row['images_per_s']:.2f} images/s ({row['vs_one_pair']:.2f}x one "
                     f"pair), p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, mean batch "
                     f"{row['mean_batch']:.1f}, {row['mb_per_image']:.1f} MB/image between "
                     f"the parties, per pair {row['per_pair']}, "
                     f"{row['completed']}/{row['requests']} ok")
    return rows
