"""Carry-tree comparisons against FSS comparisons, per op and per model
(``python -m mpcvit.bench.fss``).

Per op: every secure building block that compares, at one layer's real shapes (batch 1),
under protocol plans that differ only in that block's variants.  Each op is measured as
the profiler measures blocks (``models.profiler.measure``): a warm-up records the dealer
trace, then every repeat is prepared offline and timed online (median).  Rounds and bytes
are party 0's CrypTen counts; ``offline_bytes`` is the dealer material each party received
for the op (party 0: corrections and its FSS keys; party 1: its FSS keys).

Whole model (``--whole``): a ``vit_7_4_32``-shaped secure ViT with random weights, image by
image, under each plan (``models.profiler.measure_secure_model``), and the WAN preset's
prediction from the loopback figures (``mpc.netem``: bytes over the bandwidth plus RTT/2
per round); ``mpcvit bench network --protocol ...`` measures the emulated link itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

import torch

from ..mpc.protocols.plan import PLANS, ProtocolPlan

CARRY = PLANS["default"]
FSS = ProtocolPlan(comparison="fss")
FSS_SPLINES = PLANS["fss"]

# op -> {label: plan}; the first plan is the baseline of the op's ratios
OP_PLANS: dict[str, dict[str, ProtocolPlan]] = {
    "relu": {"carry": CARRY, "fss": FSS},
    "ltz": {"carry": CARRY, "fss": FSS},
    "gelu": {"carry/poly": CARRY, "fss/poly": FSS, "fss/spline": FSS.replace(gelu="spline"),
             "carry/spline": CARRY.replace(gelu="spline")},
    "row_max": {"carry": CARRY, "fss": FSS},
    "exp": {"square": CARRY, "fss/spline": FSS.replace(exp="spline")},
    "divide": {"carry/poly": CARRY, "fss/poly": FSS,
               "fss/spline": FSS.replace(reciprocal="spline")},
    "softmax": {"carry": CARRY, "fss": FSS, "fss/splines": FSS_SPLINES},
    "relu_softmax": {"carry": CARRY, "fss": FSS, "fss/splines": FSS_SPLINES},
    "layer_norm": {"carry": CARRY, "fss": FSS, "fss/spline": FSS.replace(rsqrt="spline")},
}


def ops_party(config_dict: dict[str, Any], ops_wanted: list[str], repeats: int
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Party program: every op of ``ops_wanted`` under each of its plans."""
    from mpcvit.models import ops
    from mpcvit.models.configs import ViTConfig
    from mpcvit.models.profiler import measure
    from mpcvit.mpc.compat import import_crypten
    from mpcvit.mpc.protocols import functions

    crypten = import_crypten()
    cfg = ViTConfig.from_dict(config_dict)
    n, h = cfg.num_tokens, cfg.heads
    g = torch.Generator().manual_seed(0)

    def enc(t: torch.Tensor) -> Any:
        return crypten.cryptensor(t, src=0)

    hidden = enc(torch.randn(1, n, cfg.mlp_hidden, generator=g) * 1.5)
    scores = enc(torch.randn(1, h, n, n, generator=g) * 2)
    shifted = enc(-torch.rand(1, h, n, n, generator=g) * 10)
    rows = enc(torch.rand(1, h, n, 1, generator=g) * n + 1)
    tokens = enc(torch.randn(1, n, cfg.dim, generator=g) * 3)
    calls = {
        "relu": lambda p: ops.relu(hidden, p),
        "ltz": lambda p: ops.ltz(hidden, p),
        "gelu": lambda p: ops.gelu(hidden, p),
        "row_max": lambda p: ops.row_max(scores, p),
        "exp": lambda p: functions.exp_nonpositive(shifted, protocol=p),
        "divide": lambda p: ops.divide(shifted, rows, lo=0, hi=8, protocol=p),
        "softmax": lambda p: ops.softmax(scores, protocol=p),
        "relu_softmax": lambda p: ops.relu_softmax(scores, protocol=p),
        "layer_norm": lambda p: ops.layer_norm(tokens, None, None, cfg.ln_eps, p),
    }
    out: dict[str, dict[str, dict[str, float]]] = {}
    for op in ops_wanted:
        out[op] = {label: measure(lambda c=calls[op], p=plan: c(p), repeats).to_dict()
                   for label, plan in OP_PLANS[op].items()}
    return out


