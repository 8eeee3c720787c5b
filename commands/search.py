"""``mpcvit search``: latency-aware search of per-head attention kinds (and, with
``--activations``, per-layer MLP activations; with ``--norms``, per-layer norm kinds),
then binarisation by μ or by a latency budget.  Writes the arch spec YAML, with the
protocol plan that is cheapest for it on ``--network`` next to its layers, and a Pareto
CSV (μ sweep: predicted latency vs held out accuracy of the supernet's weights)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "MPC-latency-aware architecture search; writes an arch spec YAML"


def _kinds(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config name (e.g. demo)")
    parser.add_argument("--data", required=True, help="dataset (as for `mpcvit train`)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--mu", type=float, help="fraction of heads kept non-cheapest (top-k)")
    mode.add_argument("--latency-budget", type=float, metavar="S",
                      help="seconds per image under --network; greedy cheapest-first fit")
    parser.add_argument("--network", default="lan", help="lan, wan, loopback or BW,RTT")
    parser.add_argument("--costs", type=Path, default=None,
                        help="cost file from `mpcvit profile` (default: profile now)")
    parser.add_argument("--out", required=True, type=Path, help="arch spec YAML to write")
    parser.add_argument("--pareto", type=Path, default=None,
                        help="Pareto CSV (default OUT with .pareto.csv)")
    parser.add_argument("--attention-kinds", default="relu_softmax,scale",
                        help="candidate attention kinds (comma-separated)")
    parser.add_argument("--activations", default=None, metavar="KINDS",
                        help="search MLP activations among these (e.g. "
                        "gelu,relu,relu_nobias,quad,identity); default: keep --activation "
                        "everywhere")
    parser.add_argument("--activation", default="gelu", help="fixed activation (no search)")
    parser.add_argument("--norms", default=None, metavar="KINDS",
                        help="search each layer's norm kind (and the final norm's) among "
                        "these (layernorm,batchnorm: a BatchNorm folds away under MPC); "
                        "default: keep --norm everywhere")
    parser.add_argument("--norm", default="layernorm",
                        help="fixed norm kind (no search): layernorm or batchnorm")
    parser.add_argument("--lam", type=float, default=0.5,
                        help="weight of expected latency / most expensive candidate's latency")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="use N training images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arch-lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compute", choices=["cpu", "wall"], default="cpu",
                        help="compute term of the price: party 0's CPU seconds (default: "
                             "steady on a shared machine) or loopback wall seconds")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch
    from mpcvit.models.configs import get_config
    from mpcvit.models.costs import CostModel, parse_network
    from mpcvit.models.data import DatasetError, limit_bundle, load_dataset
    from mpcvit.models.plan import arch_yaml
    from mpcvit.models.planner import plan_report
    from mpcvit.models.profiler import profile
    from mpcvit.models.search import (
        SearchConfig,
        SuperNet,
        binarize_budget,
        binarize_mu,
        cheapest,
        mu_sweep,
        search,
        write_pareto_csv,
    )

    from .common import fit_config

    torch.set_num_threads(args.threads)
    try:
        network = parse_network(args.network)
        data = limit_bundle(load_dataset(args.data), args.limit, None, args.seed)
        config = fit_config(get_config(args.model), data)
        cfg = SearchConfig(lam=args.lam, epochs=args.epochs, batch_size=args.batch_size,
                           lr=args.lr, arch_lr=args.arch_lr, seed=args.seed,
                           threads=args.threads)
        torch.manual_seed(args.seed)
        net = SuperNet(config, _kinds(args.attention_kinds),
                       _kinds(args.activations) if args.activations else None,
                       args.activation, _kinds(args.norms) if args.norms else None,
                       args.norm)
        if args.mu is not None and not 0.0 <= args.mu <= 1.0:
            raise ValueError(f"--mu must be in [0, 1], got {args.mu}")
    except (DatasetError, KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.costs is not None:
        try:
            costs = CostModel.load(args.costs, config)
        except (OSError, ValueError) as exc:
            print(f"error: {args.costs}: {exc}", file=sys.stderr)
            return 2
    else:
        print(f"no --costs: profiling {config.name} first", flush=True)
        costs = profile(config)
    costs = costs.priced_by(args.compute)
    print(f"search {config.name} on {data.name} ({len(data.train)} images), attention "
          f"{args.attention_kinds}, activations {args.activations or args.activation}, "
          f"norms {args.norms or args.norm}, lambda {args.lam}, "
          f"network {network.describe()}", flush=True)
    try:
        result = search(net, data, costs, network, cfg, progress=lambda s: print(s.line(),
                                                                                 flush=True))
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    att, act, nrm = result.attention_probs, result.activation_probs, result.norm_probs
    try:
        if args.mu is not None:
            cheap = cheapest(net.attention_kinds, costs, network)
            spec = binarize_mu(att, net.attention_kinds, args.mu, cheap, act,
                               net.activation_kinds, net.activation, nrm, net.norm_kinds,
                               net.norm)
        else:
            spec = binarize_budget(att, net.attention_kinds, costs, network,
                                   args.latency_budget, act, net.activation_kinds,
                                   net.activation, nrm, net.norm_kinds, net.norm)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = plan_report(costs, spec, network)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(arch_yaml(spec, report.plan))
    points = mu_sweep(result, costs, network)
    pareto = args.pareto or args.out.with_suffix(".pareto.csv")
    write_pareto_csv(points, pareto)
    pred = report.cost
    print("\n".join(report.lines(f"plan for {spec.summary()}")))
    print(f"spec {spec.summary()}: predicted {network.seconds(pred):.4f} s "
          f"({pred.rounds:.0f} rounds, {pred.bytes / 1e6:.2f} MB) on {network.name} under "
          f"the plan {report.plan.describe() or 'default'}")
    print(f"wrote {args.out} and {pareto}")
    if args.json:
        print(json.dumps({
            "spec": spec.to_dict(), "predicted_s": network.seconds(pred),
            "plan": report.plan.to_dict(), "plan_report": report.to_dict(),
            "attention_probs": att.tolist(),
            "activation_probs": None if act is None else act.tolist(),
            "history": [vars(h) for h in result.history],
            "pareto": [p.row() for p in points],
        }))
    return 0
