"""ViT models for private inference: configs, architecture specs, the plaintext model and
its CrypTen twin (``mpcvit.models.secure``, imported lazily because it needs CrypTen)."""

from .configs import CONFIGS, ViTConfig, get_config
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec
from .vit import ViT, build_model

__all__ = [
    "CONFIGS",
    "ActivationKind",
    "ArchSpec",
    "AttentionKind",
    "LayerSpec",
    "ViT",
    "ViTConfig",
    "build_model",
    "get_config",
]
