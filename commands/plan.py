"""``mpcvit plan``: the cheapest protocol plan of an existing architecture on a network,
from a cost file (``mpcvit profile --out``) or a fresh profile, without training.

Prints, per network, each block type's chosen variant with its rounds, bytes, dealer
material and seconds against the default plan's; ``--out`` writes the plan as YAML (for
``mpcvit party --protocol FILE`` or ``mpcvit bench network --protocol FILE``) and
``--save`` a copy of the checkpoint that serves it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mpcvit.models.configs import ViTConfig
    from mpcvit.models.spec import ArchSpec
    from mpcvit.models.vit import ViT

HELP = "the cheapest protocol plan of an architecture on a network (from a cost file)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint (its config and spec) or config name (e.g. vit_7_4_32)")
    parser.add_argument("--arch", default=None,
                        help="arch spec YAML or ATTENTION[+ACTIVATION][+NORM] (default: the "
                             "checkpoint's spec; all softmax + GeLU for a config name)")
    parser.add_argument("--network", default="lan,wan",
                        help="comma-separated networks: lan, wan, loopback or BW,RTT "
                             "(default lan,wan)")
    parser.add_argument("--costs", type=Path, default=None,
                        help="cost file from `mpcvit profile` (default: profile now, which "
                             "takes minutes)")
    parser.add_argument("--min-gain", type=float, default=None,
                        help="a variant must save this fraction of its block's compute "
                             "seconds to replace the default (default 0.1)")
    parser.add_argument("--compute", choices=["cpu", "wall"], default="cpu",
                        help="compute term of the price: party 0's CPU seconds (default: "
                             "steady on a shared machine) or loopback wall seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="write the plan (YAML) for the one --network given")
    parser.add_argument("--save", type=Path, default=None,
                        help="write a copy of the --model checkpoint that serves the plan")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")


def _load(args: argparse.Namespace) -> tuple[ViTConfig, ArchSpec, ViT | None]:
    """(config, spec, model or None) from --model and --arch."""
    from mpcvit.models.checkpoint import load_checkpoint
    from mpcvit.models.configs import get_config
    from mpcvit.models.spec import ArchSpec

    model = None
    if Path(args.model).is_file():
        model, _ = load_checkpoint(args.model)
        config, spec = model.config, model.spec
    else:
        config = get_config(args.model)
        spec = ArchSpec.uniform(config.depth, config.heads)
    if args.arch is not None:
        spec = ArchSpec.parse(args.arch, config.depth, config.heads)
    return config, spec, model


def run(args: argparse.Namespace) -> int:
    from mpcvit.models.checkpoint import CheckpointError
    from mpcvit.models.costs import CostModel, parse_network
    from mpcvit.models.planner import MIN_GAIN, has_variants, plan_report

    try:
        networks = [parse_network(n) for n in args.network.split(",") if n.strip()]
        config, spec, model = _load(args)
        if not networks:
            raise ValueError("--network names no network")
        if (args.out or args.save) and len(networks) != 1:
            raise ValueError("--out and --save need exactly one --network")
        if args.save and model is None:
            raise ValueError("--save needs a checkpoint as --model")
        costs = CostModel.load(args.costs, config) if args.costs else None
    except (KeyError, ValueError, OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if costs is None:
        from mpcvit.models.profiler import profile

        print(f"no --costs: profiling {config.name} with every protocol variant first",
              flush=True)
        costs = profile(config)
    if not has_variants(costs):
        print("note: the cost file prices the default plan only (profiled without variants "
              "or before they existed): every plan is the default", file=sys.stderr)
    min_gain = MIN_GAIN if args.min_gain is None else args.min_gain
    costs = costs.priced_by(args.compute)
    out = {"model": config.name, "spec": spec.to_dict(), "plans": {}}
    for net in networks:
        rep = plan_report(costs, spec, net, min_gain=min_gain)
        print("\n".join(rep.lines(f"plan for {args.model} {spec.summary()}")))
        out["plans"][net.name] = rep.to_dict()
    plan = rep.plan
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(plan.to_yaml())
        print(f"wrote {args.out}")
    if args.save is not None:
        from mpcvit.models.checkpoint import load_checkpoint, save_checkpoint

        model, extra = load_checkpoint(args.model)
        model.set_spec(spec)
        model.set_protocol(plan)
        save_checkpoint(model, args.save, extra)
        print(f"wrote {args.save} (serves {plan.describe() or 'default'})")
    if args.json:
        print(json.dumps(out))
    return 0
