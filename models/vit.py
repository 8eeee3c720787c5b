"""Plaintext ViT-Lite (MPCViT/CCT shape), written once for both backends.

Every ``forward`` here uses only ``models.ops`` and tensor methods that torch tensors and
CrypTen ``MPCTensor``s share, so ``models.secure.SecureViT`` runs these same methods on a
mirror of the module tree whose parameters are secret shares.

The modules that call secure functions with several protocol variants (LayerNorm,
Attention, Mlp) carry a :class:`ProtocolPlan` as the attribute ``protocol`` (None: the
default plan), which the secure mirror copies.  Their ``plan_block`` names the block type
whose plan they run (``models.plan.ModelPlan``); ``ViT.set_protocol`` sets them all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from mpcvit.mpc.protocols.plan import ProtocolPlan
from torch import nn

from . import ops
from .configs import ViTConfig
from .plan import ModelPlan
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec, NormKind

if TYPE_CHECKING:
    from .secure import SecureModule  # the mirror a secure forward runs these methods on


class Linear(nn.Linear):
    """nn.Linear whose forward also accepts CrypTen tensors."""

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        return ops.linear(x, self.weight, self.bias)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward also accepts CrypTen tensors (robust inv-sqrt)."""

    plan_block = "norm"

    def __init__(self, *args: Any, protocol: ProtocolPlan | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.protocol = protocol

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, protocol=self.protocol)


