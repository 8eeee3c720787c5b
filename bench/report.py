"""Reproduce the secure-latency tables of docs/benchmarks.md.

``python -m mpcvit.bench.report --section models``: vit_7_4_32 (random weights, batch 1)
on loopback for every attention kind with GeLU and with ReLU, plus stock CrypTen.
``python -m mpcvit.bench.report --section networks``: softmax ViT, MPCViT mixes and
MPCViT+ on loopback, LAN and WAN (emulated links), with the stock-CrypTen baseline.
``python -m mpcvit.bench.report --section ceiling``: from a fresh block profile, how far
the speed-up of scale + ReLU over softmax + GeLU can go while every architecture keeps
paying for its LayerNorms and linear layers.
``python -m mpcvit.bench.report --section protocols``: the softmax ViT and the best
MPCViT+ spec of ``vit_7_4_32`` and the demo (random weights, batch 1) under the default
protocol plan and under the plan chosen for each network (``models/planner.py``, from a
profile with every variant), on loopback, LAN and WAN (emulated links), in one run.
Prints Markdown tables; every figure comes from a run made by this command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..mpc.launcher import run_parties
from ..mpc.netem import PRESETS, NetworkProfile

if TYPE_CHECKING:
    from ..models.configs import ViTConfig
    from ..models.costs import CostModel
    from ..models.spec import ArchSpec

Log = Callable[[str], None]

SPECS_MODELS = [
    ("softmax + gelu", "softmax", 0.0, "gelu"),
    ("relu_softmax + gelu", "relu_softmax", 0.0, "gelu"),
    ("scale + gelu", "scale", 0.0, "gelu"),
    ("MPCViT mix (½ relu_softmax, ½ scale) + gelu", "mix", 0.5, "gelu"),
    ("softmax + relu", "softmax", 0.0, "relu"),
    ("relu_softmax + relu", "relu_softmax", 0.0, "relu"),
    ("scale + relu", "scale", 0.0, "relu"),
    ("MPCViT mix (½ relu_softmax, ½ scale) + relu", "mix", 0.5, "relu"),
]
SPECS_NETWORKS = [
    ("softmax ViT (softmax + gelu)", "softmax", 0.0, "gelu"),
    ("MPCViT μ=0.5 (½ relu_softmax, ½ scale) + gelu", "mix", 0.5, "gelu"),
    ("MPCViT μ=0.25 (¼ relu_softmax, ¾ scale) + gelu", "mix", 0.25, "gelu"),
    ("MPCViT+ μ=0.5 + relu", "mix", 0.5, "relu"),
    ("MPCViT+ μ=0.25 + relu", "mix", 0.25, "relu"),
    ("MPCViT+ μ=0.25 grouped (ReLU-softmax heads in the first 2 layers) + relu", "grouped",
     0.25, "relu"),
    ("MPCViT+ μ=0 (all scale) + relu", "scale", 0.0, "relu"),
]


def build_spec(config: ViTConfig, attention: str, mu: float, activation: str,
               norm: str = "layernorm") -> ArchSpec:
    from mpcvit.models.spec import ArchSpec

    if norm != "layernorm":
        if attention in ("grouped", "mix"):
            raise ValueError(f"bench spec: norm {norm!r} only with uniform attention")
        return ArchSpec.uniform(config.depth, config.heads, attention, activation, norm)

    if attention == "grouped":
        return ArchSpec.grouped(config.depth, config.heads, mu, activation=activation)
    if attention == "mix":
        return ArchSpec.mix(config.depth, config.heads, ("relu_softmax", "scale"),
                            (mu, 1 - mu), activation)
    return ArchSpec.uniform(config.depth, config.heads, attention, activation)


def stock_baseline(config: ViTConfig) -> dict:
    from .stock import stock_vit_party

    return run_parties(stock_vit_party, config.to_dict(), backend="gloo", provider="tfp",
                       timeout=3600)[0]


def stock_over_link(config: ViTConfig, profile: NetworkProfile) -> dict:
    """Stock CrypTen's protocols across an emulated link.  Gloo's peer-to-peer sockets
    cannot be routed through the delaying relays, so the same program runs over our gRPC
    communicator (same rounds and bytes as gloo, section 1 of the benchmarks)."""
    from ..mpc.netem import EmulatedNetwork
    from .stock import stock_vit_party

    with EmulatedNetwork(profile) as net:
        return run_parties(stock_vit_party, config.to_dict(), backend="grpc", provider="tfp",
                           network=net, timeout=7200, recv_timeout=600)[0]


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def section_models(config: ViTConfig, log: Log, images: int = 2) -> list[str]:
    from .network import bench_loopback

    stock = stock_baseline(config)
    log(f"stock: {stock}")
    lines = [f"| model ({config.name}, random weights, batch 1, loopback) | online s | "
             "offline s | rounds | MB | speed-up vs stock | vs softmax + gelu |",
             "|---|---|---|---|---|---|---|",
             f"| stock CrypTen: softmax + erf GeLU, gloo, TFP | {stock['online_s']:.2f} | — | "
             f"{stock['rounds']} | {_mb(stock['bytes'])} | 1.00x | — |"]
    base = None
    for name, att, mu, act in SPECS_MODELS:
        row = bench_loopback(config, build_spec(config, att, mu, act), images=images,
                             progress=log)
        base = base or row["online_s"]
        lines.append(f"| {name} | {row['online_s']:.2f} | {row['offline_s']:.2f} | "
                     f"{row['rounds']} | {_mb(row['bytes'])} | "
                     f"{stock['online_s'] / row['online_s']:.2f}x | "
                     f"{base / row['online_s']:.2f}x |")
    return lines


def section_networks(config: ViTConfig, networks: list[str], log: Log, images: int = 1,
                     rows: list[int] | None = None) -> list[str]:
    from .network import bench_loopback, bench_network

    specs = [s for i, s in enumerate(SPECS_NETWORKS) if rows is None or i in rows or i == 0]

    stock = stock_baseline(config)
    log(f"stock: {stock}")
    out = []
    results = {}
    for name, att, mu, act in specs:
        spec = build_spec(config, att, mu, act)
        loop = bench_loopback(config, spec, images=images, progress=log)
        results[(name, "loopback")] = {"measured": loop, "predicted_online_s": loop["online_s"]}
        for net in networks:
            if net != "loopback":
                results[(name, net)] = bench_network(config, spec, PRESETS[net], images=images,
                                                     loopback=loop, progress=log)
    for net in networks:
        p = PRESETS[net]
        predicted = stock["online_s"] + p.mpc_seconds(stock["bytes"], stock["rounds"])
        label = "stock CrypTen (softmax + erf GeLU, gloo, TFP)"
        st = stock["online_s"]
        if net != "loopback":
            log(f"stock CrypTen over {p.describe()}...")
            st = stock_over_link(config, p)["online_s"]
            log(f"  {st:.2f} s")
            label = "stock CrypTen (softmax + erf GeLU, TFP; over gRPC across the link)"
        soft = results[(SPECS_NETWORKS[0][0], net)]["measured"]["online_s"]
        out += [f"\n**{p.describe()}**\n",
                "| model | online s/image | offline s/image | rounds | MB | predicted online s "
                "| vs softmax ViT | vs stock CrypTen |", "|---|---|---|---|---|---|---|---|",
                f"| {label} | {st:.2f} | — | {stock['rounds']} | {_mb(stock['bytes'])} | "
                f"{predicted:.2f} | — | 1.00x |"]
        for name, *_ in specs:
            r = results[(name, net)]
            m = r["measured"]
            out.append(f"| {name} | {m['online_s']:.2f} | {m['offline_s']:.2f} | {m['rounds']} | "
                       f"{_mb(m['bytes'])} | {r['predicted_online_s']:.2f} | "
                       f"{soft / m['online_s']:.2f}x | {st / m['online_s']:.2f}x |")
    return out


# The protocols section: (row label, attention, mu, activation).  scale + relu_nobias is the
# best searched MPCViT+ spec at WAN prices (docs/search.md).
SPECS_PROTOCOLS = [
    ("softmax ViT (softmax + gelu)", "softmax", 0.0, "gelu", "layernorm"),
    ("MPCViT+ (scale + relu_nobias)", "scale", 0.0, "relu_nobias", "layernorm"),
    ("MPCViT+ (scale + relu, BatchNorms folded)", "scale", 0.0, "relu", "batchnorm"),
]


def protocol_costs(config: ViTConfig, costs_dir: Path | None, log: Log) -> CostModel:
    """The cost file of ``config`` with every protocol variant: read from ``costs_dir``
    (``costs_<name>.yaml``) when there, else profiled now (and written there)."""
    from mpcvit.models import profiler
    from mpcvit.models.costs import CostModel

    path = costs_dir / f"costs_{config.name}.yaml" if costs_dir else None
    if path is not None and path.is_file():
        log(f"{config.name}: cost file {path}")
        return CostModel.load(path, config)
    log(f"profiling {config.name} with every protocol variant...")
    costs = profiler.profile(config)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        costs.save(path)
    return costs


def measure_protocols(config: ViTConfig, costs: CostModel, networks: list[str], log: Log,
                      images: int = 1) -> list[dict]:
    """Every spec of :data:`SPECS_PROTOCOLS` on every network under the default plan and
    under the plan chosen for that network: one row each (a chosen plan equal to the
    default is measured once).  Loopback runs are shared by the networks."""
    from mpcvit.models.costs import NETWORKS
    from mpcvit.models.plan import ModelPlan
    from mpcvit.models.planner import choose_plan

    from .network import bench_loopback, bench_network

    rows = []
    for name, att, mu, act, norm in SPECS_PROTOCOLS:
        spec = build_spec(config, att, mu, act, norm)
        loops: dict[str, dict] = {}

        def loop(plan: ModelPlan, spec: ArchSpec = spec, loops: dict[str, dict] = loops,
                 name: str = name) -> dict:
            key = json.dumps(plan.to_dict(), sort_keys=True)
            if key not in loops:
                log(f"{config.name} {name}, plan {plan.describe() or 'default'}:")
                loops[key] = bench_loopback(config, spec, images=images, protocol=plan,
                                            progress=log)
            return loops[key]

        for net in networks:
            chosen = choose_plan(costs, spec, NETWORKS[net])
            for label, plan in (("default", ModelPlan()), ("chosen", chosen)):
                if label == "chosen" and chosen.is_default:
                    rows.append({**rows[-1], "label": "chosen"})
                    continue
                base = loop(plan)
                if net == "loopback":
                    measured, predicted = base, base["online_s"]
                else:
                    res = bench_network(config, spec, PRESETS[net], images=images,
                                        loopback=base, protocol=plan, progress=log)
                    measured, predicted = res["measured"], res["predicted_online_s"]
                pred = costs.predict(spec, plan)
                rows.append({"model": config.name, "spec": name, "network": net,
                             "label": label, "plan": plan.to_dict(),
                             "plan_describe": plan.describe() or "default",
                             "measured": measured, "predicted_online_s": predicted,
                             "profile": {"rounds": pred.rounds, "bytes": pred.bytes,
                                         "seconds": NETWORKS[net].seconds(pred)}})
    return rows


def section_protocols(rows: list[dict], networks: list[str], command: str) -> list[str]:
    """One Markdown table per network from :func:`measure_protocols`' rows."""
    out = []
    for net in networks:
        p = PRESETS[net]
        out += [f"\n**{p.describe()}**. `{command}`\n",
                "| model | spec | plan | online s | offline s | rounds | online MB | "
                "offline MB p0 / p1 | predicted online s | speed-up vs default plan |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        base = None
        for r in (r for r in rows if r["network"] == net):
            m = r["measured"]
            if r["label"] == "default":
                base = m["online_s"]
            speedup = base / m["online_s"] if base and m["online_s"] else float("nan")
            p1 = m.get("offline_bytes_p1", 0.0)
            out.append(f"| {r['model']} | {r['spec']} | {r['label']}: {r['plan_describe']} | "
                       f"{m['online_s']:.2f} | {m['offline_s']:.2f} | {m['rounds']} | "
                       f"{_mb(m['bytes'])} | {_mb(m['offline_bytes'])} / {_mb(p1)} | "
                       f"{r['predicted_online_s']:.2f} | {speedup:.2f}x |")
    return out


def section_ceiling(config: ViTConfig, networks: list[str], log: Log, target: float = 4.0
                    ) -> list[str]:
    """Speed-up of scale + ReLU (and grouped MPCViT+) over softmax + GeLU as the cost
    model predicts it from a fresh profile, then with the LayerNorms, then also the
    linear layers, made free, and how much cheaper those shared parts would have to be
    for a speed-up of ``target``.  Rounds and bytes are exact; seconds are the profile's
    loopback medians."""
    from mpcvit.models import costs, profiler

    log(f"profiling {config.name}...")
    model = profiler.profile(config)
    blocks = model.blocks()
    shared_ln, shared_lin = blocks["layernorm"], blocks["linear"]
    specs = [("scale + relu", build_spec(config, "scale", 0.0, "relu")),
             ("MPCViT+ μ=0.25 grouped + relu", build_spec(config, "grouped", 0.25, "relu"))]
    base = model.predict(build_spec(config, "softmax", 0.0, "gelu"))
    out = [f"Profile of {config.name} (batch 1): softmax + gelu costs {int(base.rounds)} "
           f"rounds and {_mb(base.bytes)} MB; the LayerNorms {int(shared_ln.rounds)} rounds "
           f"and {_mb(shared_ln.bytes)} MB, the linear layers {int(shared_lin.rounds)} "
           f"rounds and {_mb(shared_lin.bytes)} MB, in every architecture.\n",
           "| network | model | speed-up vs softmax + gelu | LayerNorms free | LayerNorms "
           f"and linear layers free | shared parts must shrink for {target:g}x by |",
           "|---|---|---|---|---|---|"]
    shared = shared_ln + shared_lin
    for net in networks:
        nm = costs.NetworkModel.from_link(PRESETS[net])
        b = nm.seconds(base)
        for name, spec in specs:
            c = nm.seconds(model.predict(spec))
            s_ln, s_all = nm.seconds(shared_ln), nm.seconds(shared)
            k = shrink_needed(b, c, s_all, target)
            need = f"{k:.1f}x" if k is not None else "unreachable"
            out.append(f"| {net} | {name} | {b / c:.2f}x | {(b - s_ln) / (c - s_ln):.2f}x | "
                       f"{(b - s_all) / (c - s_all):.2f}x | {need} |")
    return out


def shrink_needed(base: float, cheap: float, shared: float, target: float) -> float | None:
    """By what factor k the ``shared`` part of both costs must shrink for
    ``(base - shared + shared/k) / (cheap - shared + shared/k) == target``; None when even
    k = infinity (shared part free) falls short; 1.0 when the target is already met."""
    if base / cheap >= target:
        return 1.0
    room = (base - shared - target * (cheap - shared)) / (target - 1)
    return shared / room if room > 0 else None


def main(argv: list[str] | None = None) -> int:
    from mpcvit.models.configs import CONFIGS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["models", "networks", "ceiling", "protocols"],
                   required=True)
    p.add_argument("--model", default=None,
                   help="config (default vit_7_4_32; protocols: comma-separated, default "
                   "vit_7_4_32,demo)")
    p.add_argument("--networks", default="loopback,lan,wan")
    p.add_argument("--rows", default=None,
                   help="networks: comma-separated row numbers of SPECS_NETWORKS to run "
                   "(0, the softmax ViT, always runs)")
    p.add_argument("--images", type=int, default=None,
                   help="images per row, median reported (default: 2 for models, 1 for "
                   "networks)")
    p.add_argument("--target", type=float, default=4.0,
                   help="ceiling: the speed-up the shared parts are sized for")
    p.add_argument("--costs-dir", type=Path, default=None,
                   help="protocols: read/write cost files costs_<model>.yaml here")
    p.add_argument("--compute", choices=["cpu", "wall"], default="cpu",
                   help="protocols: compute term of the plans' prices")
    p.add_argument("--json", type=Path, default=None,
                   help="protocols: also write the measured rows as JSON to this file")
    args = p.parse_args(argv)
    if args.target <= 1:
        p.error("--target must be above 1")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.section == "protocols":
        return _protocols(args, log)
    config = CONFIGS[args.model or "vit_7_4_32"]
    if args.section == "models":
        lines = section_models(config, log, args.images or 2)
    elif args.section == "ceiling":
        lines = section_ceiling(config, args.networks.split(","), log, args.target)
    else:
        rows = None if args.rows is None else [int(r) for r in args.rows.split(",")]
        lines = section_networks(config, args.networks.split(","), log, args.images or 1,
                                 rows)
    print("\n".join(lines))
    return 0


def _protocols(args: argparse.Namespace, log: Log) -> int:
    from mpcvit.models.configs import CONFIGS

    models = (args.model or "vit_7_4_32,demo").split(",")
    networks = args.networks.split(",")
    rows = []
    for name in models:
        config = CONFIGS[name]
        costs = protocol_costs(config, args.costs_dir, log).priced_by(args.compute)
        rows += measure_protocols(config, costs, networks, log, args.images or 1)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    command = "python -m mpcvit.bench.report --section protocols"
    print("\n".join(section_protocols(rows, networks, command)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
