"""Throughput of the party service with and without batching (``mpcvit bench throughput``).

The real service (dealer + two party processes on this machine) is driven by N client
threads, each sending single-image requests back to back.  With ``max_batch > 1`` party
0 groups queued requests into one secure session, so the requests share its rounds and
per-operation overheads.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def measure(
    checkpoint: str, images: np.ndarray, clients: int, requests_per_client: int,
    max_batch: int, max_wait: float, provider: str = "dealer",
) -> dict:
    """Start a local cluster with the batching knobs, run the load, stop it."""
    from mpcvit.party.client import PrivateInferenceClient
    from mpcvit.party.local import LocalCluster

    limits = {"limits": {"max_batch": max_batch, "max_wait": max_wait,
                         "max_pending": max(256, 4 * clients)}}
    with tempfile.TemporaryDirectory(prefix="mpcvit-tput-") as tmp:
        cluster = LocalCluster(Path(tmp), model=checkpoint, provider=provider,
                               party_overrides=limits)
        cluster.start()
        try:
            cluster.wait_ready(600)
            latencies: list[float] = []
            batch_sizes: list[int] = []
            errors: list[str] = []
            lock = threading.Lock()
            start_gate = threading.Barrier(clients + 1)

            def client_loop(k: int) -> None:
                with PrivateInferenceClient(cluster.party_addresses, timeout=1800) as client:
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
                        with lock:
                            latencies.append(p.seconds)
                            batch_sizes.append(max(s.batch_size for s in p.stats))

            threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
            for t in threads:
                t.start()
            start_gate.wait()
            tic = time.perf_counter()
            for t in threads:
                t.join()
            wall = time.perf_counter() - tic
        finally:
            cluster.stop()
    done = len(latencies)
    return {
        "clients": clients, "max_batch": max_batch, "max_wait": max_wait,
        "requests": clients * requests_per_client, "completed": done, "errors": errors[:3],
        "images_per_s": done / wall if wall > 0 else 0.0, "wall_s": wall,
        "p50_s": _percentile(latencies, 50), "p95_s": _percentile(latencies, 95),
        "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 0.0,
    }


def throughput_table(checkpoint: str, data: str = "fashion-mnist",
                     client_counts=(1, 8, 32), requests_per_client: int = 2,
                     max_batch: int = 32, max_wait: float = 0.05,
                     provider: str = "dealer", progress=print) -> list[dict]:
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