class BatchNorm(nn.BatchNorm1d):
    """BatchNorm over the channel (last) dim: every token of every image is a sample.

    Training normalises by the batch's statistics and updates running ones; inference
    uses the running statistics, so the eval-mode norm is the per-channel affine map
    :meth:`affine_map`.  It has no secure form: ``secure.fold_norms`` folds it into the
    linear layer it feeds before the weights are shared, so no norm runs under MPC (and
    the running statistics, part of the model, are never public).  ``bias=False``: no
    shift β, as a bias-free MLP's norm (``relu_nobias``) has none.
    """

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1,
                 bias: bool = True) -> None:
        super().__init__(dim, eps=eps, momentum=momentum)
        if not bias:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not ops.is_plain(x):
            raise TypeError("a BatchNorm runs folded into the linear layer it feeds "
                            "(secure.fold_norms), never on secret shares")
        flat = x.reshape(-1, x.shape[-1])
        # one row has no variance: normalise it as inference does
        training = self.training and flat.shape[0] > 1
        if training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(flat, self.running_mean, self.running_var, self.weight, self.bias,
                         training, self.momentum, self.eps)
        return y.reshape(x.shape)

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) of the inference map x -> scale ⊙ x + shift."""
        scale = (self.running_var + self.eps).rsqrt()
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale.detach(), shift.detach()


def make_norm(kind: NormKind | str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """A norm of ``kind`` over ``dim`` channels."""
    if NormKind(kind) is NormKind.BATCHNORM:
        return BatchNorm(dim, eps=eps, bias=bias)
    return LayerNorm(dim, eps=eps, bias=bias)


def normed_linear(linear: Linear | SecureModule, x: ops.Tensor,
                  norm: LayerNorm | SecureModule | None = None, rectify: bool = False,
                  protocol: ProtocolPlan | None = None) -> ops.Tensor:
    """``linear(norm(x))``, or ``linear(x)`` without a norm; relu of it with ``rectify``.

    Under MPC a LayerNorm without an affine part (``secure.fold_norms`` moves it into
    the linear layer) is fused with the layer (``ops.norm_linear``: one round fewer)
    when the 2·(out − in) more opened elements per row that this costs stay within
    ``ops.FUSE_MAX_EXTRA``; the decision uses public shapes only.  In plaintext the
    modules are called as such, so forward hooks on them still fire.  A ReLU after a
    fused, bias-free layer costs no round of its own (``ops.norm_linear``).  ``protocol``
    is the caller's plan (the norm runs its own).
    """
    if norm is None:
        y = linear(x)
        return ops.relu(y, protocol) if rectify else y
    out_features, in_features = linear.weight.shape[0], linear.weight.shape[1]
    if (ops.is_plain(x) or norm.weight is not None or norm.bias is not None
            or not fuses_norm(out_features, in_features, math.prod(x.shape[:-1]))
            or (rectify and linear.bias is not None)):
        y = linear(norm(x))
        return ops.relu(y, protocol) if rectify else y
    return ops.norm_linear(x, norm.eps, linear.weight, linear.bias, rectify=rectify,
                           protocol=norm.protocol)


def fuses_norm(out_features: int, in_features: int, rows: int) -> bool:
    """Whether a folded LayerNorm is fused with the linear layer it feeds: the 2·(out − in)
    more opened elements per row stay within ``ops.FUSE_MAX_EXTRA`` (public shapes only;
    ``rows`` = batch × tokens)."""
    return 2 * max(0, out_features - in_features) * rows <= ops.FUSE_MAX_EXTRA


class PatchEmbed(nn.Module):
    """Conv tokenizer with kernel = stride = patch, evaluated as patchify + matmul."""

    def __init__(self, in_chans: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.dim = dim
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        w = self.proj.weight.reshape(self.dim, -1)
        return ops.linear(ops.patchify(x, self.patch), w, self.proj.bias)


def attend(kind: AttentionKind, q: ops.Tensor, k: ops.Tensor, v: ops.Tensor,
           eps: float = ops.ATTN_EPS, protocol: ProtocolPlan | None = None) -> ops.Tensor:
    """One attention kind applied to a group of heads: q, k, v are (B, h, N, d) and q is
    already multiplied by 1/sqrt(d); ``eps`` guards ReLU-softmax/2Quad denominators."""
    kt = k.transpose(-2, -1)
    if kind is AttentionKind.SCALE:
        n, d = k.shape[-2], k.shape[-1]
        # (q kᵀ / N) v == q (kᵀ v / N); the right-hand form is cheaper when d < N
        # (fewer elements to multiply and, under MPC, to open).
        if d < n:
            return q.matmul(kt.matmul(v) * (1.0 / n))
        return (q.matmul(kt) * (1.0 / n)).matmul(v)
    return ops.ATTENTION_FNS[kind.value](q.matmul(kt), eps=eps, protocol=protocol).matmul(v)


class Attention(nn.Module):
    """Multi-head attention with a per-head attention kind.

    Heads of the same kind are gathered (one ``index_select`` by a precomputed
    permutation) and evaluated by a single op per kind, never by a loop over heads.
    """

    plan_block = "attention"

    def __init__(
        self,
        dim: int,
        heads: int,
        kinds: tuple[AttentionKind, ...] | None = None,
        qkv_bias: bool = True,
        eps: float = ops.ATTN_EPS,
        protocol: ProtocolPlan | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.protocol = protocol
        kinds = tuple(kinds) if kinds is not None else (AttentionKind.SOFTMAX,) * heads
        if len(kinds) != heads:
            raise ValueError(f"got {len(kinds)} attention kinds for {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.set_kinds(kinds)

    def set_kinds(self, kinds: tuple[AttentionKind, ...]) -> None:
        groups = LayerSpec(tuple(kinds), ActivationKind.IDENTITY).groups()
        self.kinds = tuple(AttentionKind(k) for k in kinds)
        order = [h for _, hs in groups for h in hs]
        self.perm = None if order == sorted(order) else tuple(order)
        self.inv_perm = None if self.perm is None else tuple(order.index(h)
                                                            for h in range(self.heads))
        self.groups = []
        start = 0
        for kind, hs in groups:
            self.groups.append((kind, start, start + len(hs)))
            start += len(hs)

    def forward(self, x: ops.Tensor,
                norm: LayerNorm | SecureModule | None = None) -> ops.Tensor:
        """Attention over ``norm(x)`` (``x`` itself without a norm)."""
        b, n, c = x.shape
        qkv = normed_linear(self.qkv, x, norm, protocol=self.protocol)
        qkv = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.perm is not None:
            qkv = qkv.index_select(2, torch.tensor(self.perm))
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        outs = [attend(kind, q[:, s:e], k[:, s:e], v[:, s:e], self.eps, self.protocol)
                for kind, s, e in self.groups]
        o = outs[0] if len(outs) == 1 else ops.cat(outs, dim=1)
        if self.inv_perm is not None:
            o = o.index_select(1, torch.tensor(self.inv_perm))
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """fc2(act(fc1 x)).  With a token mask (MPCViT+) only the masked tokens apply the
    activation; the others compute relu(fc2(fc1 x)), as the reference's linear-GeLU mode.
    """

    plan_block = "activation"

    def __init__(self, dim: int, hidden: int, activation: ActivationKind,
                 token_mask: tuple[int, ...] | None = None, tokens: int | None = None,
                 protocol: ProtocolPlan | None = None) -> None:
        super().__init__()
        self.protocol = protocol
        self.activation = ActivationKind(activation)
        self.fc1 = Linear(dim, hidden, bias=not self.activation.bias_free)
        self.fc2 = Linear(hidden, dim)
        self.tokens = tokens
        self.set_token_mask(token_mask)

    def set_token_mask(self, token_mask: tuple[int, ...] | None) -> None:
        """Precompute the token order of a mask: selected tokens first (``order``, None
        when they already are) and its inverse; plain tuples, so the secure mirror copies
        them as public data."""
        self.token_mask = None if token_mask is None else tuple(token_mask)
        self.order = self.inverse = None
        if self.token_mask is None:
            return
        if self.tokens is None:
            raise ValueError("a token mask needs the layer's token count")
        chosen = set(self.token_mask)
        if any(t >= self.tokens for t in chosen):
            raise ValueError(f"token mask {self.token_mask} exceeds {self.tokens} tokens")
        order = [*self.token_mask, *(t for t in range(self.tokens) if t not in chosen)]
        if order != list(range(self.tokens)):
            self.order = tuple(order)
            self.inverse = tuple(order.index(t) for t in range(self.tokens))

    def forward(self, x: ops.Tensor,
                norm: LayerNorm | SecureModule | None = None) -> ops.Tensor:
        """The MLP of ``norm(x)`` (``x`` itself without a norm)."""
        if self.activation is ActivationKind.RELU_NOBIAS:
            return self.fc2(normed_linear(self.fc1, x, norm, rectify=True,
                                          protocol=self.protocol))
        h = normed_linear(self.fc1, x, norm, protocol=self.protocol)
        act = functools.partial(ops.ACTIVATION_FNS[self.activation.value],
                                protocol=self.protocol)
        if self.token_mask is None:
            return self.fc2(act(h))
        # Selected tokens' rows first; the activation runs on them alone, the other rows
        # take a ReLU after fc2.  Row gathers are local under MPC, so unselected tokens
        # cost no activation at all.
        if h.shape[1] != self.tokens:
            raise ValueError(f"token mask for {self.tokens} tokens, input has {h.shape[1]}")
        k = len(self.token_mask)
        if self.order is not None:
            h = h.index_select(1, torch.tensor(self.order))
        y = self.fc2(apply_to_rows(h, k, act, first=True))
        y = apply_to_rows(y, k, functools.partial(ops.relu, protocol=self.protocol),
                          first=False)
        return y if self.inverse is None else y.index_select(1, torch.tensor(self.inverse))


def apply_to_rows(x: ops.Tensor, k: int, fn: Callable[[ops.Tensor], ops.Tensor],
                  first: bool) -> ops.Tensor:
    """``fn`` applied to the rows ``[:k]`` (``first``) or ``[k:]`` of dim 1 alone, the
    other rows passed through untouched."""
    n = x.shape[1]
    lo, hi = (0, k) if first else (k, n)
    if lo == hi:
        return x
    if hi - lo == n:
        return fn(x)
    a, b = x.index_select(1, torch.arange(k)), x.index_select(1, torch.arange(k, n))
    return ops.cat([fn(a), b] if first else [a, fn(b)], dim=1)


class Block(nn.Module):
    """Pre-norm block: x += attn(norm1 x); x += mlp(norm2 x).  Both norms are of the
    layer's norm kind (``LayerSpec.norm``)."""

    def __init__(self, cfg: ViTConfig, layer: LayerSpec, qkv_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = make_norm(layer.norm, cfg.dim, cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, layer.attention, qkv_bias=qkv_bias,
                              eps=cfg.attn_eps)
        # a bias-free MLP needs a norm without shift before it (see ActivationKind)
        self.norm2 = make_norm(layer.norm, cfg.dim, cfg.ln_eps,
                               bias=not layer.activation.bias_free)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, layer.activation, layer.token_mask,
                       cfg.num_tokens)

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        x = x + self.attn(x, norm=self.norm1)
        return x + self.mlp(x, norm=self.norm2)


