"""``mpcvit certs --out DIR``: a demo PKI for mutual TLS (one CA, one pair per node).

Writes ``ca.pem`` and ``<node>.pem``/``<node>.key`` for dealer, party0, party1 and
client; point ``MPCVIT_TLS_DIR`` (or each config's ``tls:``) at them.  Production
deployments bring their own CA; every node must trust only that CA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "generate a demo CA and mutual-TLS certificates for dealer, parties and client"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--nodes", default="dealer,party0,party1,client",
                        help="comma-separated node names (each also becomes a DNS name)")
    parser.add_argument("--hosts", default="localhost,127.0.0.1",
                        help="extra host names/IPs every certificate is valid for")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keep", action="store_true",
                        help="do nothing if DIR/ca.pem already exists")


def run(args: argparse.Namespace) -> int:
    from mpcvit.mpc.certs import generate_pki

    if args.keep and (args.out / "ca.pem").is_file():
        print(f"certificates already in {args.out}; kept")
        return 0
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    generate_pki(args.out, nodes, hosts=hosts, days=args.days)
    print(f"wrote {args.out}/ca.pem and certificates for {', '.join(nodes)}")
    return 0
