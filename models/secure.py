"""The ViT under CrypTen: the plaintext module tree mirrored with secret-shared weights.

``SecureViT`` does not re-implement any block.  It mirrors the ``nn.Module`` tree of
``models.vit.ViT``: every parameter becomes an ``MPCTensor`` shared from the model owner,
every plain attribute (head count, kind groups, eps, ...) is copied, and each mirrored
node calls its module class's own ``forward``.  Plaintext and secure models therefore
cannot drift apart; only ``models.ops`` dispatches on the backend.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.protocols.masked import MaskedWeight, mask_provider
from mpcvit.mpc.protocols.plan import ProtocolPlan
from torch import nn

from .configs import ViTConfig
from .plan import ModelPlan
from .spec import ActivationKind, ArchSpec
from .vit import BatchNorm, Block, CCTBlock, Linear, ViT

if TYPE_CHECKING:
    from crypten.mpc import MPCTensor


class SecureModule:
    """Mirror of one ``nn.Module`` whose parameters are ``MPCTensor``s.

    Methods of the original class (``forward`` and helpers) are looked up on that class
    and bound to the mirror, so ``self.qkv(x)`` inside a forward calls the mirrored child.
    """

    def __init__(self, module: nn.Module, encrypt: Callable[[torch.Tensor], MPCTensor]) -> None:
        self._cls = type(module)
        for name, value in vars(module).items():
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        for name, p in module._parameters.items():
            setattr(self, name, None if p is None else encrypt(p))
        for name, b in module._buffers.items():
            setattr(self, name, b)  # buffers are public structure
        for name, child in module._modules.items():
            setattr(self, name, _mirror(child, encrypt))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set on the instance: class methods and properties.
        attr = getattr(self.__dict__.get("_cls", object), name)
        if callable(attr):
            return types.MethodType(attr, self)
        raise AttributeError(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._cls.forward(self, *args, **kwargs)

    def parameters(self) -> list:
        """All MPCTensors of this subtree (for counting and re-sharing)."""
        out = []
        for v in vars(self).values():
            if isinstance(v, SecureModule):
                out += v.parameters()
            elif isinstance(v, list):
                for c in v:
                    out += c.parameters()
            elif hasattr(v, "_tensor") or isinstance(v, MaskedWeight):
                out.append(v)
        return out


def _mirror(module: nn.Module,
            encrypt: Callable[[torch.Tensor], MPCTensor]) -> SecureModule | list[Any]:
    if isinstance(module, nn.ModuleList):
        return [_mirror(m, encrypt) for m in module]
    return SecureModule(module, encrypt)


def share_module(module: nn.Module, src: int = 0, mask: bool = True) -> SecureModule:
    """Mirror any module of ``models.vit`` (a block, an attention layer, ...) with its
    parameters shared from rank ``src``.  Other ranks pass a module of the same structure
    (its weights are ignored; they contribute zeros).  Used for per-block checks and cost
    profiling.

    With ``mask`` and the dealer provider, linear weights become
    :class:`~mpcvit.mpc.protocols.masked.MaskedWeight`s: one round per weight now, and
    each later product opens only its input (see ``mpc/protocols/masked.py``)."""
    crypten = import_crypten()
    rank = crypten.communicator.get().get_rank()

    def encrypt(p: torch.Tensor) -> MPCTensor:
        data = p.detach().float() if rank == src else torch.zeros(p.shape)
        return crypten.cryptensor(data, src=src)

    root = _mirror(module, encrypt)
    if mask:
        mask_weights(root)
    return root


def mask_weights(root: SecureModule) -> int:
    """Replace the weight of every mirrored linear layer (and the patch embedding's conv)
    under ``root`` by a :class:`MaskedWeight`, all in one round.  Returns how many were
    masked (0 when the provider keeps no masks)."""
    if mask_provider() is None:
        return 0
    layers = []

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
            return
        if not isinstance(node, SecureModule):
            return
        if issubclass(node._cls, nn.Linear | nn.Conv2d) and hasattr(node.weight, "_tensor"):
            layers.append(node)
        for value in list(vars(node).values()):
            visit(value)

    visit(root)
    masked = MaskedWeight.share_many([layer.weight for layer in layers]) if layers else []
    for layer, weight in zip(layers, masked or [], strict=True):
        layer.weight = weight
    return len(layers)


def _fold_into(norm: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(γ ⊙ n + β) = (W·diag γ) n + (b + W β): move the norm's affine part into
    the linear layer that alone consumes its output."""
    if norm.weight is None:
        return
    with torch.no_grad():
        w = linear.weight.detach().clone()
        bias = w @ norm.bias.detach() if norm.bias is not None else None
        if linear.bias is not None:
            bias = linear.bias.detach().clone() if bias is None else bias + linear.bias.detach()
        linear.weight = nn.Parameter(w * norm.weight.detach())
        # a layer without either bias stays bias-free (``ops.norm_linear(rectify=True)``)
        linear.bias = None if bias is None else nn.Parameter(bias)
    norm.weight = None
    norm.bias = None


def fold_batchnorm(owner: nn.Module, name: str, linear: nn.Linear) -> None:
    """linear(s ⊙ x + t) = (W·diag s) x + (b + W t), with (s, t) the eval-mode map of the
    BatchNorm ``owner.<name>`` (running statistics, weight, bias, eps); the norm is then
    removed (``owner.<name>`` is None: ``vit.normed_linear`` runs the linear layer alone).
    The folded layer always has a bias, whatever the values, so every party's copy has
    the same structure."""
    norm = getattr(owner, name)
    with torch.no_grad():
        scale, shift = norm.affine_map()
        w = linear.weight.detach().clone()
        bias = w @ shift
        if linear.bias is not None:
            bias = bias + linear.bias.detach()
        linear.weight = nn.Parameter(w * scale)
        linear.bias = nn.Parameter(bias)
    delattr(owner, name)
    setattr(owner, name, None)


def _fold_norm(owner: nn.Module, name: str, linear: nn.Linear) -> None:
    """Fold ``owner.<name>`` into ``linear``: a BatchNorm whole, a LayerNorm's affine
    part."""
    if isinstance(getattr(owner, name), BatchNorm):
        fold_batchnorm(owner, name, linear)
    else:
        _fold_into(getattr(owner, name), linear)


def fold_norms(model: ViT) -> ViT:
    """A copy of ``model`` computing the same function (in eval mode) whose norms feeding
    a single linear layer are folded into it: pre-norm ``norm1`` -> qkv, ``norm2`` ->
    fc1, the final norm -> head (in a CCT block only ``pre_norm``; its ``norm1`` also
    feeds the residual).  A LayerNorm loses its affine part (under MPC each fold saves
    a secure multiplication and its round); a BatchNorm, an affine map at inference,
    goes entirely (no norm runs under MPC: 0 rounds, 0 bytes).  Every party folds its
    own copy before sharing, so the shared structure matches; only the owner's weights
    (and running statistics) are meaningful, and they are only ever shared folded."""
    model = copy.deepcopy(model)
    for blk in model.blocks:
        if isinstance(blk, Block):
            _fold_norm(blk, "norm1", blk.attn.qkv)
            _fold_norm(blk, "norm2", blk.mlp.fc1)
        elif isinstance(blk, CCTBlock):
            _fold_norm(blk, "pre_norm", blk.attn.qkv)
    _fold_norm(model, "norm", model.head)
    return model


def merge_linear_mlps(model: ViT) -> ViT:
    """A copy of ``model`` computing the same function whose identity-activation MLPs
    are one linear layer: fc2(fc1(h)) = (W₂W₁)h + (W₂b₁ + b₂).  Under MPC the layer
    saves fc2's round, and the LayerNorm fused with it (``vit.normed_linear``) scales a
    dim-wide output instead of a hidden-wide one.  Run it after :func:`fold_norms`, so
    that the norm's affine part is inside W₁ and b₁.  A layer whose token mask selects no
    token (MPCViT+ layer-wise linearisation: relu(fc2(fc1 x)) on every token) merges too;
    its ReLU follows the merged layer."""
    model = copy.deepcopy(model)
    for blk in model.blocks:
        mlp = blk.mlp
        linear = mlp.activation is ActivationKind.IDENTITY or mlp.token_mask == ()
        if linear and isinstance(mlp.fc2, nn.Linear):
            mlp.fc1, mlp.fc2 = merged_linear(mlp.fc1, mlp.fc2), nn.Identity()
    return model


def merged_linear(fc1: nn.Linear, fc2: nn.Linear) -> Linear:
    """One linear layer computing fc2(fc1(h))."""
    with torch.no_grad():
        w1, w2 = fc1.weight.detach(), fc2.weight.detach()
        merged = Linear(w1.shape[1], w2.shape[0])
        merged.weight = nn.Parameter(w2 @ w1)
        b = fc2.bias.detach().clone() if fc2.bias is not None else torch.zeros(w2.shape[0])
        if fc1.bias is not None:
            b += w2 @ fc1.bias.detach()
        merged.bias = nn.Parameter(b)
    return merged


def prepare_for_mpc(model: ViT) -> ViT:
    """The copy of ``model`` that gets shared: norms folded, linear MLPs merged.  Every
    party prepares its own copy the same way, so the shared structure matches."""
    return merge_linear_mlps(fold_norms(model))


class SecureViT:
    """A ViT whose weights are additive shares; forward maps an MPCTensor image batch
    (B, C, H, W) to MPCTensor logits (B, classes), never revealing anything.

    Build it with :meth:`from_model` inside an active CrypTen session on every party.
    The shares are plain tensors, so the object stays usable in later sessions.
    """

    def __init__(self, config: ViTConfig, spec: ArchSpec, root: SecureModule,
                 protocol: ModelPlan | ProtocolPlan | None = None) -> None:
        self.config = config
        self.spec = spec
        self.root = root
        self.protocol = ModelPlan.of(protocol)

    @classmethod
    def from_model(
        cls,
        model: ViT | None,
        config: ViTConfig | None = None,
        spec: ArchSpec | None = None,
        src: int = 0,
        protocol: ModelPlan | ProtocolPlan | None = None,
    ) -> SecureViT:
        """Share the owner's weights.  On rank ``src`` pass the trained ``model``; on the
        other ranks pass ``None`` plus the public ``config`` and ``spec``: they build the
        same structure and contribute zeros, so they only ever receive shares.

        ``protocol`` is the plan the secure model runs, one per block type or one for all
        (every party must pass the same; None: the owner's model's own plan on rank
        ``src``, the default plan elsewhere).
        """
        crypten = import_crypten()
        rank = crypten.communicator.get().get_rank()
        if rank == src:
            if model is None:
                raise ValueError(f"rank {src} owns the model and must pass it")
            config = config or model.config
            spec = spec or model.spec
            if config != model.config or spec != model.spec:
                raise ValueError("config/spec differ from the model's own")
            owner = model
        else:
            if config is None or spec is None:
                raise ValueError("non-owner ranks need the public config and spec")
            with torch.random.fork_rng():
                owner = ViT(config, spec)  # structure only; its weights are never shared

        prepared = prepare_for_mpc(owner)
        if protocol is None:
            protocol = getattr(owner, "protocol", None) if rank == src else None
        prepared.set_protocol(protocol)
        return cls(config, spec, share_module(prepared, src), prepared.protocol)

    def __call__(self, x: MPCTensor) -> MPCTensor:
        return self.root(x)

    forward = __call__

    def num_shared_parameters(self) -> int:
        return sum(p.numel() for p in self.root.parameters())


def share_input(image: torch.Tensor | None, shape: tuple[int, ...],
                src: int = 1) -> MPCTensor:
    """Encrypt an image batch held by rank ``src`` (others pass None and the shape)."""
    crypten = import_crypten()
    rank = crypten.communicator.get().get_rank()
    data = image.float() if rank == src else torch.zeros(shape)
    return crypten.cryptensor(data, src=src)


def reveal_float(x: MPCTensor, dst: int | None = None) -> torch.Tensor:
    """Reveal an MPCTensor and decode it exactly.

    Use this instead of ``get_plain_text``: CrypTen 0.4.1's ``FixedPointEncoder.decode``
    divides negative values by ``scale - 1`` before flooring, so a negative value within
    ~|v| ulps above an integer (e.g. -7.99997) decodes 1.0 too low (-8.99997).
    """
    ring = x.reveal() if dst is None else x.reveal(dst=dst)
    return (ring.double() / x.encoder.scale).float()


def program_fingerprint() -> str:
    """Hash of everything both parties' secure programs depend on: the protocols, the
    runtime and the model code (two parties with different hashes refuse to pair; a cost
    file profiled under another hash is stale)."""
    import sys

    from mpcvit.mpc.protocols import code_fingerprint

    from . import ops, vit

    return code_fingerprint(ops, vit, sys.modules[__name__])