class CCTBlock(nn.Module):
    """MPCViT reference block: x += attn(pre_norm x); x = norm1 x; x += mlp x.

    LayerNorms only: ``norm1`` also feeds the residual, so a BatchNorm there could not
    fold into a linear layer (``secure.fold_norms``) and would run under MPC."""

    def __init__(self, cfg: ViTConfig, layer: LayerSpec, qkv_bias: bool = False) -> None:
        super().__init__()
        if layer.norm is not NormKind.LAYERNORM:
            raise ValueError(f"a CCT block's norms are LayerNorms, not {layer.norm.value}: "
                             "its norm1 feeds the residual and cannot fold into a linear "
                             "layer (use block: prenorm)")
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = Attention(cfg.dim, cfg.heads, layer.attention, qkv_bias=qkv_bias,
                              eps=cfg.attn_eps)
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_hidden, layer.activation, layer.token_mask,
                       cfg.num_tokens)

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        x = x + self.attn(x, norm=self.pre_norm)
        x = self.norm1(x)
        return x + self.mlp(x)


class ViT(nn.Module):
    """ViT-Lite: patch tokens + class token + positional embedding, blocks, norm, head.

    Only the class token feeds the head, so the final norm runs on it alone (a LayerNorm
    is per token, so this equals normalising all tokens and then selecting; a final
    BatchNorm's statistics are the class tokens').
    """

    def __init__(self, config: ViTConfig, spec: ArchSpec | None = None,
                 protocol: ModelPlan | ProtocolPlan | None = None) -> None:
        super().__init__()
        spec = spec if spec is not None else ArchSpec.uniform(config.depth, config.heads)
        spec.validate(config.depth, config.heads, config.num_tokens)
        self.config = config
        self.spec = spec
        self.patch_embed = PatchEmbed(config.in_chans, config.patch, config.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.dim))
        block_cls = Block if config.block == "prenorm" else CCTBlock
        self.blocks = nn.ModuleList(block_cls(config, layer) for layer in spec.layers)
        self.norm = make_norm(spec.final_norm, config.dim, config.ln_eps)
        self.head = Linear(config.dim, config.num_classes)
        self._init_weights()
        self.set_protocol(protocol)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.2)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def set_protocol(self, protocol: ModelPlan | ProtocolPlan | dict | str | None) -> None:
        """Run the secure building blocks with ``protocol``: a :class:`ModelPlan` (one
        plan per block type), one ProtocolPlan for every block, or None (the default):
        set on every module that carries a plan.  Plaintext outputs do not change."""
        plan = ModelPlan.of(protocol)
        self.protocol = plan
        for m in self.modules():
            if m is not self and hasattr(m, "plan_block"):
                m.protocol = plan.block(m.plan_block)

    def set_spec(self, spec: ArchSpec) -> None:
        """Switch attention/activation kinds in place.  The weights are kind-independent,
        except that a bias-free activation (``relu_nobias``) has no fc1 and norm bias,
        and that norm kinds have different parameters: switching to or from it, or
        another norm kind, is refused."""
        spec.validate(self.config.depth, self.config.heads, self.config.num_tokens)
        if spec.final_norm is not self.spec.final_norm:
            raise ValueError(f"final norm {self.spec.final_norm.value} -> "
                             f"{spec.final_norm.value} changes the parameters; train a "
                             "model with that spec instead")
        for i, (old, new) in enumerate(zip(self.spec.layers, spec.layers, strict=True)):
            if old.activation.bias_free != new.activation.bias_free:
                raise ValueError(f"layer {i}: {old.activation.value} -> "
                                 f"{new.activation.value} changes the MLP's parameters; "
                                 "train a model with that spec instead")
            if old.norm is not new.norm:
                raise ValueError(f"layer {i}: norm {old.norm.value} -> {new.norm.value} "
                                 "changes the parameters; train a model with that spec "
                                 "instead")
        for blk, layer in zip(self.blocks, spec.layers, strict=True):
            blk.attn.set_kinds(layer.attention)
            blk.mlp.activation = layer.activation
            blk.mlp.set_token_mask(layer.token_mask)
        self.spec = spec

    def class_token(self, x: ops.Tensor) -> ops.Tensor:
        """The class token after the last block, before the final LayerNorm."""
        t = self.patch_embed(x)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        x = ops.cat([cls, t], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return x[:, 0]

    def forward_features(self, x: ops.Tensor) -> ops.Tensor:
        h = self.class_token(x)
        return h if self.norm is None else self.norm(h)  # None: folded into the head

    def forward(self, x: ops.Tensor) -> ops.Tensor:
        return normed_linear(self.head, self.class_token(x), self.norm)


def build_model(config: ViTConfig | str, spec: ArchSpec | None = None,
                protocol: ProtocolPlan | None = None) -> ViT:
    """A ViT for a config (or config name) and an optional spec (default all-softmax, GeLU)
    and protocol plan (default: the default plan)."""
    if isinstance(config, str):
        from .configs import get_config

        config = get_config(config)
    return ViT(config, spec, protocol)
