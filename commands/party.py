"""``mpcvit party --config deploy/party0.yaml``: run one party server until SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "run a party server (party 0 owns the model, party 1 only ever holds shares)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="party YAML (deploy/party0.yaml)")
    parser.add_argument("--listen", help="override the listen address (host:port)")
    parser.add_argument("--peer", help="override the other party's address")
    parser.add_argument("--dealer", help="override the dealer's address")
    parser.add_argument("--provider", choices=("dealer", "tfp"),
                        help="correlated randomness source (tfp is INSECURE, tests only)")
    parser.add_argument("--model", help="party 0: checkpoint name or path")
    parser.add_argument("--protocol", help="party 0: serve this protocol plan instead of the "
                        "checkpoint's: default, lan, wan, fss, a plan file (mpcvit plan "
                        "--out), or block.field=variant,...")
    parser.add_argument("--max-batch", type=int, help="requests per secure session")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace
    # gRPC's own C-core lines are not JSON: keep only its errors (set before grpc loads).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .common import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts: keeps resident memory from creeping

    from mpcvit.mpc.errors import ConfigError
    from mpcvit.party.config import PartyConfig
    from mpcvit.party.logs import setup_logging

    try:
        config = PartyConfig.from_yaml(args.config).with_overrides(
            listen=args.listen, peer=args.peer, dealer=args.dealer, provider=args.provider,
            model=args.model, protocol=args.protocol)
        if args.max_batch:
            config = replace(config, limits=replace(config.limits, max_batch=args.max_batch))
    except (ConfigError, ValueError) as exc:
        print(f"mpcvit party: bad config: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_format, config.log_level, role=f"party{config.rank}")
    from mpcvit.party.server import PartyServer

    try:
        server = PartyServer(config)
    except (OSError, KeyError, ValueError) as exc:
        print(f"mpcvit party: cannot start: {exc}", file=sys.stderr)
        return 1
    server.serve_forever()
    return 0
