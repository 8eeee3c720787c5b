"""Import checkpoints of the reference MPCViT code (PKU-SEC-Lab/mpcvit ``ViTLite``).

The reference model is a CCT ViT-Lite (``block="cct"``, qkv without bias).  Per layer,
``self_attn.alpha`` (1, heads, 1, 1) selects each head's attention (1 = ReLU-softmax,
0 = scaling attention), and in MPCViT+ checkpoints (the reference's ``--linear-gelu``
mode) ``beta`` (1, tokens, 1) selects each token's MLP: 1 = GeLU, 0 = identity followed
by a ReLU after the second linear layer.  Shapes give the config; alphas and betas give
the spec (head kinds and token masks).  A checkpoint without alphas is the reference's
softmax teacher.

The reference trainer saves through timm's ``CheckpointSaver``: a dict with the model's
``state_dict`` (and ``state_dict_ema``), the optimizer's state, ``epoch``, ``metric`` and
the command line as an ``argparse.Namespace``.  :func:`read_reference_file` unpickles
such files with torch's weights-only unpickler, widened by exactly the harmless globals
they carry (:data:`SAFE_GLOBALS`); anything else (a custom class, ``os.system``) is
refused before it runs.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .configs import CONFIGS, ViTConfig
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec
from .vit import ViT

REFERENCE_ATTN_EPS = 1e-5  # the reference's ReLU-softmax denominator guard

# What the reference trainer's files hold beyond torch's own weights-only allowlist
# (tensors, OrderedDict, plain containers): the command line, and numpy scalars (numpy
# 1.x pickles name their constructor numpy.core.multiarray.scalar, numpy 2 numpy._core).
# A numpy scalar is rebuilt from its dtype, whose state the unpickler sets on an instance
# of the dtype's class (numpy.dtypes.Float64DType, ...): those classes are allowed too.
_NUMPY_SCALARS = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                  np.uint32, np.uint64, np.float16, np.float32, np.float64)
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    np.dtype,
    *(type(np.dtype(t)) for t in _NUMPY_SCALARS),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
]

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
_STATE_KEYS = ("state_dict", "model", "state_dict_ema")


class ReferenceImportError(ValueError):
    """The file is not a reference ViTLite we can reproduce exactly (the message says why)."""


# ----------------------------------------------------------------------------- files


def read_reference_file(path: str | os.PathLike) -> Any:
    """Unpickle a reference checkpoint file (any torch format) without running code:
    torch's weights-only unpickler plus :data:`SAFE_GLOBALS`, nothing else."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
        if m is None:
            raise ReferenceImportError(f"{path}: not a torch checkpoint "
                                       f"({_first_line(e)})") from None
        raise ReferenceImportError(
            f"{path}: refusing to unpickle {m.group(1) or m.group(2)}: a checkpoint of the "
            "reference trainer holds only tensors, plain containers, argparse.Namespace and "
            "numpy scalars, so this file was not written by it (loading it could run "
            "code)") from None
    except Exception as e:  # torch raises many types for corrupt or foreign files
        raise ReferenceImportError(f"{path}: cannot read ({type(e).__name__}: "
                                   f"{_first_line(e)})") from e


def _first_line(e: Exception) -> str:
    """The gist of a torch.load error: its weights-only messages run to a page, the
    cause on a line of its own."""
    text = str(e)
    _, marker, cause = text.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in (cause if marker else text).splitlines() if ln.strip()]
    return (lines or [type(e).__name__])[0][:300]


@dataclass
class ReferenceFile:
    """A reference checkpoint's weights and the trainer's metadata (plain data only)."""

    state_dict: dict[str, torch.Tensor]
    source: str  # where the weights were: "state_dict", "state_dict_ema", ..., "top level"
    meta: dict[str, Any] = field(default_factory=dict)  # epoch, arch, metric, args


