"""The ``mpcvit`` console script: one module per subcommand in this package.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when
their subcommand runs, so light commands (``infer``) never import torch or CrypTen.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing it
COMMANDS: dict[str, str] = {
    "bench": "mpcvit.commands.bench",
    "party": "mpcvit.commands.party",
    "dealer": "mpcvit.commands.dealer",
    "infer": "mpcvit.commands.infer",
    "demo": "mpcvit.commands.demo",
    "certs": "mpcvit.commands.certs",
    "train": "mpcvit.commands.train",
    "eval": "mpcvit.commands.eval",
    "import": "mpcvit.commands.import_reference",
    "profile": "mpcvit.commands.profile",
    "search": "mpcvit.commands.search",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpcvit", description="Private ViT inference under 2-party MPC (CrypTen over gRPC)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"see `mpcvit {name} --help`", add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the subcommand asked for (keeps `infer` torch-free).
    only = next((a for a in argv if not a.startswith("-")), None)
    if only not in COMMANDS:
        only = None
    if only is None:
        # Top-level help (or a bad command): list every command with its one-line help.
        parser = argparse.ArgumentParser(
            prog="mpcvit", description="Private ViT inference under 2-party MPC "
                                       "(CrypTen over gRPC)")
        sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
        for name, module_name in COMMANDS.items():
            sub.add_parser(name, help=importlib.import_module(module_name).HELP)
        parser.parse_args(argv)
        return 2
    args = build_parser(only).parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
