"""Our checkpoint format: one torch file holding a format version, the config, the spec,
the protocol plan it is served with (``plan``, optional: files without it run the default
plan) and the state dict.  Loading never unpickles arbitrary objects
(``weights_only=True``)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .configs import CONFIGS, ViTConfig
from .plan import ModelPlan
from .spec import ArchSpec
from .vit import ViT

FORMAT = "mpcvit-checkpoint"
FORMAT_VERSION = 1
ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # shipped checkpoints, by name


class CheckpointError(ValueError):
    """The file is not a readable mpcvit checkpoint (the message says why)."""


def save_checkpoint(
    model: ViT, path: str | os.PathLike, extra: dict[str, Any] | None = None
) -> None:
    """Write ``model`` (config, spec, protocol plan, weights) and optional plain-data
    ``extra`` metadata."""
    blob = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "spec": model.spec.to_dict(),
        "plan": ModelPlan.of(getattr(model, "protocol", None)).to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": dict(extra or {}),
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and validate the raw checkpoint dict (config and spec still as dicts)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt/foreign files
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(e).__name__}: "
                              f"{_short(e)}){_reference_hint(path)}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not an mpcvit checkpoint (missing format tag){_reference_hint(path)}")
    if blob.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {blob.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    for key in ("config", "spec", "state_dict"):
        if key not in blob:
            raise CheckpointError(f"{path}: checkpoint lacks {key!r}")
    return blob


def _short(e: Exception) -> str:
    """The gist of a torch.load error (its weights-only message runs to a page)."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    return m.group(0) if m else (text.splitlines() or [""])[0][:300]


def _reference_hint(path: Path) -> str:
    """How to import ``path`` if it is a reference MPCViT checkpoint, else ''."""
    from .reference import looks_like_reference

    if not looks_like_reference(path):
        return ""
    return (f"; this looks like a reference MPCViT checkpoint: run "
            f"`mpcvit import --reference {path} --out model.pt`")


def load_checkpoint(path: str | os.PathLike) -> tuple[ViT, dict[str, Any]]:
    """Rebuild the model from a checkpoint; returns (model in eval mode, carrying the
    checkpoint's protocol plan, and the extra metadata)."""
    blob = read_checkpoint(path)
    try:
        config = ViTConfig.from_dict(blob["config"])
        spec = ArchSpec.from_dict(blob["spec"])
        plan = ModelPlan.from_dict(blob.get("plan"))
        model = ViT(config, spec, plan)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad config/spec/plan: {e}") from e
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the config: {e}") from e
    return model.eval(), dict(blob.get("extra") or {})


def load_model(path_or_name: str | os.PathLike, spec: ArchSpec | None = None) -> ViT:
    """A checkpoint path, or a config name for a freshly initialised model (random
    weights; useful for benchmarks) with an optional ``spec``."""
    is_name = isinstance(path_or_name, str) and path_or_name in CONFIGS
    if is_name and not Path(path_or_name).exists():
        return ViT(CONFIGS[path_or_name], spec).eval()
    model, _ = load_checkpoint(path_or_name)
    if spec is not None:
        model.set_spec(spec)
    return model


def shipped_checkpoint(name: str) -> Path:
    """Where the shipped checkpoint ``name`` (e.g. ``demo``) lives (it may be missing)."""
    return ASSETS_DIR / f"{name}.pt"


def resolve_checkpoint(model: str) -> Path:
    """A checkpoint path, or the name of a shipped one (``demo`` -> models/assets/demo.pt).

    Never falls back to random weights: a missing checkpoint is an error.
    """
    path = Path(model)
    if path.suffix or "/" in model:
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} not found")
        return path
    shipped = shipped_checkpoint(model)
    if not shipped.is_file():
        raise FileNotFoundError(
            f"no shipped checkpoint {shipped}; train it (`mpcvit demo` does on first run) "
            "or pass a checkpoint path")
    return shipped