def _plain(v: Any) -> Any:
    """``v`` as JSON-like plain data, or None if it is something else."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        items = [_plain(x) for x in v]
        lost = any(x is None and y is not None for x, y in zip(items, v, strict=True))
        return None if lost else items
    return None


def _meta(blob: Mapping) -> dict[str, Any]:
    meta = {k: _plain(blob[k]) for k in ("epoch", "arch", "metric", "version") if k in blob}
    args = blob.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, Mapping):
        meta["args"] = {str(k): p for k, v in args.items()
                        if (p := _plain(v)) is not None or v is None}
    return {k: v for k, v in meta.items() if v is not None}


def _strip(sd: Mapping, where: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ReferenceImportError(f"{where} entry {k!r} is not a tensor")
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def unwrap_reference(blob: Any, ema: bool = False) -> ReferenceFile:
    """The weights of a plain state dict or a timm-style dict (``state_dict``,
    ``model`` or, with ``ema`` or as the only one, ``state_dict_ema``), with
    ``module.`` prefixes (DataParallel) stripped."""
    if not isinstance(blob, Mapping):
        raise ReferenceImportError(f"not a state dict or checkpoint dict "
                                   f"({type(blob).__name__})")
    keys = ("state_dict_ema",) if ema else _STATE_KEYS
    for key in keys:
        if isinstance(blob.get(key), Mapping):
            return ReferenceFile(_strip(blob[key], key), key, _meta(blob))
    if ema:
        raise ReferenceImportError("the file has no 'state_dict_ema' (EMA weights)")
    if blob and all(isinstance(v, torch.Tensor) for v in blob.values()):
        return ReferenceFile(_strip(blob, "state dict"), "top level")
    raise ReferenceImportError(
        f"no weights found: expected a state dict or one of {list(_STATE_KEYS)}, "
        f"got keys {sorted(map(str, blob))[:8]}")


def looks_like_reference(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a reference ViTLite checkpoint (for error messages)."""
    try:
        sd = unwrap_reference(read_reference_file(path)).state_dict
    except (ReferenceImportError, OSError):
        return False
    return "tokenizer.conv_layers.0.0.weight" in sd and "classifier.fc.weight" in sd


# ----------------------------------------------------------------------------- config/spec


def _need(sd: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in sd:
        raise ReferenceImportError(f"reference state dict lacks {key!r}")
    return sd[key]


def _same_shape(a: ViTConfig, b: ViTConfig) -> bool:
    keep = ("image_size", "in_chans", "patch", "dim", "depth", "mlp_ratio")
    return all(getattr(a, k) == getattr(b, k) for k in keep)


def config_from_reference(sd: Mapping | ReferenceFile, name: str = "",
                          heads: int | None = None) -> ViTConfig:
    """Infer the ViT-Lite shape from reference tensor shapes.

    The head count comes from ``self_attn.alpha``; a softmax checkpoint (the teacher,
    without alphas) needs ``heads``, or a shape that matches one named config.  The name
    is ``name``, else the trainer's model name, else a named config of the same shape."""
    if not name and isinstance(sd, ReferenceFile):
        name = str(sd.meta.get("args", {}).get("model") or sd.meta.get("arch") or "")
    sd = _weights(sd)
    conv = _need(sd, "tokenizer.conv_layers.0.0.weight")
    dim, in_chans, patch, patch2 = conv.shape
    if patch != patch2:
        raise ReferenceImportError(f"non-square tokenizer kernel {tuple(conv.shape)}")
    tokens = _need(sd, "classifier.positional_emb").shape[1]
    side = math.isqrt(tokens - 1)
    if side * side != tokens - 1:
        raise ReferenceImportError(f"{tokens} tokens is not a square grid plus a class token")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k))), default=-1)
    if depth == 0:
        raise ReferenceImportError("no classifier.blocks.* entries")
    hidden = _need(sd, "classifier.blocks.0.linear1.weight").shape[0]
    classes = _need(sd, "classifier.fc.weight").shape[0]
    shape = dict(image_size=side * patch, in_chans=in_chans, patch=patch, dim=dim, depth=depth,
                 num_classes=classes, mlp_ratio=hidden / dim, block="cct")
    like = [n for n, c in CONFIGS.items() if _same_shape(c, ViTConfig(heads=1, **shape))]
    alpha = sd.get("classifier.blocks.0.self_attn.alpha")
    if alpha is not None:
        heads = alpha.numel()
    elif heads is None:
        if len(like) != 1:
            raise ReferenceImportError("no self_attn.alpha (a softmax checkpoint) and no named "
                                       "config of this shape: give the head count")
        heads = CONFIGS[like[0]].heads
    try:
        return ViTConfig(heads=heads, name=name or (like[0] if like else "reference"), **shape)
    except ValueError as e:
        raise ReferenceImportError(f"unsupported shape: {e}") from None