def bench_ops(config_name: str, ops_wanted: list[str], repeats: int) -> dict[str, Any]:
    """Both parties' figures per op and plan (see the module doc)."""
    from mpcvit.models.configs import get_config
    from mpcvit.mpc.launcher import run_parties

    cfg = get_config(config_name)
    p0, p1 = run_parties(ops_party, cfg.to_dict(), ops_wanted, repeats, provider="dealer",
                         timeout=7200)
    for op, plans in p0.items():
        for label, row in plans.items():
            row["offline_bytes_p1"] = p1[op][label]["offline_bytes"]
    return {"model": config_name, "ops": p0}


def bench_whole(config_name: str, arch: str, plans: dict[str, ProtocolPlan], images: int
                ) -> dict[str, Any]:
    """A whole secure model under each plan: party 0's rounds, bytes, median online
    seconds on loopback, each party's median CPU seconds, dealer material, and the WAN
    preset's prediction."""
    from mpcvit.models.configs import get_config
    from mpcvit.models.profiler import secure_forward_party, secure_run
    from mpcvit.models.spec import ArchSpec
    from mpcvit.mpc.launcher import run_parties
    from mpcvit.mpc.netem import PRESETS

    cfg = get_config(config_name)
    spec = ArchSpec.parse(arch, cfg.depth, cfg.heads)
    x = torch.randn(images, cfg.in_chans, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {}
    for label, plan in plans.items():
        res = run_parties(secure_forward_party, cfg.to_dict(), spec.to_dict(), None, x,
                          protocol_dict=plan.to_dict(), provider="dealer", timeout=7200)
        c = secure_run(res[0]["rows"]).cost
        cpu = [statistics.median(r["cpu_s"] for r in party["rows"]) for party in res]
        p1_bytes = statistics.median(r["offline_bytes"] for r in res[1]["rows"])
        out[label] = {"rounds": c.rounds, "bytes": c.bytes, "online_s": c.compute_s,
                      "cpu_s": cpu, "offline_bytes": [c.offline_bytes, p1_bytes],
                      "plan": plan.describe(),
                      "wan_predicted_s": c.compute_s
                      + PRESETS["wan"].mpc_seconds(c.bytes, c.rounds)}
        print(f"  {arch} {label}: {c.rounds:.0f} rounds, {c.bytes / 1e6:.1f} MB, "
              f"{c.compute_s:.2f} s online on loopback (CPU s {cpu[0]:.2f} / {cpu[1]:.2f}), "
              f"dealer material {c.offline_bytes / 1e6:.1f} / {p1_bytes / 1e6:.1f} MB; "
              f"WAN predicted {out[label]['wan_predicted_s']:.2f} s", flush=True)
    return out


def _print_ops(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: per op, batch 1 (party 0's rounds and MB sent; online ms on "
          "loopback, median; dealer MB received by party 0 / party 1)")
    print(f"{'op':<14}{'variant':<14}{'rounds':>7}{'MB':>9}{'ms':>9}{'x base':>8}"
          f"{'dealer MB p0':>14}{'p1':>8}")
    for op, plans in res["ops"].items():
        base = next(iter(plans.values()))["compute_s"]
        for label, r in plans.items():
            ratio = r["compute_s"] / base if base else float("nan")
            print(f"{op:<14}{label:<14}{r['rounds']:>7}{r['bytes'] / 1e6:>9.2f}"
                  f"{r['compute_s'] * 1e3:>9.1f}{ratio:>8.2f}{r['offline_bytes'] / 1e6:>14.2f}"
                  f"{r['offline_bytes_p1'] / 1e6:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,vit_7_4_32", help="configs for the ops")
    parser.add_argument("--ops", default=",".join(OP_PLANS), help="ops to measure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--whole", default="", help="whole-model archs, e.g. "
                        "softmax+gelu,scale+relu (vit_7_4_32; default: none)")
    parser.add_argument("--whole-model", default="vit_7_4_32")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--whole-plans", default="default,fss",
                        help="plans for the whole models: default (carry), fss (all FSS)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"ops": [], "whole": {}}
    ops_wanted = [o for o in args.ops.split(",") if o]
    unknown = set(ops_wanted) - set(OP_PLANS)
    if unknown:
        print(f"unknown ops {sorted(unknown)}; known: {list(OP_PLANS)}", file=sys.stderr)
        return 2
    for model in filter(None, args.models.split(",")):
        res = bench_ops(model, ops_wanted, args.repeats)
        _print_ops(res)
        result["ops"].append(res)
    for arch in filter(None, args.whole.split(",")):
        print(f"\nwhole model {args.whole_model} [{arch}], {args.images} images", flush=True)
        plans = {"default": CARRY, "fss": FSS_SPLINES}
        wanted = {p: plans[p] for p in args.whole_plans.split(",") if p in plans}
        result["whole"][arch] = bench_whole(args.whole_model, arch, wanted, args.images)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
