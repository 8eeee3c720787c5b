"""ViT models for private inference: configs, architecture specs, the plaintext model, its
CrypTen twin (``SecureViT``; CrypTen itself is imported only when a secure model is
built), checkpoints and reference-checkpoint import."""

from .checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from .configs import CONFIGS, ViTConfig, get_config
from .reference import ReferenceImportError, import_reference, load_reference_checkpoint
from .secure import SecureViT, reveal_float, share_module
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec
from .vit import ViT, build_model

__all__ = [
    "CONFIGS",
    "ActivationKind",
    "ArchSpec",
    "AttentionKind",
    "CheckpointError",
    "LayerSpec",
    "ReferenceImportError",
    "SecureViT",
    "ViT",
    "ViTConfig",
    "build_model",
    "get_config",
    "import_reference",
    "load_checkpoint",
    "load_model",
    "load_reference_checkpoint",
    "reveal_float",
    "save_checkpoint",
    "share_module",
]
