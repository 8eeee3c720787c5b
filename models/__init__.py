"""ViT models for private inference: configs, architecture specs, the plaintext model, its
CrypTen twin (``SecureViT``; CrypTen itself is imported only when a secure model is
built), checkpoints and reference-checkpoint import.

Names are resolved lazily (PEP 562), so numpy-only submodules such as
``mpcvit.models.data`` import without torch (the client SDK reads images through it).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointError": "checkpoint", "load_checkpoint": "checkpoint",
    "load_model": "checkpoint", "save_checkpoint": "checkpoint",
    "CONFIGS": "configs", "ViTConfig": "configs", "get_config": "configs",
    "ReferenceImportError": "reference", "import_reference": "reference",
    "load_reference_checkpoint": "reference",
    "SecureViT": "secure", "reveal_float": "secure", "share_module": "secure",
    "ActivationKind": "spec", "ArchSpec": "spec", "AttentionKind": "spec", "LayerSpec": "spec",
    "NormKind": "spec",
    "ViT": "vit", "build_model": "vit",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
