"""Peak memory (RSS) of the dealer and both parties serving a model: what the Kubernetes
manifests' memory requests and limits are sized from (docs/deploy.md).

``python -m mpcvit.bench.memory [--model demo] [--max-batch 1] [--clients 8]`` starts the
three servers as local processes with the shipped configs, sends requests one at a time,
then from ``--clients`` concurrent clients, and prints each process's peak RSS (VmHWM)
after start-up, after the sequential and after the concurrent requests.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from pathlib import Path

import numpy as np
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.party.local import LocalCluster

WHO = ("dealer", 0, 1)


def peak_rss_mib(pid: int) -> dict[str, float]:
    """Peak and current resident set size of a process, MiB (Linux /proc)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0]) / 1024
    return {"peak": round(fields["VmHWM"], 1), "now": round(fields["VmRSS"], 1)}


def snapshot(cluster: LocalCluster) -> dict[str, dict[str, float]]:
    return {("dealer" if w == "dealer" else f"party{w}"): peak_rss_mib(cluster.procs[w].pid)
            for w in WHO}


def measure(model: str, max_batch: int, sequential: int, clients: int,
            per_client: int) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = LocalCluster(tmp, model=model,
                               party_overrides={"limits": {"max_batch": max_batch,
                                                           "max_wait": 0.05}})
        with cluster:
            cluster.wait_ready(300)
            out = {"model": model, "max_batch": max_batch, "started": snapshot(cluster)}
            with PrivateInferenceClient(cluster.party_addresses, timeout=300) as client:
                for _ in range(sequential):
                    client.infer(rng.integers(0, 256, (28, 28), dtype=np.uint8))
            out["sequential"] = snapshot(cluster)
            errors: list[BaseException] = []

            def worker(seed: int) -> None:
                r = np.random.default_rng(seed)
                try:
                    with PrivateInferenceClient(cluster.party_addresses, timeout=300) as c:
                        for _ in range(per_client):
                            c.infer(r.integers(0, 256, (28, 28), dtype=np.uint8))
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out["concurrent"] = snapshot(cluster)
            out["clients"], out["errors"] = clients, [repr(e) for e in errors]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="party 0's checkpoint (name or path)")
    p.add_argument("--max-batch", type=int, default=1)
    p.add_argument("--sequential", type=int, default=5, help="requests one at a time")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--per-client", type=int, default=2, help="requests per client")
    args = p.parse_args(argv)
    result = measure(args.model, args.max_batch, args.sequential, args.clients,
                     args.per_client)
    for stage in ("started", "sequential", "concurrent"):
        row = "  ".join(f"{who} {v['peak']:.0f}" for who, v in result[stage].items())
        print(f"{stage:<11} peak RSS MiB: {row}")
    print(json.dumps(result))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
