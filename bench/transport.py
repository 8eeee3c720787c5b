"""gRPC vs gloo on the same ViT-block-shaped MPC program (``mpcvit bench transport``)."""

from __future__ import annotations

from ..mpc.launcher import run_parties
from .workloads import block_workload


def compare_transports(
    provider: str = "tfp", repeats: int = 5, rounds_of_runs: int = 2, **shape: int
) -> dict:
    """Run the block over gloo and over gRPC, alternating, ``rounds_of_runs`` times each.

    Seconds are the best per-transport median of party 0 (after a warm-up block in
    every run); rounds and bytes are party 0's count for one block.
    """
    best: dict[str, dict] = {}
    for _ in range(rounds_of_runs):
        for backend in ("gloo", "grpc"):
            res = run_parties(block_workload, provider=provider, backend=backend,
                              repeats=repeats, **shape)[0]
            if backend not in best or res["seconds"] < best[backend]["seconds"]:
                best[backend] = res
    gloo, grpc = best["gloo"], best["grpc"]
    return {
        "provider": provider,
        "gloo_s": gloo["seconds"],
        "grpc_s": grpc["seconds"],
        "ratio": grpc["seconds"] / gloo["seconds"],
        "gloo_bytes": gloo["bytes"],
        "grpc_bytes": grpc["bytes"],
        "gloo_rounds": gloo["rounds"],
        "grpc_rounds": grpc["rounds"],
        "max_abs_diff": float((gloo["out"] - grpc["out"]).abs().max()),
    }
