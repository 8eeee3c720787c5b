"""Import checkpoints of the reference MPCViT code (PKU-SEC-Lab/mpcvit ``ViTLite``).

The reference model is a CCT ViT-Lite (``block="cct"``, qkv without bias).  Each layer's
``self_attn.alpha`` (1, heads, 1, 1) selects per head: 1 = ReLU-softmax, 0 = scaling
attention.  Shapes give the config; alphas give the spec.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch

from .configs import ViTConfig
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec
from .vit import ViT

_BLOCK_MAP = {
    "pre_norm.weight": "pre_norm.weight",
    "pre_norm.bias": "pre_norm.bias",
    "self_attn.qkv.weight": "attn.qkv.weight",
    "self_attn.proj.weight": "attn.proj.weight",
    "self_attn.proj.bias": "attn.proj.bias",
    "linear1.weight": "mlp.fc1.weight",
    "linear1.bias": "mlp.fc1.bias",
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "linear2.weight": "mlp.fc2.weight",
    "linear2.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "tokenizer.conv_layers.0.0.weight": "patch_embed.proj.weight",
    "tokenizer.conv_layers.0.0.bias": "patch_embed.proj.bias",
    "classifier.class_emb": "cls_token",
    "classifier.positional_emb": "pos_embed",
    "classifier.norm.weight": "norm.weight",
    "classifier.norm.bias": "norm.bias",
    "classifier.fc.weight": "head.weight",
    "classifier.fc.bias": "head.bias",
}
_BLOCK_RE = re.compile(r"^classifier\.blocks\.(\d+)\.(.+)$")


class ReferenceImportError(ValueError):
    """The state dict is not a reference ViTLite we can reproduce exactly."""


def _unwrap(sd: Mapping) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model", "state_dict_ema"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ReferenceImportError(f"entry {k!r} is not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def _need(sd: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ReferenceImportError(f"reference state dict lacks {key!r}")
    return sd[key]


def _kinds_from_alpha(alpha: torch.Tensor, layer: int, heads: int,
                      threshold: float | None) -> tuple[AttentionKind, ...]:
    a = alpha.detach().float().reshape(-1)
    if a.numel() != heads:
        raise ReferenceImportError(
            f"layer {layer}: alpha has {a.numel()} entries for {heads} heads"
        )
    if threshold is None:
        if not bool(((a - 0).abs() < 1e-6).logical_or((a - 1).abs() < 1e-6).all()):
            raise ReferenceImportError(
                f"layer {layer}: alpha {a.tolist()} is not binary (a search checkpoint?); "
                "pass alpha_threshold to binarise it"
            )
        threshold = 0.5
    return tuple(
        AttentionKind.RELU_SOFTMAX if float(v) >= threshold else AttentionKind.SCALE for v in a
    )


def config_from_reference(sd: Mapping, name: str = "") -> ViTConfig:
    """Infer the ViT-Lite shape from reference tensor shapes."""
    sd = _unwrap(sd)
    conv = _need(sd, "tokenizer.conv_layers.0.0.weight")
    dim, in_chans, patch, patch2 = conv.shape
    if patch != patch2:
        raise ReferenceImportError(f"non-square tokenizer kernel {tuple(conv.shape)}")
    tokens = _need(sd, "classifier.positional_emb").shape[1]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ReferenceImportError(f"{tokens} tokens is not a square grid plus a class token")
    depth = 1 + max(
        (int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))), default=-1
    )
    if depth == 0:
        raise ReferenceImportError("no classifier.blocks.* entries")
    alpha = sd.get("classifier.blocks.0.self_attn.alpha")
    if alpha is None:
        raise ReferenceImportError("cannot infer the head count: no self_attn.alpha")
    heads = alpha.numel()
    hidden = _need(sd, "classifier.blocks.0.linear1.weight").shape[0]
    classes = _need(sd, "classifier.fc.weight").shape[0]
    return ViTConfig(
        image_size=side * patch, in_chans=in_chans, patch=patch, dim=dim, depth=depth,
        heads=heads, num_classes=classes, mlp_ratio=hidden / dim, block="cct", name=name,
    )


def import_reference(
    state_dict: Mapping,
    config: ViTConfig | None = None,
    alpha_threshold: float | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
    attn_eps: float | None = None,
) -> ViT:
    """Build our cct-style ViT from a reference ``ViTLite`` state dict.

    Alphas must be exactly 0/1 unless ``alpha_threshold`` is given (heads with
    alpha >= threshold become ReLU-softmax).  MPCViT+ checkpoints (with ``beta`` token
    masks) are refused: the linear-GeLU variant is not implemented here.
    ``attn_eps=1e-5`` reproduces the reference's plaintext ReLU-softmax exactly; the
    default keeps our fixed-point-safe 2**-8 (outputs differ only in rows whose ReLU sum
    is below ~1).
    """
    sd = _unwrap(state_dict)
    config = config or config_from_reference(sd)
    if attn_eps is not None:
        config = config.replace(attn_eps=attn_eps)
    if config.block != "cct":
        raise ReferenceImportError("reference checkpoints need a config with block='cct'")
    layers = []
    for i in range(config.depth):
        if f"classifier.blocks.{i}.beta" in sd:
            raise ReferenceImportError(f"layer {i}: MPCViT+ (beta token mask) is not supported")
        alpha = _need(sd, f"classifier.blocks.{i}.self_attn.alpha")
        layers.append(LayerSpec(_kinds_from_alpha(alpha, i, config.heads, alpha_threshold),
                                activation))
    model = ViT(config, ArchSpec(tuple(layers)))

    ours: dict[str, torch.Tensor] = {}
    used = set()
    for ref_key, our_key in _TOP_MAP.items():
        ours[our_key] = _need(sd, ref_key)
        used.add(ref_key)
    for i in range(config.depth):
        used.add(f"classifier.blocks.{i}.self_attn.alpha")
        for ref_sub, our_sub in _BLOCK_MAP.items():
            ref_key = f"classifier.blocks.{i}.{ref_sub}"
            ours[f"blocks.{i}.{our_sub}"] = _need(sd, ref_key)
            used.add(ref_key)
    ignored = {"classifier.attention_pool.weight", "classifier.attention_pool.bias"}
    extra = sorted(set(sd) - used - ignored)
    if extra:
        raise ReferenceImportError(f"unexpected reference entries: {extra[:5]}")
    try:
        model.load_state_dict(ours)
    except RuntimeError as e:
        raise ReferenceImportError(f"reference weights do not fit {config}: {e}") from e
    return model.eval()


def load_reference_checkpoint(path: str | os.PathLike, **kwargs) -> ViT:
    """``import_reference`` on a reference checkpoint file (tensors only)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ReferenceImportError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if not isinstance(sd, Mapping):
        raise ReferenceImportError(f"{path}: not a state dict")
    return import_reference(sd, **kwargs)
