"""``mpcvit certs --out DIR``: a demo role-tagged PKI for mutual TLS.

Writes ``ca.pem`` (signs dealer and parties), ``client-ca.pem`` (signs clients, with its
key ``client-ca.key``) and ``<node>.pem``/``<node>.key`` for dealer, party0, party1 and
client, each stating its role in a ``mpcvit://`` URI SAN.  Point ``MPCVIT_TLS_DIR`` (or
each config's ``tls:``) at them.  ``mpcvit certs --out DIR --client alice`` later signs
one more client, ``client-alice.pem``, with the client CA already in DIR.  Production
deployments bring their own CAs and put the same role URIs in their certificates.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "generate demo CAs and role-tagged mutual-TLS certificates (dealer, parties, clients)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--nodes", default="dealer,party0,party1,client",
                        help="comma-separated node names: dealer, party<N>, client, "
                             "client-<name> (the name gives the role)")
    parser.add_argument("--hosts", default="localhost,127.0.0.1",
                        help="extra host names/IPs the dealer's and parties' certificates "
                             "are valid for")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--keep", action="store_true",
                        help="do nothing if DIR/ca.pem already exists")
    parser.add_argument("--single-ca", action="store_true",
                        help="sign clients with the parties' CA too (no client-ca.pem); "
                             "roles still come from the URI SANs")
    parser.add_argument("--client", action="append", default=[], metavar="NAME",
                        help="only sign a certificate for client NAME (client-NAME.pem) with "
                             "the client CA already in DIR; repeatable")


def run(args: argparse.Namespace) -> int:
    from mpcvit.mpc.certs import generate_pki, issue_client

    try:
        if args.client:
            for name in args.client:
                cfg = issue_client(args.out, name, days=args.days)
                print(f"wrote {cfg.cert} and {cfg.key} (role mpcvit://client/{name})")
            return 0
        if args.keep and (args.out / "ca.pem").is_file():
            print(f"certificates already in {args.out}; kept")
            return 0
        nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
        hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
        generate_pki(args.out, nodes, hosts=hosts, days=args.days,
                     client_ca=not args.single_ca)
    except ValueError as exc:
        print(f"mpcvit certs: {exc}", file=sys.stderr)
        return 2
    cas = "ca.pem" if args.single_ca else "ca.pem, client-ca.pem"
    print(f"wrote {cas} and certificates for {', '.join(nodes)} into {args.out}")
    return 0
