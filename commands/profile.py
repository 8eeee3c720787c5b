"""``mpcvit profile``: measure every building block's MPC cost at a model's real shapes
and write the cost file the search reads.

Runs one 2-party CrypTen session over gRPC with the dealer.  Figures are party 0's:
rounds and bytes as CrypTen counts them, compute as median loopback wall seconds; the
``seconds`` column adds the chosen network (bytes / bandwidth + rounds × RTT).  Every
protocol variant a plan can choose is measured too; with a spec (``--arch`` or a
checkpoint's) the command prints, per network, the cheapest plan and its cost per block.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpcvit.models.costs import NetworkModel

HELP = "profile per-block MPC costs (rounds, bytes, seconds) and write a cost file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="config name (e.g. demo, vit_7_4_32), or a checkpoint: its "
                             "config, and its spec unless --arch is given")
    parser.add_argument("--arch", default=None,
                        help="arch spec YAML or ATTENTION[+ACTIVATION][+NORM]: also print its "
                        "predicted whole-model cost")
    parser.add_argument("--network", default="lan",
                        help="lan (3 Gbps, 0.8 ms RTT), wan (100 Mbps, 40 ms RTT), loopback "
                        "(no added cost) or BANDWIDTH,RTT such as 1gbit,5ms (default lan)")
    parser.add_argument("--out", type=Path, default=None, help="cost file (YAML) to write")
    parser.add_argument("--costs", type=Path, default=None,
                        help="read this cost file instead of profiling (re-price/print only)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per block (median)")
    parser.add_argument("--verify", action="store_true",
                        help="also run the whole secure model (--arch) and compare")
    parser.add_argument("--provider", choices=["dealer", "tfp"], default="dealer")
    parser.add_argument("--variants", choices=["all", "default"], default="all",
                        help="profile every protocol variant a plan can choose (all) or the "
                             "default plan's only (faster; plans cannot be chosen then)")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="a variant must save this fraction of its block's compute "
                             "seconds to replace the default (default 0.1)")
    parser.add_argument("--compute", choices=["cpu", "wall"], default="cpu",
                        help="compute term of the price: party 0's CPU seconds (default: "
                             "steady on a shared machine) or loopback wall seconds")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")


def report_networks(network: NetworkModel) -> list[NetworkModel]:
    """loopback, lan and wan, plus ``network`` when it is none of them."""
    from mpcvit.models.costs import NETWORKS

    nets = [NETWORKS["loopback"], NETWORKS["lan"], NETWORKS["wan"]]
    return nets if network.name in NETWORKS else [*nets, network]


def print_variants(rows: list[dict], networks: list) -> None:
    """Every priced variant per block, whole model, with seconds per network (the
    cheapest of each block on each network marked *)."""
    names = [n.name for n in networks]
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        for n in names:
            key = (r["block"], n)
            best[key] = min(best.get(key, float("inf")), r["seconds"][n])
    print("protocol variants per block, whole model, batch 1 (* cheapest on that network)")
    print(f"{'block':<24}{'variant':<44}{'rounds':>7}{'MB':>9}{'dealer MB':>11}"
          + "".join(f"{n + ' s':>13}" for n in names))
    for r in rows:
        cells = "".join(
            f"{r['seconds'][n]:>12.3f}{'*' if r['seconds'][n] == best[(r['block'], n)] else ' '}"
            for n in names)
        print(f"{r['block']:<24}{r['variant']:<44}{r['rounds']:>7}{r['bytes'] / 1e6:>9.2f}"
              f"{r['offline_bytes'] / 1e6:>11.1f}{cells}")


def print_table(blocks: dict[str, dict[str, float]], network_desc: str) -> None:
    print(f"whole-model cost per block, batch 1, party 0's counts; network {network_desc}")
    print(f"{'block':<24}{'rounds':>8}{'MB':>10}{'compute s':>11}{'seconds':>10}")
    for name, b in blocks.items():
        print(f"{name:<24}{b['rounds']:>8}{b['bytes'] / 1e6:>10.2f}{b['compute_s']:>11.3f}"
              f"{b['seconds']:>10.3f}")


def run(args: argparse.Namespace) -> int:
    from mpcvit.models.checkpoint import CheckpointError, load_checkpoint
    from mpcvit.models.configs import get_config
    from mpcvit.models.costs import CostModel, parse_network
    from mpcvit.models.planner import MIN_GAIN, plan_report, variants_table
    from mpcvit.models.profiler import measure_secure_model, profile
    from mpcvit.models.spec import ArchSpec

    try:
        network = parse_network(args.network)
        spec = None
        if Path(args.model).is_file():  # a checkpoint: its shape, and its spec by default
            model, _ = load_checkpoint(args.model)
            config, spec = model.config, model.spec
        else:
            config = get_config(args.model)
        if args.arch is not None:
            spec = ArchSpec.parse(args.arch, config.depth, config.heads)
    except (KeyError, ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.verify and spec is None:
        print("error: --verify needs --arch", file=sys.stderr)
        return 2
    if args.costs is not None:
        try:
            costs = CostModel.load(args.costs, config)
        except (OSError, ValueError) as exc:
            print(f"error: {args.costs}: {exc}", file=sys.stderr)
            return 2
    else:
        print(f"profiling {config.name}: {config.depth} layers, {config.heads} heads, "
              f"{config.num_tokens} tokens, dim {config.dim} (2 parties over gRPC, "
              f"provider {args.provider})", flush=True)
        costs = profile(config, repeats=args.repeats, provider=args.provider,
                        variants=args.variants == "all")
    min_gain = MIN_GAIN if args.min_gain is None else args.min_gain
    raw, costs = costs, costs.priced_by(args.compute)
    blocks = costs.blocks_table(network)
    print_table(blocks, f"{network.describe()}, default plan, compute = {args.compute} s")
    networks = report_networks(network)
    variants = variants_table(costs, networks)
    print_variants(variants, networks)
    report: dict = {"model": config.name, "network": network.to_dict(), "blocks": blocks,
                    "variants": variants}
    plan = None
    if spec is not None:
        report["plans"] = {}
        for net in networks:
            rep = plan_report(costs, spec, net, min_gain=min_gain)
            print("\n".join(rep.lines(f"plan for {spec.summary()}")))
            report["plans"][net.name] = rep.to_dict()
            if net.name == network.name:
                plan = rep.plan
        pred = costs.predict(spec, plan)
        report["predicted"] = {"rounds": pred.rounds, "bytes": pred.bytes,
                               "compute_s": pred.compute_s, "seconds": network.seconds(pred),
                               "plan": plan.to_dict() if plan is not None else {}}
        print(f"predicted {spec.summary()} under the {network.name} plan: {pred.rounds:.0f} "
              f"rounds, {pred.bytes / 1e6:.2f} MB, {network.seconds(pred):.3f} s")
    if args.verify and spec is not None:
        import torch

        images = torch.randn(2, config.in_chans, config.image_size, config.image_size)
        run_ = measure_secure_model(config, spec, images, provider=args.provider,
                                    protocol=plan)
        m = run_.cost
        report["measured"] = {"rounds": m.rounds, "bytes": m.bytes, "compute_s": m.compute_s,
                              "seconds": network.seconds(m)}
        print(f"measured  whole model: {m.rounds:.0f} rounds, {m.bytes / 1e6:.2f} MB, "
              f"{m.compute_s:.3f} s loopback, {network.seconds(m):.3f} s on {network.name}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        raw.save(args.out, network)
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(report))
    return 0
