"""The ``mpcvit`` console script: one module per subcommand in this package.

Each subcommand lives in its own module exposing ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when
their subcommand runs, so light commands (``infer``) never import torch or CrypTen.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
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
    "plan": "mpcvit.commands.plan",
}

#: Exit code when a module that an extra brings is missing (every subcommand).
EXIT_MISSING_EXTRA = 5

_SERVER = ("torch", "crypten", "omegaconf", "onnx", "scipy", "grpc_health", "grpc_reflection",
           "prometheus_client")
# subcommand -> modules it needs beyond the client SDK (checked before it is imported)
NEEDS: dict[str, tuple[str, ...]] = {
    "bench": _SERVER, "party": _SERVER, "dealer": _SERVER, "demo": _SERVER, "eval": _SERVER,
    "profile": _SERVER, "search": _SERVER, "plan": _SERVER, "train": ("torch",),
    "certs": ("cryptography",),
}

_SERVER_HINT = "pip install 'mpcvit[server]' (in a checkout: pip install -e '.[server]')"
# top-level module -> how to install it
INSTALL_HINTS: dict[str, str] = {
    **{name: _SERVER_HINT for name in _SERVER},
    "cryptography": _SERVER_HINT,
    "crypten": "pip install --no-deps crypten==0.4.1, after the server extra "
               "(README, 'Installing by hand')",
    "PIL": "pip install 'mpcvit[image]' (in a checkout: pip install -e '.[image]')",
    "matplotlib": "pip install 'mpcvit[dev]' (in a checkout: pip install -e '.[dev]')",
}


def missing_extra(command: str, module: str) -> int:
    """Say in one line which module is missing and what brings it; the exit code."""
    top = module.split(".", 1)[0]
    print(f"mpcvit {command}: needs the Python module {top!r}, which is not installed: "
          f"{INSTALL_HINTS[top]}", file=sys.stderr)
    return EXIT_MISSING_EXTRA


def _first_missing(command: str) -> str | None:
    for module in NEEDS.get(command, ()):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ImportError:  # a broken or blocked install counts as missing
            return module
    return None


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
    wants_help = any(a in ("-h", "--help") for a in argv)
    missing = None if wants_help else _first_missing(only)
    if missing is not None:
        return missing_extra(only, missing)
    try:
        args = build_parser(only).parse_args(argv)
        return int(args._module.run(args) or 0)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".", 1)[0] not in INSTALL_HINTS:
            raise
        return missing_extra(only, exc.name or "")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
