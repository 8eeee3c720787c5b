"""``mpcvit dealer --config deploy/dealer.yaml``: serve correlated randomness until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

HELP = "run the dealer (Beaver triples and friends; it never sees inputs)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="dealer YAML (deploy/dealer.yaml)")
    parser.add_argument("--listen", help="override the listen address (host:port)")


def run(args: argparse.Namespace) -> int:
    # gRPC's own C-core lines are not JSON: keep only its errors (set before grpc loads).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from .common import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread starts: keeps resident memory from creeping
    from mpcvit.mpc.errors import ConfigError
    from mpcvit.party.config import DealerConfig
    from mpcvit.party.logs import setup_logging

    try:
        config = DealerConfig.from_yaml(args.config)
    except (ConfigError, ValueError) as exc:
        print(f"mpcvit dealer: bad config: {exc}", file=sys.stderr)
        return 2
    listen = args.listen or config.listen
    setup_logging(config.log_format, config.log_level, role="dealer")
    from mpcvit.mpc.compat import import_crypten

    import_crypten()  # the dealer uses CrypTen's generators; install the compat shim first
    from mpcvit.party.dealer_server import DealerServer

    log = logging.getLogger("mpcvit.dealer")
    dealer = DealerServer(config, listen)
    port = dealer.start()
    log.info("event=dealer_started listen=%s port=%d tls=%s", listen, port,
             config.tls is not None)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    while not done.wait(1.0):
        pass
    log.info("event=dealer_stopping")
    dealer.stop(3.0)
    return 0
