"""Architecture spec: which attention kind each head uses, which MLP activation and which
norm kind each layer uses, and which norm feeds the head.

The spec is public (both parties need it to build the same computation), versioned and
stored as YAML next to checkpoints and produced by the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

SPEC_VERSION = 1
_LAYER_KEYS = {"attention", "activation", "token_mask", "norm"}


class AttentionKind(str, Enum):
    """Per-head attention map given scores a = q kᵀ / sqrt(head_dim) over N tokens."""

    SOFTMAX = "softmax"  # softmax(a)
    RELU_SOFTMAX = "relu_softmax"  # relu(a) / (sum relu(a) + eps)
    SCALE = "scale"  # a / N (linear: computed as q (kᵀ v) / N when cheaper)
    QUAD2 = "quad2"  # MPCFormer 2Quad: (a + c)² / sum (a + c)², c = 5


class ActivationKind(str, Enum):
    """MLP activation."""

    GELU = "gelu"
    RELU = "relu"
    QUAD = "quad"  # MPCFormer: 0.125 x² + 0.25 x + 0.5
    IDENTITY = "identity"
    # ReLU of a bias-free fc1 fed by a LayerNorm without shift (β): relu(W·x̂), which
    # commutes with the norm's positive 1/σ, so under MPC its sign test joins the norm's.
    # After a BatchNorm (folded into fc1, which then has a bias) there is no norm
    # comparison to join: the ReLU takes its own, and costs what ``relu`` costs.
    RELU_NOBIAS = "relu_nobias"

    @property
    def bias_free(self) -> bool:
        """Whether the layer's fc1 and the norm before it carry no bias."""
        return self is ActivationKind.RELU_NOBIAS


class NormKind(str, Enum):
    """The norm before a block's attention and MLP (and before the head).

    ``layernorm``: per-token statistics, computed under MPC (rsqrt, range comparison).
    ``batchnorm``: per-channel statistics over all tokens and images of a training batch,
    running statistics at inference, so an inference norm is a fixed per-channel affine
    map; the secure model folds it into the linear layer it feeds (``secure.fold_norms``)
    and no norm runs under MPC.  With ``relu_nobias`` after it, the ReLU cannot ride in a
    norm's comparison (there is none): it takes its own, priced as ``relu``.
    """

    LAYERNORM = "layernorm"
    BATCHNORM = "batchnorm"


def _enum(cls: type[Enum], v: Any, where: str) -> Any:
    if isinstance(v, cls):
        return v
    try:
        return cls(v)
    except ValueError:
        known = [m.value for m in cls]
        raise ValueError(f"{where}: unknown {cls.__name__} {v!r}; known: {known}") from None


# Activations that a token mask (MPCViT+) may restrict to some tokens.
MASKABLE_ACTIVATIONS = (ActivationKind.GELU, ActivationKind.RELU, ActivationKind.QUAD)


@dataclass(frozen=True)
class LayerSpec:
    """One block: an attention kind per head and one MLP activation.

    ``token_mask`` (MPCViT+, the reference's linear-GeLU mode): the indices of the tokens
    whose MLP applies ``activation``; every other token skips it (identity) and takes a
    ReLU after the MLP's second linear layer instead.  ``None``: every token uses the
    activation.  Like the head kinds the mask is public, so the secure model evaluates
    the activation on the selected tokens only.

    ``norm``: the kind of both norms of the block (:class:`NormKind`).
    """

    attention: tuple[AttentionKind, ...]
    activation: ActivationKind
    token_mask: tuple[int, ...] | None = None
    norm: NormKind = NormKind.LAYERNORM

    def __post_init__(self) -> None:
        att = self.attention
        if isinstance(att, (str, AttentionKind)):
            raise ValueError("LayerSpec.attention must be a sequence of per-head kinds")
        object.__setattr__(
            self, "attention", tuple(_enum(AttentionKind, a, "attention") for a in att)
        )
        object.__setattr__(self, "activation", _enum(ActivationKind, self.activation, "activation"))
        object.__setattr__(self, "norm", _enum(NormKind, self.norm, "norm"))
        if not self.attention:
            raise ValueError("LayerSpec.attention must list at least one head")
        if self.token_mask is not None:
            object.__setattr__(self, "token_mask", _token_indices(self.token_mask))
            if self.activation not in MASKABLE_ACTIVATIONS:
                raise ValueError(f"a token mask needs one of "
                                 f"{[k.value for k in MASKABLE_ACTIVATIONS]}, "
                                 f"not {self.activation.value!r}")

    @property
    def heads(self) -> int:
        return len(self.attention)

    def groups(self) -> list[tuple[AttentionKind, tuple[int, ...]]]:
        """Heads grouped by kind, in first-appearance order: [(kind, head indices)]."""
        order: dict[AttentionKind, list[int]] = {}
        for h, k in enumerate(self.attention):
            order.setdefault(k, []).append(h)
        return [(k, tuple(v)) for k, v in order.items()]