def _is_state_dict(sd: Mapping) -> bool:
    return bool(sd) and all(isinstance(v, torch.Tensor) for v in sd.values())


def _weights(x: Mapping | ReferenceFile) -> dict[str, torch.Tensor]:
    """The (prefix-stripped) weights of a ReferenceFile, state dict or checkpoint dict."""
    if isinstance(x, ReferenceFile):
        return x.state_dict
    if _is_state_dict(x):
        return _strip(x, "state dict")
    return unwrap_reference(x).state_dict


def _binary(v: torch.Tensor, what: str, threshold: float | None) -> list[bool]:
    a = v.detach().float().reshape(-1)
    if threshold is None:
        if not bool(((a.abs() < 1e-6) | ((a - 1).abs() < 1e-6)).all()):
            raise ReferenceImportError(
                f"{what} {[round(x, 4) for x in a.tolist()][:16]} is not binary (a search "
                "checkpoint?); give a threshold to binarise it")
        threshold = 0.5
    return [float(x) >= threshold for x in a]


def _kinds_from_alpha(alpha: torch.Tensor | None, layer: int, heads: int,
                      threshold: float | None) -> tuple[AttentionKind, ...]:
    if alpha is None:  # the softmax teacher
        return (AttentionKind.SOFTMAX,) * heads
    if alpha.numel() != heads:
        raise ReferenceImportError(f"layer {layer}: alpha has {alpha.numel()} entries "
                                   f"for {heads} heads")
    bits = _binary(alpha, f"layer {layer}: alpha", threshold)
    return tuple(AttentionKind.RELU_SOFTMAX if b else AttentionKind.SCALE for b in bits)


def _mask_from_beta(beta: torch.Tensor | None, layer: int, tokens: int,
                    threshold: float | None) -> tuple[int, ...] | None:
    """The GeLU tokens of a layer (None: all of them, i.e. plain GeLU)."""
    if beta is None:
        return None
    if tuple(beta.shape) != (1, tokens, 1):
        raise ReferenceImportError(f"layer {layer}: beta has shape {tuple(beta.shape)}, "
                                   f"want (1, {tokens}, 1)")
    bits = _binary(beta, f"layer {layer}: beta", threshold)
    return None if all(bits) else tuple(t for t, b in enumerate(bits) if b)


def spec_from_reference(
    sd: Mapping[str, torch.Tensor], config: ViTConfig, alpha_threshold: float | None = None,
    beta_threshold: float | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
) -> ArchSpec:
    """Head kinds from the alphas, token masks from the betas (MPCViT+).

    Alphas and betas must be exactly 0/1 unless a threshold is given (values >= it
    count as 1).  An all-ones beta is plain GeLU and gives no mask."""
    alphas = [sd.get(f"classifier.blocks.{i}.self_attn.alpha") for i in range(config.depth)]
    if any(a is None for a in alphas) and not all(a is None for a in alphas):
        raise ReferenceImportError("some layers have self_attn.alpha and others do not")
    layers = []
    for i, alpha in enumerate(alphas):
        mask = _mask_from_beta(sd.get(f"classifier.blocks.{i}.beta"), i, config.num_tokens,
                               beta_threshold)
        try:
            layers.append(LayerSpec(_kinds_from_alpha(alpha, i, config.heads, alpha_threshold),
                                    activation, mask))
        except ValueError as e:
            raise ReferenceImportError(f"layer {i}: {e}") from None
    return ArchSpec(tuple(layers))


