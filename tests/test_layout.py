"""The package layering, checked on the source: every import statement, including the
ones inside functions.

    proto  <  mpc (runtime + protocols)  <  models  <  party  <  bench  <  commands

``models`` knows nothing of the service (``party``) or of gRPC; ``mpc`` knows nothing of
models or the service; nothing imports the commands; and no module imports another
module's private names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("proto", "mpc", "models", "party", "bench", "commands")
# package -> what it must not import (top-level names, or mpcvit.<package>)
FORBIDDEN = {
    "proto": {"mpcvit.mpc", "mpcvit.models", "mpcvit.party", "mpcvit.bench", "mpcvit.commands"},
    "mpc": {"mpcvit.models", "mpcvit.party", "mpcvit.bench", "mpcvit.commands"},
    "models": {"mpcvit.party", "mpcvit.bench", "mpcvit.commands", "grpc", "grpc_health",
               "grpc_reflection"},
    "party": {"mpcvit.bench", "mpcvit.commands"},
    "bench": {"mpcvit.commands"},
    "commands": set(),
}


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "generated" not in p.parts)


def _module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["mpcvit", *parts])


def _imports(path: Path, root: Path = REPO) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [alias.name for alias in node.names]))
    return out


def _violates(module: str, forbidden: set[str]) -> bool:
    return any(module == f or module.startswith(f + ".") for f in forbidden)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_lower_layers(package: str) -> None:
    bad = []
    for path in _sources(package):
        for module, _ in _imports(path):
            if _violates(module, FORBIDDEN[package]):
                bad.append(f"{path.relative_to(REPO)} imports {module}")
    assert not bad, "\n".join(bad)


def test_no_private_names_imported_across_modules() -> None:
    bad = []
    for package in PACKAGES:
        for path in _sources(package):
            for module, names in _imports(path):
                if not module.startswith("mpcvit"):
                    continue
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                if private:
                    bad.append(f"{path.relative_to(REPO)}: {private} from {module}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a models module importing the service is caught."""
    (tmp_path / "models").mkdir()
    fake = tmp_path / "models" / "probe.py"
    fake.write_text("def f():\n    from mpcvit.party import client\n    from .ops import _x\n")
    found = _imports(fake, tmp_path)
    assert ("mpcvit.party", ["client"]) in found
    assert ("mpcvit.models.ops", ["_x"]) in found
    assert _violates("mpcvit.party", FORBIDDEN["models"])


@pytest.mark.parametrize("module", sorted(
    _module_name(p) for package in PACKAGES for p in _sources(package)
    if p.name != "__main__.py"))
def test_every_module_imports(module: str) -> None:
    """Moving a module must not leave a stale import behind (scripts run with -m too)."""
    import importlib

    assert importlib.import_module(module).__name__ == module