def _token_indices(mask: Any) -> tuple[int, ...]:
    if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
        raise ValueError(f"token_mask must be a list of token indices, got {mask!r}")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in mask):
        raise ValueError(f"token_mask must hold non-negative token indices, got {list(mask)}")
    if list(mask) != sorted(set(mask)):
        raise ValueError("token_mask indices must be increasing, without repeats")
    return tuple(mask)


@dataclass(frozen=True)
class ArchSpec:
    """Per-layer attention/activation/norm kinds for a whole ViT; ``final_norm``: the
    kind of the norm before the head."""

    layers: tuple[LayerSpec, ...]
    version: int = SPEC_VERSION
    final_norm: NormKind = NormKind.LAYERNORM

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "final_norm", _enum(NormKind, self.final_norm, "final_norm"))
        if self.version != SPEC_VERSION:
            raise ValueError(f"unsupported ArchSpec version {self.version!r} (want {SPEC_VERSION})")
        if not self.layers:
            raise ValueError("ArchSpec needs at least one layer")
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, LayerSpec):
                raise ValueError(f"layer {i}: expected LayerSpec, got {type(layer).__name__}")

    @property
    def depth(self) -> int:
        return len(self.layers)

    def norms(self) -> tuple[NormKind, ...]:
        """Every layer's norm kind, then the final norm's."""
        return (*(layer.norm for layer in self.layers), self.final_norm)

    def with_norm(self, norm: NormKind | str) -> ArchSpec:
        """This spec with every norm (each layer's and the final one) of kind ``norm``."""
        norm = _enum(NormKind, norm, "norm")
        return replace(self, layers=tuple(replace(layer, norm=norm) for layer in self.layers),
                       final_norm=norm)

    def validate(self, depth: int, heads: int, tokens: int | None = None) -> ArchSpec:
        """Raise ValueError unless this spec fits a model with ``depth`` layers of ``heads``
        (and, given ``tokens``, token masks within that many tokens)."""
        if self.depth != depth:
            raise ValueError(f"spec has {self.depth} layers, model has {depth}")
        for i, layer in enumerate(self.layers):
            if layer.heads != heads:
                raise ValueError(f"layer {i}: spec has {layer.heads} heads, model has {heads}")
            mask = layer.token_mask
            if tokens is not None and mask and mask[-1] >= tokens:
                raise ValueError(f"layer {i}: token mask names token {mask[-1]}, "
                                 f"model has {tokens} tokens")
        return self

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def uniform(
        cls,
        depth: int,
        heads: int,
        attention: AttentionKind | str = AttentionKind.SOFTMAX,
        activation: ActivationKind | str = ActivationKind.GELU,
        norm: NormKind | str = NormKind.LAYERNORM,
    ) -> ArchSpec:
        """Every head of every layer has the same kind (and every norm: ``norm``)."""
        return cls(tuple(LayerSpec((attention,) * heads, activation, norm=norm)
                         for _ in range(depth)), final_norm=norm)

    @classmethod
    def mix(
        cls,
        depth: int,
        heads: int,
        kinds: Sequence[AttentionKind | str] = (AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE),
        fractions: Sequence[float] | None = None,
        activation: ActivationKind | str = ActivationKind.GELU,
    ) -> ArchSpec:
        """Every layer splits its heads between ``kinds`` by ``fractions`` (default equal).

        The default is the MPCViT-style half ReLU-softmax / half scale mix.
        """
        if not kinds:
            raise ValueError("mix needs at least one kind")
        fr = list(fractions) if fractions is not None else [1.0 / len(kinds)] * len(kinds)
        if len(fr) != len(kinds) or any(f < 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise ValueError(f"fractions {fr} must be non-negative, one per kind, summing to 1")
        counts = [int(round(f * heads)) for f in fr]
        counts[-1] = heads - sum(counts[:-1])
        if counts[-1] < 0:
            raise ValueError(f"fractions {fr} do not split {heads} heads")
        row: list[AttentionKind | str] = []
        for k, c in zip(kinds, counts, strict=True):
            row += [k] * c
        return cls(tuple(LayerSpec(tuple(row), activation) for _ in range(depth)))

    @classmethod
    def grouped(
        cls,
        depth: int,
        heads: int,
        mu: float,
        accurate: AttentionKind | str = AttentionKind.RELU_SOFTMAX,
        cheap: AttentionKind | str = AttentionKind.SCALE,
        activation: ActivationKind | str = ActivationKind.GELU,
    ) -> ArchSpec:
        """round(mu · depth · heads) ``accurate`` heads packed into the first layers, the
        rest ``cheap``.

        Same head count as :meth:`mix`, far fewer rounds: a kind's rounds are paid once
        per layer that uses it, whatever its head count, so a layer without accurate
        heads skips them.  This is the layout the latency-aware search chose for the
        demo model (docs/search.md).
        """
        if not 0 <= mu <= 1:
            raise ValueError(f"mu must be in [0, 1], got {mu}")
        n = int(round(mu * depth * heads))
        layers = []
        for i in range(depth):
            k = min(heads, max(0, n - i * heads))
            layers.append(LayerSpec(tuple([accurate] * k + [cheap] * (heads - k)), activation))
        return cls(tuple(layers))

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        layers = []
        for layer in self.layers:
            d: dict[str, Any] = {"attention": [a.value for a in layer.attention],
                                 "activation": layer.activation.value}
            if layer.token_mask is not None:  # absent when unmasked: old readers still read it
                d["token_mask"] = list(layer.token_mask)
            if layer.norm is not NormKind.LAYERNORM:  # likewise: absent means layernorm
                d["norm"] = layer.norm.value
            layers.append(d)
        out: dict[str, Any] = {"version": self.version, "layers": layers}
        if self.final_norm is not NormKind.LAYERNORM:
            out["final_norm"] = self.final_norm.value
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ArchSpec:
        if not isinstance(d, dict):
            raise ValueError(f"ArchSpec must be a mapping, got {type(d).__name__}")
        if "version" not in d:
            raise ValueError("ArchSpec is missing its 'version' field")
        # ``plan``: the protocol plan chosen with the spec (models/plan.py reads it); not
        # part of the architecture, so the spec leaves it to that module.
        unknown = set(d) - {"version", "layers", "plan", "final_norm"}
        if unknown:
            raise ValueError(f"unknown ArchSpec fields: {sorted(unknown)}")
        layers = d.get("layers")
        if not isinstance(layers, list):
            raise ValueError("ArchSpec 'layers' must be a list")
        out = []
        for i, layer in enumerate(layers):
            if not isinstance(layer, dict) or not (
                    {"attention", "activation"} <= set(layer) <= _LAYER_KEYS):
                raise ValueError(f"layer {i}: need exactly 'attention' and 'activation' keys "
                                 "(plus an optional 'token_mask' and 'norm')")
            att = layer["attention"]
            if not isinstance(att, list):
                raise ValueError(f"layer {i}: 'attention' must be a list of per-head kinds")
            try:
                out.append(LayerSpec(tuple(att), layer["activation"], layer.get("token_mask"),
                                     layer.get("norm", NormKind.LAYERNORM)))
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
        return cls(tuple(out), version=d["version"],
                   final_norm=d.get("final_norm", NormKind.LAYERNORM))

    @classmethod
    def parse(cls, text: str, depth: int, heads: int) -> ArchSpec:
        """A spec from a YAML file's path, or from the ``ATTENTION[+ACTIVATION][+NORM]``
        shorthand applied to every head, layer and norm (e.g. ``relu_softmax+relu``,
        ``scale+relu+batchnorm``, ``scale+batchnorm``; GeLU and LayerNorm by default)."""
        path = Path(text)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            if not path.is_file():
                raise FileNotFoundError(f"arch spec not found: {path}")
            return cls.from_yaml(path.read_text()).validate(depth, heads)
        attention, *rest = text.split("+")
        norms = [p for p in rest if p in NormKind._value2member_map_]
        activations = [p for p in rest if p not in norms]
        if len(norms) > 1 or len(activations) > 1:
            raise ValueError(f"arch {text!r}: want ATTENTION[+ACTIVATION][+NORM]")
        spec = cls.uniform(depth, heads, attention, activations[0] if activations else "gelu")
        return spec.with_norm(norms[0]) if norms else spec

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str) -> ArchSpec:
        return cls.from_dict(yaml.safe_load(text))

    def summary(self) -> dict[str, int]:
        """Head and activation counts by kind (for logs and reports), and counts of the
        layers (``<kind>_layers``) and final norm (``final_<kind>``) whose norm is not a
        LayerNorm."""
        out: dict[str, int] = {}
        for layer in self.layers:
            for a in layer.attention:
                out[a.value] = out.get(a.value, 0) + 1
            out[layer.activation.value] = out.get(layer.activation.value, 0) + 1
            if layer.token_mask is not None:
                out["token_masked_layers"] = out.get("token_masked_layers", 0) + 1
            if layer.norm is not NormKind.LAYERNORM:
                key = f"{layer.norm.value}_layers"
                out[key] = out.get(key, 0) + 1
        if self.final_norm is not NormKind.LAYERNORM:
            out[f"final_{self.final_norm.value}"] = 1
        return out