# ----------------------------------------------------------------------------- import


def import_reference(
    state_dict: Mapping | ReferenceFile,
    config: ViTConfig | None = None,
    alpha_threshold: float | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
    attn_eps: float | None = REFERENCE_ATTN_EPS,
    beta_threshold: float | None = None,
    heads: int | None = None,
) -> ViT:
    """Build our cct-style ViT from a reference ``ViTLite`` state dict (or a timm-style
    checkpoint dict holding one).

    ``attn_eps`` defaults to the reference's 1e-5, which reproduces its plaintext
    logits; ``None`` keeps the config's (our fixed-point-friendly 2**-8: outputs then
    differ in rows whose ReLU sum is small).  Thresholds binarise search checkpoints'
    alphas/betas; ``heads`` is needed only for a softmax checkpoint of unknown shape.
    """
    sd = _weights(state_dict)
    config = config or config_from_reference(state_dict, heads=heads)
    if attn_eps is not None:
        config = config.replace(attn_eps=attn_eps)
    if config.block != "cct":
        raise ReferenceImportError("reference checkpoints need a config with block='cct'")
    spec = spec_from_reference(sd, config, alpha_threshold, beta_threshold, activation)
    model = ViT(config, spec)
    ours: dict[str, torch.Tensor] = {}
    used = set()
    for ref_key, our_key in _TOP_MAP.items():
        ours[our_key] = _need(sd, ref_key)
        used.add(ref_key)
    for i in range(config.depth):
        used |= {f"classifier.blocks.{i}.self_attn.alpha", f"classifier.blocks.{i}.beta"}
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


def load_reference_checkpoint(path: str | os.PathLike, ema: bool = False,
                              **kwargs: Any) -> ViT:
    """``import_reference`` on a reference checkpoint file as the trainer saved it."""
    return import_reference(unwrap_reference(read_reference_file(path), ema=ema), **kwargs)


# ----------------------------------------------------------------------------- cross-check


