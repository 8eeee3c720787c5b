"""``mpcvit bench``: benchmarks (speed is measured here, never asserted in tests)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpcvit.models.configs import ViTConfig
    from mpcvit.models.plan import ModelPlan
    from mpcvit.models.spec import ArchSpec
    from mpcvit.models.vit import ViT

HELP = ("run benchmarks: transport (gRPC vs gloo), throughput (batching), network (LAN/WAN), "
        "soak (reliability)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    t = sub.add_parser("transport", help="same ViT-block MPC program over gloo and over gRPC")
    t.add_argument("--provider", choices=["tfp", "dealer"], default="tfp",
                   help="correlated randomness for both runs (default: tfp)")
    t.add_argument("--repeats", type=int, default=5, help="blocks timed per run (median)")
    t.add_argument("--runs", type=int, default=2, help="runs per transport, alternating")
    t.add_argument("--tokens", type=int, default=65)
    t.add_argument("--dim", type=int, default=256)
    t.add_argument("--heads", type=int, default=4)
    t.add_argument("--hidden", type=int, default=512)
    t.add_argument("--json", action="store_true", help="end with one JSON object")

    tp = sub.add_parser("throughput", help="images/s and p50/p95 latency of the party service "
                                           "for 1, 8 and 32 concurrent clients")
    tp.add_argument("--model", default="demo", help="checkpoint path or shipped name")
    tp.add_argument("--data", default="fashion-mnist")
    tp.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    tp.add_argument("--requests", type=int, default=2, help="requests per client")
    tp.add_argument("--max-batch", type=int, default=32)
    tp.add_argument("--max-wait", type=float, default=0.05, help="seconds to fill a batch")
    tp.add_argument("--provider", choices=["dealer", "tfp"], default="dealer")
    tp.add_argument("--pairs", default=None, metavar="P,P",
                    help="scale out instead: images/s with each number of party pairs "
                         "(e.g. 1,2), each pair with its own dealer, all the clients "
                         "sharing one PairPool; compared with one pair")
    tp.add_argument("--json", action="store_true", help="end with one JSON object")

    sk = sub.add_parser("soak", help="long run of the real TLS service: sequential and "
                                     "concurrent load, hostile inputs, kills of party 1 "
                                     "and the dealer (docs/reliability.md)")
    sk.add_argument("--requests", type=int, default=1000, help="sequential requests")
    sk.add_argument("--clients", type=int, default=8, help="concurrent clients")
    sk.add_argument("--per-client", type=int, default=50, help="requests per client")
    sk.add_argument("--party-kills", type=int, default=10, help="kills of party 1")
    sk.add_argument("--dealer-kills", type=int, default=3, help="kills of the dealer")
    sk.add_argument("--model", default="demo", help="checkpoint path or shipped name")
    sk.add_argument("--data", default="fashion-mnist")
    sk.add_argument("--seed", type=int, default=0, help="picks the kill phases' order")
    sk.add_argument("--workdir", default=None, help="keep certificates and logs here")
    sk.add_argument("--json", action="store_true", help="end with one JSON object")

    nw = sub.add_parser("network", help="a whole secure ViT over an emulated LAN/WAN link")
    nw.add_argument("--model", default="vit_7_4_32", help="config name (random weights) or "
                                                           "checkpoint path")
    nw.add_argument("--arch", default=None, help="spec YAML or shorthand (relu_softmax+relu)")
    nw.add_argument("--network", default="wan", help="lan, wan, loopback or BW,RTT (1gbit,5ms)")
    nw.add_argument("--images", type=int, default=2, help="images measured (median)")
    nw.add_argument("--no-offline", action="store_true",
                    help="fetch correlated randomness online instead of before each image")
    nw.add_argument("--protocol", "--plan", dest="protocol", default=None,
                    help="protocol plan: auto (the cheapest for the spec on --network, "
                         "priced from --costs or a fresh profile), default, lan, wan, fss, a "
                         "plan file, or [block.]field=variant,... (e.g. comparison=fss,"
                         "attention.exp=spline); default: a checkpoint's own plan, else "
                         "default")
    nw.add_argument("--costs", default=None, help="cost file for --protocol auto")
    nw.add_argument("--compute", choices=["cpu", "wall"], default="cpu",
                    help="--protocol auto: compute term of the price (party 0's CPU seconds "
                         "or loopback wall seconds)")
    nw.add_argument("--json", action="store_true", help="end with one JSON object")


def run(args: argparse.Namespace) -> int:
    if args.bench == "transport":
        from mpcvit.bench.transport import compare_transports

        print(f"ViT block: {args.tokens} tokens, dim {args.dim}, {args.heads} heads, "
              f"MLP {args.hidden}, batch 1, provider {args.provider}; "
              f"{args.runs} runs x {args.repeats} blocks per transport", flush=True)
        res = compare_transports(
            args.provider, args.repeats, args.runs, tokens=args.tokens, dim=args.dim,
            heads=args.heads, hidden=args.hidden,
        )
        print(f"{'transport':<10}{'seconds':>10}{'rounds':>9}{'bytes':>14}")
        for name in ("gloo", "grpc"):
            print(f"{name:<10}{res[name + '_s']:>10.3f}{res[name + '_rounds']:>9}"
                  f"{res[name + '_bytes']:>14}")
        print(f"grpc/gloo wall-time ratio: {res['ratio']:.3f}")
        if args.json:
            print(json.dumps(res))
        return 0
    if args.bench == "throughput":
        from mpcvit.bench.throughput import throughput_table
        from mpcvit.models.checkpoint import resolve_checkpoint

        counts = tuple(int(c) for c in args.clients.split(","))
        ckpt = str(resolve_checkpoint(args.model))
        if args.pairs:
            return _bench_pairs(args, ckpt, counts)
        print(f"party service on this machine, model {ckpt}, provider {args.provider}; "
              f"baseline: one client, max_batch 1", flush=True)
        rows = throughput_table(ckpt, args.data, counts, args.requests, args.max_batch,
                                args.max_wait, args.provider)
        base = rows[0]["images_per_s"]
        for row in rows[1:]:
            row["speedup"] = row["images_per_s"] / base if base else float("nan")
            print(f"{row['clients']} clients batched: {row['speedup']:.2f}x the one-at-a-time "
                  "throughput")
        if args.json:
            print(json.dumps({"rows": rows}))
        return 0
    if args.bench == "soak":
        return _soak(args)
    if args.bench == "network":
        return _bench_network(args)
    raise AssertionError(args.bench)


def network_plan(text: str | None, model: ViT | None, config: ViTConfig, spec: ArchSpec,
                 network: str, costs: str | None, compute: str = "cpu") -> ModelPlan:
    """The plan ``mpcvit bench network`` runs: ``auto`` is the cheapest for ``spec`` on
    ``network`` (from ``costs`` or a fresh profile); None the checkpoint's own plan (the
    default for a config name)."""
    from mpcvit.models.plan import ModelPlan

    if text is None:
        return ModelPlan.of(getattr(model, "protocol", None))
    if text.strip() != "auto":
        return ModelPlan.parse(text)
    from mpcvit.models.costs import CostModel, parse_network
    from mpcvit.models.planner import choose_plan

    if costs:
        cost_model = CostModel.load(costs, config)
    else:
        from mpcvit.models.profiler import profile

        print(f"--protocol auto without --costs: profiling {config.name} first", flush=True)
        cost_model = profile(config)
    return choose_plan(cost_model.priced_by(compute), spec, parse_network(network))


def _bench_network(args: argparse.Namespace) -> int:
    from mpcvit.bench.network import bench_network
    from mpcvit.models.checkpoint import load_checkpoint
    from mpcvit.models.configs import CONFIGS
    from mpcvit.models.spec import ArchSpec
    from mpcvit.mpc.netem import parse_network

    state, model = None, None
    try:
        if args.model in CONFIGS:
            config = CONFIGS[args.model]
            spec = ArchSpec.parse(args.arch or "softmax+gelu", config.depth, config.heads)
        else:
            model, _ = load_checkpoint(args.model)
            config, spec, state = model.config, model.spec, model.state_dict()
            if args.arch:
                spec = ArchSpec.parse(args.arch, config.depth, config.heads)
        profile = parse_network(args.network)
        plan = network_plan(args.protocol, model, config, spec, args.network, args.costs,
                            args.compute)
    except (KeyError, ValueError, OSError) as exc:
        print(f"mpcvit bench network: {exc}", file=sys.stderr)
        return 2
    res = bench_network(config, spec, profile, images=args.images,
                        offline=not args.no_offline, state_dict=state, protocol=plan)
    res["plan"] = plan.to_dict()
    res["plan_describe"] = plan.describe() or "default"
    m = res["measured"]
    print(f"{args.model} [{args.arch or 'checkpoint spec'}] on {profile.describe()}: "
          f"online {m['online_s']:.2f} s/image, offline {m['offline_s']:.2f} s, total "
          f"{m['total_s']:.2f} s; {m['rounds']} rounds, {m['bytes'] / 1e6:.1f} MB, "
          f"{m['offline_bytes'] / 1e6:.1f} MB dealer material (plan {res['plan_describe']}); "
          f"predicted online {res['predicted_online_s']:.2f} s "
          f"({res['prediction_error']:+.0%})")
    if args.json:
        print(json.dumps(res))
    return 0


def _bench_pairs(args: argparse.Namespace, ckpt: str, counts: tuple[int, ...]) -> int:
    from mpcvit.bench.throughput import pairs_table

    pair_counts = tuple(int(p) for p in args.pairs.split(","))
    if min(pair_counts) < 1 or 1 not in pair_counts:
        print("mpcvit bench throughput: --pairs needs 1 (the baseline) and counts >= 1",
              file=sys.stderr)
        return 2
    print(f"party pairs on this machine, model {ckpt}, provider {args.provider}, "
          f"max_batch {args.max_batch}; baseline: one pair with the same clients", flush=True)
    rows = pairs_table(ckpt, args.data, pair_counts, counts, args.requests, args.max_batch,
                       args.max_wait, args.provider)
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


def _soak(args: argparse.Namespace) -> int:
    from mpcvit.bench.soak import SoakConfig, soak

    cfg = SoakConfig(sequential=args.requests, clients=args.clients,
                     per_client=args.per_client, party_kills=args.party_kills,
                     dealer_kills=args.dealer_kills, model=args.model, data=args.data,
                     seed=args.seed)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    result = soak(cfg, progress, workdir=args.workdir)
    s = result["summary"]
    print(f"{s['requests']} requests: {s['failures']} failures, {s['mismatches']} argmax "
          f"mismatches, {s['crossed']} crossed sessions; RSS growth after warm-up "
          f"{s['rss_growth_mb']} MB")
    print(f"{s['kills']} kills: {s['recovered']} recovered; max time to error "
          f"{s['max_error_s']} s, max time to recover {s['max_recover_s']} s (start-up of "
          f"the restarted process at most {s['max_startup_s']} s, then serving within "
          f"{s['max_rejoin_s']} s)")
    print(f"hostile inputs: {s['hostile_unexpected']} unexpected outcomes; "
          f"{s['unauthorized_accepted']} of {s['role_probes']} unauthorized connections accepted")
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "summary"}))
        print(json.dumps(s))
    return 0