def reference_forward(sd: Mapping[str, torch.Tensor], x: torch.Tensor,
                      eps: float = REFERENCE_ATTN_EPS, heads: int | None = None) -> torch.Tensor:
    """The reference ViTLite's eval-mode logits, computed straight from its state dict.

    Written from the reference block math, independent of :mod:`models.vit`, so that it
    cross-checks an import: attention mixes ReLU-softmax and scaling attention by alpha
    (softmax without alphas: then ``heads`` gives the head count); the MLP mixes GeLU
    and identity by beta, with a ReLU after the second linear layer weighted by
    1 - beta (exact for 0/1 alphas and betas).
    """
    conv_w = sd["tokenizer.conv_layers.0.0.weight"]
    t = F.conv2d(x, conv_w, sd["tokenizer.conv_layers.0.0.bias"], stride=conv_w.shape[-1])
    t = t.flatten(2).transpose(1, 2)
    b, _, dim = t.shape
    h = torch.cat([sd["classifier.class_emb"].expand(b, -1, -1), t], 1)
    h = h + sd["classifier.positional_emb"]
    n = h.shape[1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := _BLOCK_RE.match(k)))
    for i in range(depth):
        p = f"classifier.blocks.{i}."
        alpha = sd.get(p + "self_attn.alpha")
        if alpha is not None:
            heads = alpha.numel()
        elif heads is None:
            raise ValueError("a softmax checkpoint (no alphas) needs the head count")
        y = F.layer_norm(h, (dim,), sd[p + "pre_norm.weight"], sd[p + "pre_norm.bias"])
        q, k, v = (y @ sd[p + "self_attn.qkv.weight"].t()).reshape(
            b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
        if alpha is None:
            att = a.softmax(-1)
        else:
            rs = F.relu(a) / (F.relu(a).sum(-1, keepdim=True) + eps)
            att = alpha * rs + (1 - alpha) * (a / n)
        o = (att @ v).transpose(1, 2).reshape(b, n, dim)
        h = h + F.linear(o, sd[p + "self_attn.proj.weight"], sd[p + "self_attn.proj.bias"])
        h = F.layer_norm(h, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        m = F.linear(h, sd[p + "linear1.weight"], sd[p + "linear1.bias"])
        beta = sd.get(p + "beta")
        if beta is None:
            m = F.linear(F.gelu(m), sd[p + "linear2.weight"], sd[p + "linear2.bias"])
        else:
            m = beta * F.gelu(m) + (1 - beta) * m
            m = F.linear(m, sd[p + "linear2.weight"], sd[p + "linear2.bias"])
            m = (1 - beta) * F.relu(m) + beta * m
        h = h + m
    h = F.layer_norm(h, (dim,), sd["classifier.norm.weight"], sd["classifier.norm.bias"])
    return F.linear(h[:, 0], sd["classifier.fc.weight"], sd["classifier.fc.bias"])


def binarised(sd: Mapping[str, torch.Tensor], spec: ArchSpec) -> dict[str, torch.Tensor]:
    """``sd`` with its alphas and betas replaced by the 0/1 values of ``spec`` (what a
    thresholded import computes), for :func:`reference_forward`."""
    out = dict(sd)
    for i, layer in enumerate(spec.layers):
        p = f"classifier.blocks.{i}."
        if p + "self_attn.alpha" in out:
            bits = [float(k is AttentionKind.RELU_SOFTMAX) for k in layer.attention]
            out[p + "self_attn.alpha"] = torch.tensor(bits).reshape(1, -1, 1, 1)
        if p + "beta" in out:
            beta = torch.ones_like(out[p + "beta"])
            if layer.token_mask is not None:
                beta.zero_()
                beta[0, list(layer.token_mask), 0] = 1.0
            out[p + "beta"] = beta
    return out


def to_reference_state_dict(model: ViT) -> dict[str, torch.Tensor]:
    """Our cct ViT's weights in the reference layout, alphas and betas included (the
    inverse of :func:`import_reference`, for tests and for running our models in the
    reference code).  Heads must be ReLU-softmax or scale (softmax everywhere for a
    teacher); activations GeLU."""
    if model.config.block != "cct":
        raise ValueError("only cct-style models have a reference layout")
    ours = model.state_dict()
    sd = {ref: ours[our].detach().clone() for ref, our in _TOP_MAP.items()}
    teacher = all(set(layer.attention) == {AttentionKind.SOFTMAX} for layer in model.spec.layers)
    for i, layer in enumerate(model.spec.layers):
        p = f"classifier.blocks.{i}."
        sd.update({p + ref: ours[f"blocks.{i}.{our}"].detach().clone()
                   for ref, our in _BLOCK_MAP.items()})
        if layer.activation is not ActivationKind.GELU:
            raise ValueError(f"layer {i}: the reference MLP is GeLU, not {layer.activation.value}")
        if not teacher:
            if not set(layer.attention) <= {AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE}:
                raise ValueError(f"layer {i}: the reference has only relu_softmax/scale heads")
            sd[p + "self_attn.alpha"] = torch.tensor(
                [float(k is AttentionKind.RELU_SOFTMAX) for k in layer.attention]
            ).reshape(1, -1, 1, 1)
        if layer.token_mask is not None:
            beta = torch.zeros(1, model.config.num_tokens, 1)
            beta[0, list(layer.token_mask), 0] = 1.0
            sd[p + "beta"] = beta
    return sd
