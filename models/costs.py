"""Measured MPC costs per building block, a network model, and the cost file.

"Costs are data": the profiler runs every building block of a ViT (each attention kind,
each MLP activation kind, LayerNorm, the linear layers) at the model's real shapes in a
2-party CrypTen run over gRPC with the dealer, records what CrypTen counts, and writes a
YAML cost file.  The search and the benchmarks only ever read that file.

What is recorded (all from party 0, as the rest of the project reports):

- ``rounds``: CrypTen's communication rounds (one per exchange call);
- ``bytes``: bytes party 0 sends (CrypTen counts 8 bytes per ring element it exchanges;
  the protocols are symmetric, so party 1 sends the same amount the other way and, on a
  full-duplex link, the two directions overlap);
- ``compute_s``: median wall seconds of the block on loopback (local compute plus the
  loopback transport's own overhead; the network model adds the real link on top);
- ``cpu_s``: median CPU seconds of party 0's process during the block (all its threads).
  On a machine shared with other jobs wall seconds grow with the load, CPU-bound work
  (FSS key evaluation) more than work that waits on rounds, so plans can be priced with
  ``cpu_s`` as the compute term instead (:meth:`CostModel.priced_by`);
- ``dealer_requests``: party 0's dealer round trips (recorded, not priced: the network
  model assumes the dealer is near party 0 or preprocessed offline);
- ``offline_bytes``: the dealer material party 0 received for the block (corrections and
  FSS keys; party 1 receives its FSS keys, about as many bytes): fetched offline, not
  priced by the network model either.

The blocks are profiled one layer at a time with batch 1: attention kinds at one head and
at all heads of a layer (rounds do not depend on the head count, bytes and compute grow
with it, so a kind used by ``n`` heads of a layer costs the affine interpolation), the
activation on one layer's hidden tensor, one LayerNorm on all tokens, the final
LayerNorm on the class token, the four linear layers of a block, and the stem (patch
embedding) plus head.  MPCViT+ token masks are priced per token: each maskable
activation on one token's row, and the ReLU after fc2 on one and on all tokens' rows.  A
whole model is then the sum over its layers.  CrypTen runs every op eagerly and in program
order, so rounds of independent blocks never merge: the sum is exact for rounds and
bytes, not an upper bound.

Protocol variants (``models/plan.py``): every entry whose protocol a plan can change is
also measured under each variant worth pricing (``plan.entry_variants``), and priced
under a :class:`~mpcvit.models.plan.ModelPlan` by the variant its block type runs.  The
cost file keeps them in a ``variants`` section (version 2); a version-1 file has the
default plan's prices only, and prices every other plan as missing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from mpcvit.mpc.netem import PRESETS, NetworkProfile
from mpcvit.mpc.netem import parse_network as parse_link

from .configs import ViTConfig
from .plan import ModelPlan, entry_block, label
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec, NormKind

COST_FILE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no protocol variants (the default plan only)
PLAN_BLOCKS = ("attention", "activation", "norm", "linear")  # ``CostModel.breakdown``

ATTENTION_KINDS = tuple(k.value for k in AttentionKind)
ACTIVATION_KINDS = tuple(k.value for k in ActivationKind)
BLOCK_NAMES = (
    *(f"attention.{k}" for k in ATTENTION_KINDS),
    *(f"activation.{k}" for k in ACTIVATION_KINDS),
    "layernorm",
    "batchnorm",
    "linear",
)
# The cost file's batchnorm entries (``CostModel.batchnorm`` keys): one folded BatchNorm
# (``per_layer``), an identity MLP's merge without a norm to fuse with, the final one
# (``once``).  Files profiled before batchnorm existed lack them and price no batchnorm.
BATCHNORM_ENTRIES = {"layer": "batchnorm", "identity": "batchnorm.identity",
                     "final": "batchnorm.final"}


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Cost:
    """What one block costs (party 0's counts; see the module docstring)."""

    rounds: float = 0.0
    bytes: float = 0.0
    compute_s: float = 0.0
    dealer_requests: float = 0.0
    offline_bytes: float = 0.0
    cpu_s: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.rounds + other.rounds, self.bytes + other.bytes,
                    self.compute_s + other.compute_s,
                    self.dealer_requests + other.dealer_requests,
                    self.offline_bytes + other.offline_bytes, self.cpu_s + other.cpu_s)

    def scale(self, k: float) -> Cost:
        return Cost(self.rounds * k, self.bytes * k, self.compute_s * k,
                    self.dealer_requests * k, self.offline_bytes * k, self.cpu_s * k)

    def to_dict(self) -> dict[str, float]:
        return {"rounds": _num(self.rounds), "bytes": _num(self.bytes),
                "compute_s": float(self.compute_s),
                "dealer_requests": _num(self.dealer_requests),
                "offline_bytes": _num(self.offline_bytes), "cpu_s": float(self.cpu_s)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cost:
        """From :meth:`to_dict`'s output; an entry without ``cpu_s`` (older files) takes
        its wall seconds as its CPU seconds."""
        try:
            compute = float(d["compute_s"])
            return cls(float(d["rounds"]), float(d["bytes"]), compute,
                       float(d.get("dealer_requests", 0.0)), float(d.get("offline_bytes", 0.0)),
                       float(d.get("cpu_s", compute)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad cost entry {d!r}: need rounds, bytes, compute_s") from e

    def with_cpu_compute(self) -> Cost:
        """This cost with its CPU seconds as its compute seconds."""
        return replace(self, compute_s=self.cpu_s)


def _num(v: float) -> float | int:
    """Integral counts as ints (readable YAML); interpolated ones stay floats."""
    return int(v) if float(v).is_integer() else float(v)


def total(costs: Iterable[Cost]) -> Cost:
    out = Cost()
    for c in costs:
        out = out + c
    return out


# ----------------------------------------------------------------------------- network


@dataclass(frozen=True)
class NetworkModel:
    """What a link adds to a measured loopback run (``inf`` bandwidth adds nothing).

    One definition for the whole project: presets, parsing and the formula come from
    :mod:`mpcvit.mpc.netem`, whose emulated links validate it (docs/benchmarks.md)::

        seconds = compute + (bytes / 2) · 8 / bandwidth + rounds · RTT / 2

    ``bytes`` is one party's CrypTen count, which counts an exchange both ways; a round
    is a simultaneous exchange, so each direction of the full-duplex link carries half
    the count and each round waits one one-way latency.
    """

    name: str
    bandwidth_bps: float
    rtt_s: float

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0 or self.rtt_s < 0:
            raise ValueError("bandwidth must be positive and RTT non-negative")

    @property
    def link(self) -> NetworkProfile:
        bw = None if math.isinf(self.bandwidth_bps) else self.bandwidth_bps
        return NetworkProfile(self.name, bw, self.rtt_s)

    def seconds(self, cost: Cost) -> float:
        return self.network_seconds(cost) + cost.compute_s

    def network_seconds(self, cost: Cost) -> float:
        """The part of :meth:`seconds` the link adds on top of loopback compute."""
        return self.link.mpc_seconds(cost.bytes, cost.rounds)

    def describe(self) -> str:
        if math.isinf(self.bandwidth_bps) and self.rtt_s == 0:
            return f"{self.name} (no added network cost)"
        return self.link.describe()

    def to_dict(self) -> dict[str, Any]:
        bw = "inf" if math.isinf(self.bandwidth_bps) else self.bandwidth_bps
        return {"name": self.name, "bandwidth_bps": bw, "rtt_s": self.rtt_s}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkModel:
        return cls(str(d["name"]), float(d["bandwidth_bps"]), float(d["rtt_s"]))

    @classmethod
    def from_link(cls, link: NetworkProfile) -> NetworkModel:
        bw = math.inf if link.bandwidth_bps is None else link.bandwidth_bps
        return cls(link.name, bw, link.rtt_s)


NETWORKS: dict[str, NetworkModel] = {
    name: NetworkModel.from_link(link) for name, link in PRESETS.items()
}


def parse_network(text: str) -> NetworkModel:
    """``lan``, ``wan``, ``loopback`` or ``BANDWIDTH,RTT`` such as ``1gbit,5ms``."""
    return NetworkModel.from_link(parse_link(text))


# ----------------------------------------------------------------------------- model


@dataclass
class CostModel:
    """Per-layer block costs of one ViT config; predicts any :class:`ArchSpec`.

    ``attention[kind] = (one head, all heads)`` of one layer; ``activation[kind]`` is one
    layer's MLP activation; ``layernorm`` one LayerNorm over all tokens (two per layer);
    ``layernorm_final`` the final LayerNorm on the class token; ``linear`` the four linear
    layers of one block; ``stem`` the patch embedding plus the head.

    ``batchnorm`` prices the BatchNorm kind (:data:`BATCHNORM_ENTRIES`): ``layer`` one
    BatchNorm folded into the linear layer it feeds (what the pair costs beyond the layer:
    about nothing), ``identity`` an identity MLP's merged layer against fc1 and fc2 when
    no LayerNorm fuses with it, ``final`` the final BatchNorm folded into the head.  A
    bias-free ReLU after a BatchNorm has no norm comparison to ride in: it is priced as
    ``activation.relu``, the same op on the same shape under the MLP's plan.

    ``token_mask`` prices MPCViT+ token masks: ``<kind>.one_token`` is the activation on
    one token's hidden row, ``relu_after.one_token``/``.all_tokens`` the ReLU after fc2
    on one and on all tokens' rows; k tokens cost the affine interpolation, as heads do.

    Those fields hold the default plan's prices.  ``variants[entry][label]`` holds an
    entry's price under another variant (entry: the cost file's name, such as
    ``attention.softmax.all_heads`` or ``token_mask.relu_after.one_token``; label:
    ``plan.label``).  Every pricing method takes an optional ``plan``
    (:class:`~mpcvit.models.plan.ModelPlan`; None: the default).
    """

    config: ViTConfig
    attention: dict[str, tuple[Cost, Cost]]
    activation: dict[str, Cost]
    layernorm: Cost
    layernorm_final: Cost
    linear: Cost
    stem: Cost
    meta: dict[str, Any] = field(default_factory=dict)
    token_mask: dict[str, Cost] = field(default_factory=dict)
    variants: dict[str, dict[str, Cost]] = field(default_factory=dict)
    batchnorm: dict[str, Cost] = field(default_factory=dict)

    # -- variants ------------------------------------------------------------------------
    @property
    def rectify_in_norm(self) -> bool:
        """Whether a bias-free ReLU rides in its LayerNorm's comparison at batch 1 (the
        norm is fused with fc1: ``vit.fuses_norm``), so the norm's plan runs it."""
        from .vit import fuses_norm

        cfg = self.config
        return cfg.block == "prenorm" and fuses_norm(cfg.mlp_hidden, cfg.dim, cfg.num_tokens)

    def entry_label(self, entry: str, plan: ModelPlan | None) -> str:
        """The variant of ``entry`` that ``plan`` runs (``default`` for no plan)."""
        block, relevant = entry_block(entry, self.rectify_in_norm)
        if plan is None or block is None:
            return "default"
        return label(plan.block(block), relevant)

    def price(self, entry: str, default: Cost, plan: ModelPlan | None) -> Cost:
        """``entry``'s cost under ``plan``: ``default`` for the default variant."""
        name = self.entry_label(entry, plan)
        if name == "default":
            return default
        try:
            return self.variants[entry][name]
        except KeyError:
            raise KeyError(f"cost file has no price of {entry} under {name}; re-run "
                           "mpcvit profile (it measures every variant)") from None

    # -- prediction ----------------------------------------------------------------------
    def attention_cost(self, kind: AttentionKind | str, heads: int,
                       plan: ModelPlan | None = None) -> Cost:
        """One layer's attention for ``heads`` heads of ``kind`` (0 heads cost nothing)."""
        kind = AttentionKind(kind).value
        if heads <= 0:
            return Cost()
        if kind not in self.attention:
            raise KeyError(f"cost file has no attention kind {kind!r}")
        one, full = self.attention[kind]
        one = self.price(f"attention.{kind}.one_head", one, plan)
        full = self.price(f"attention.{kind}.all_heads", full, plan)
        return _interpolate(one, full, heads, self.config.heads)

    def activation_cost(self, kind: ActivationKind | str, plan: ModelPlan | None = None,
                        norm: NormKind | str = NormKind.LAYERNORM) -> Cost:
        """One layer's activation after a norm of kind ``norm``: after a BatchNorm a
        bias-free ReLU costs a ReLU, and an identity MLP merges without a norm to fuse."""
        kind = ActivationKind(kind).value
        if NormKind(norm) is NormKind.BATCHNORM:
            if kind == ActivationKind.RELU_NOBIAS.value:
                return self.activation_cost(ActivationKind.RELU, plan)
            if kind == ActivationKind.IDENTITY.value:
                return self._batchnorm("identity")
        if kind not in self.activation:
            raise KeyError(f"cost file has no activation kind {kind!r}")
        return self.price(f"activation.{kind}", self.activation[kind], plan)

    def _batchnorm(self, key: str) -> Cost:
        if key not in self.batchnorm:
            raise KeyError(f"cost file has no price of {BATCHNORM_ENTRIES[key]}; re-run "
                           "mpcvit profile (it prices the batchnorm kind)")
        return self.batchnorm[key]

    def activation_block(self, kind: ActivationKind | str,
                         norm: NormKind | str = NormKind.LAYERNORM) -> str:
        """The block type whose plan runs a layer's activation ``kind`` after a norm of
        kind ``norm`` (a bias-free ReLU riding in its LayerNorm: ``norm``)."""
        if NormKind(norm) is NormKind.BATCHNORM:
            return "activation"
        return entry_block(f"activation.{ActivationKind(kind).value}",
                           self.rectify_in_norm)[0] or "activation"

    def _token_mask(self, name: str, plan: ModelPlan | None) -> Cost:
        return self.price(f"token_mask.{name}", self.token_mask[name], plan)

    def masked_activation_cost(self, kind: ActivationKind | str, tokens: int,
                               plan: ModelPlan | None = None,
                               norm: NormKind | str = NormKind.LAYERNORM) -> Cost:
        """One layer's MLP with a token mask selecting ``tokens`` of the layer's tokens:
        the activation on those rows, the ReLU after fc2 on the others.  A mask selecting
        no token makes the MLP linear before its ReLU: fc1 and fc2 merge, as for
        ``identity``."""
        kind = ActivationKind(kind).value
        n = self.config.num_tokens
        if not 0 <= tokens <= n:
            raise ValueError(f"{tokens} masked tokens of {n}")
        needed = [f"{kind}.one_token", "relu_after.one_token", "relu_after.all_tokens"]
        missing = [k for k in needed if k not in self.token_mask]
        if missing:
            raise KeyError(f"cost file has no token-mask prices {missing}; re-run mpcvit profile")
        if tokens == 0:
            act = self.activation_cost(ActivationKind.IDENTITY, plan, norm)
        else:
            act = _interpolate(self._token_mask(f"{kind}.one_token", plan),
                               self.activation_cost(kind, plan), tokens, n)
        relu = _interpolate(self._token_mask("relu_after.one_token", plan),
                            self._token_mask("relu_after.all_tokens", plan), n - tokens, n)
        return act + relu

    def layer_activation_cost(self, layer: LayerSpec, plan: ModelPlan | None = None) -> Cost:
        """One layer's MLP activation, token mask included."""
        if layer.token_mask is None:
            return self.activation_cost(layer.activation, plan, layer.norm)
        return self.masked_activation_cost(layer.activation, len(layer.token_mask), plan,
                                           layer.norm)

    def layernorm_cost(self, plan: ModelPlan | None = None) -> Cost:
        """One LayerNorm over all tokens (a block has two)."""
        return self.price("layernorm", self.layernorm, plan)

    def norm_cost(self, kind: NormKind | str = NormKind.LAYERNORM,
                  plan: ModelPlan | None = None) -> Cost:
        """One norm of ``kind`` over all tokens (a block has two).  Only a LayerNorm
        depends on the plan; a BatchNorm is folded and runs nothing."""
        if NormKind(kind) is NormKind.BATCHNORM:
            return self._batchnorm("layer")
        return self.layernorm_cost(plan)

    def final_norm_cost(self, kind: NormKind | str = NormKind.LAYERNORM,
                        plan: ModelPlan | None = None) -> Cost:
        """The final norm of ``kind`` (on the class token)."""
        if NormKind(kind) is NormKind.BATCHNORM:
            return self._batchnorm("final")
        return self.price("layernorm.final", self.layernorm_final, plan)

    def layer_cost(self, layer: LayerSpec, plan: ModelPlan | None = None) -> Cost:
        """One block: its attention groups (run one after another), activation, two
        norms and four linear layers."""
        att = total(self.attention_cost(k, len(hs), plan) for k, hs in layer.groups())
        return (att + self.layer_activation_cost(layer, plan)
                + self.norm_cost(layer.norm, plan).scale(2) + self.linear)

    def linear_cost(self) -> Cost:
        """Every spec's linear layers, stem and head."""
        return self.linear.scale(self.config.depth) + self.stem

    def fixed_cost(self, plan: ModelPlan | None = None,
                   norm: NormKind | str = NormKind.LAYERNORM) -> Cost:
        """What every spec with norms of kind ``norm`` pays: norms, linear layers, stem,
        head, final norm."""
        d = self.config.depth
        return (self.norm_cost(norm, plan).scale(2 * d) + self.final_norm_cost(norm, plan)
                + self.linear_cost())

    def breakdown(self, spec: ArchSpec, plan: ModelPlan | None = None) -> dict[str, Cost]:
        """Whole-model cost of ``spec`` split by the block type whose plan runs it
        (:data:`PLAN_BLOCKS`; ``linear``: the linear layers, which have no variants).  A
        bias-free ReLU that rides in its LayerNorm counts with ``norm``; folded
        BatchNorms count with ``norm`` too (about nothing)."""
        spec.validate(self.config.depth, self.config.heads)
        out = {b: Cost() for b in PLAN_BLOCKS}
        out["attention"] = total(self.attention_cost(k, len(hs), plan) for layer in spec.layers
                                 for k, hs in layer.groups())
        for layer in spec.layers:
            block = "activation"
            if layer.token_mask is None:
                block = self.activation_block(layer.activation, layer.norm)
            out[block] = out[block] + self.layer_activation_cost(layer, plan)
        out["norm"] = (out["norm"]
                       + total(self.norm_cost(layer.norm, plan) for layer in spec.layers).scale(2)
                       + self.final_norm_cost(spec.final_norm, plan))
        out["linear"] = self.linear_cost()
        return out

    def predict(self, spec: ArchSpec, plan: ModelPlan | None = None) -> Cost:
        """Whole-model cost of one batch-1 secure forward with ``spec`` under ``plan``."""
        return total(self.breakdown(spec, plan).values())

    def seconds(self, spec: ArchSpec, network: NetworkModel,
                plan: ModelPlan | None = None) -> float:
        return network.seconds(self.predict(spec, plan))

    def block_names(self) -> list[str]:
        """The names :meth:`blocks` reports (``attention.<kind>``, ``activation.<kind>``,
        ``layernorm``, ``batchnorm`` when priced, ``linear``)."""
        bn = ["batchnorm"] if {"layer", "final"} <= set(self.batchnorm) else []
        return [*(f"attention.{k}" for k in self.attention),
                *(f"activation.{k}" for k in self.activation), "layernorm", *bn, "linear"]

    def block(self, name: str, plan: ModelPlan | None = None) -> Cost:
        """Whole-model cost of one block name (all layers, all heads of that kind)."""
        d, h = self.config.depth, self.config.heads
        group, _, kind = name.partition(".")
        if group == "attention":
            return self.attention_cost(kind, h, plan).scale(d)
        if group == "activation":
            return self.activation_cost(kind, plan).scale(d)
        if name in ("layernorm", "batchnorm"):
            return self.norm_cost(name, plan).scale(2 * d) + self.final_norm_cost(name, plan)
        if name == "linear":
            return self.linear_cost()
        raise KeyError(f"unknown block {name!r}")

    def blocks(self, plan: ModelPlan | None = None) -> dict[str, Cost]:
        """Whole-model cost of each block name (all layers, all heads of that kind)."""
        return {name: self.block(name, plan) for name in self.block_names()}

    def blocks_table(self, network: NetworkModel,
                     plan: ModelPlan | None = None) -> dict[str, dict[str, float]]:
        """``blocks`` as the JSON/YAML report shape, with ``seconds`` under ``network``."""
        return {name: cost_row(c, network) for name, c in self.blocks(plan).items()}

    # -- per-head / per-layer prices for the search ---------------------------------------
    def head_seconds(self, kind: AttentionKind | str, network: NetworkModel,
                     plan: ModelPlan | None = None) -> float:
        """One head's share of a layer whose heads all use ``kind``."""
        h = self.config.heads
        return network.seconds(self.attention_cost(kind, h, plan)) / h

    def activation_seconds(self, kind: ActivationKind | str, network: NetworkModel,
                           plan: ModelPlan | None = None) -> float:
        return network.seconds(self.activation_cost(kind, plan))

    # -- serialisation ---------------------------------------------------------------------
    def to_dict(self, network: NetworkModel | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": COST_FILE_VERSION,
            "config": self.config.to_dict(),
            "meta": dict(self.meta),
            "per_layer": {
                **{f"attention.{k}": {"one_head": one.to_dict(), "all_heads": full.to_dict()}
                   for k, (one, full) in self.attention.items()},
                **{f"activation.{k}": c.to_dict() for k, c in self.activation.items()},
                "layernorm": self.layernorm.to_dict(),
                "linear": self.linear.to_dict(),
            },
            "once": {"layernorm.final": self.layernorm_final.to_dict(),
                     "linear.stem_head": self.stem.to_dict()},
        }
        d["per_layer"] |= {f"token_mask.{k}": c.to_dict() for k, c in self.token_mask.items()}
        for key, c in self.batchnorm.items():
            d["once" if key == "final" else "per_layer"][BATCHNORM_ENTRIES[key]] = c.to_dict()
        if self.variants:
            d["variants"] = {entry: {name: c.to_dict() for name, c in by_label.items()}
                             for entry, by_label in self.variants.items()}
        if network is not None:
            d["network"] = network.to_dict()
            d["blocks"] = self.blocks_table(network)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        if not isinstance(d, dict) or "version" not in d:
            raise ValueError("not a cost file (no version)")
        if d["version"] not in READABLE_VERSIONS:
            raise ValueError(f"cost file version {d['version']!r}: this code reads versions "
                             f"{list(READABLE_VERSIONS)}; re-run mpcvit profile")
        try:
            per, once = d["per_layer"], d["once"]
            attention = {k.split(".", 1)[1]: (Cost.from_dict(v["one_head"]),
                                               Cost.from_dict(v["all_heads"]))
                         for k, v in per.items() if k.startswith("attention.")}
            activation = {k.split(".", 1)[1]: Cost.from_dict(v)
                          for k, v in per.items() if k.startswith("activation.")}
            for k in attention:
                AttentionKind(k)
            for k in activation:
                ActivationKind(k)
            return cls(
                config=ViTConfig.from_dict(d["config"]),
                attention=attention,
                activation=activation,
                layernorm=Cost.from_dict(per["layernorm"]),
                layernorm_final=Cost.from_dict(once["layernorm.final"]),
                linear=Cost.from_dict(per["linear"]),
                stem=Cost.from_dict(once["linear.stem_head"]),
                meta=dict(d.get("meta") or {}),
                token_mask=_token_mask_costs(per),
                variants=_variant_costs(d.get("variants") or {}),
                batchnorm=_batchnorm_costs({**per, **once}),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cost file lacks a field: {e}") from e

    def priced_by(self, compute: str) -> CostModel:
        """This cost model with ``compute`` as every entry's compute term: ``wall`` (median
        loopback wall seconds, as profiled) or ``cpu`` (party 0's CPU seconds; see the
        module doc).  Rounds and bytes do not change."""
        if compute == "wall":
            return self
        if compute != "cpu":
            raise ValueError(f"compute must be wall or cpu, got {compute!r}")
        c = Cost.with_cpu_compute
        return replace(
            self,
            attention={k: (c(one), c(full)) for k, (one, full) in self.attention.items()},
            activation={k: c(v) for k, v in self.activation.items()},
            layernorm=c(self.layernorm), layernorm_final=c(self.layernorm_final),
            linear=c(self.linear), stem=c(self.stem),
            meta={**self.meta, "priced_compute": "cpu"},
            token_mask={k: c(v) for k, v in self.token_mask.items()},
            variants={e: {k: c(v) for k, v in by.items()} for e, by in self.variants.items()},
            batchnorm={k: c(v) for k, v in self.batchnorm.items()})

    def save(self, path: str | Path, network: NetworkModel | None = None) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(network), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path, config: ViTConfig | None = None) -> CostModel:
        """Read a cost file; with ``config``, refuse one profiled for another shape.

        The class count only changes the (small) head, so a head resized to a dataset's
        classes may reuse the file."""
        costs = cls.from_dict(yaml.safe_load(Path(path).read_text()))
        same = lambda c: c.replace(name="", num_classes=1)  # noqa: E731
        if config is not None and same(costs.config) != same(config):
            raise ValueError(f"cost file is for {costs.config.name or costs.config}, "
                             f"not {config.name or config}")
        return costs


def cost_model_from_measurements(
    config: ViTConfig, m: Mapping[str, Mapping[str, float]], meta: dict[str, Any] | None = None
) -> CostModel:
    """Assemble a :class:`CostModel` from :func:`profile_blocks_party`'s output: entry ->
    cost, and ``entry@label`` -> the entry's cost under another protocol variant."""
    variants: dict[str, dict[str, Any]] = {}
    for key in [k for k in m if "@" in k]:
        entry, _, name = key.partition("@")
        variants.setdefault(entry, {})[name] = m[key]
    m = {k: v for k, v in m.items() if "@" not in k}
    attention = {}
    for key in m:
        if key.startswith("attention.") and key.endswith(".all_heads"):
            kind = key[len("attention."):-len(".all_heads")]
            attention[kind] = (Cost.from_dict(m[f"attention.{kind}.one_head"]),
                               Cost.from_dict(m[key]))
    activation = {key.split(".", 1)[1]: Cost.from_dict(v) for key, v in m.items()
                  if key.startswith("activation.")}
    return CostModel(
        config=config, attention=attention, activation=activation,
        layernorm=Cost.from_dict(m["layernorm"]),
        layernorm_final=Cost.from_dict(m["layernorm.final"]),
        linear=Cost.from_dict(m["linear"]), stem=Cost.from_dict(m["linear.stem_head"]),
        meta=dict(meta or {}), token_mask=_token_mask_costs(m),
        variants=_variant_costs(variants), batchnorm=_batchnorm_costs(m),
    )


def _token_mask_costs(m: Mapping[str, Any]) -> dict[str, Cost]:
    """The ``token_mask.*`` entries of a cost file or of the profiler's output (absent
    from files profiled before token masks were priced)."""
    prefix = "token_mask."
    return {k[len(prefix):]: Cost.from_dict(v) for k, v in m.items() if k.startswith(prefix)}


def _batchnorm_costs(m: Mapping[str, Any]) -> dict[str, Cost]:
    """The batchnorm entries present in a cost file's sections or the profiler's output
    (:data:`BATCHNORM_ENTRIES`; none in files profiled before batchnorm existed)."""
    return {key: Cost.from_dict(m[name]) for key, name in BATCHNORM_ENTRIES.items()
            if name in m}


def _variant_costs(d: Mapping[str, Any]) -> dict[str, dict[str, Cost]]:
    """The ``variants`` section: entry -> label -> cost."""
    if not isinstance(d, Mapping):
        raise ValueError("cost file: 'variants' must map entries to {variant: cost}")
    out = {}
    for entry, by_label in d.items():
        if not isinstance(by_label, Mapping):
            raise ValueError(f"cost file: variants of {entry} must map labels to costs")
        out[str(entry)] = {str(k): Cost.from_dict(v) for k, v in by_label.items()}
    return out


def cost_row(c: Cost, network: NetworkModel) -> dict[str, float]:
    """A cost as the JSON/YAML report shape, with ``seconds`` under ``network``."""
    return {"rounds": int(round(c.rounds)), "bytes": int(round(c.bytes)),
            "compute_s": c.compute_s, "seconds": network.seconds(c)}


def _interpolate(one: Cost, full: Cost, count: int, of: int) -> Cost:
    """Cost of ``count`` of ``of`` units (heads, tokens) from the measured costs of one and
    of all: rounds do not depend on the count (above 0), bytes and compute grow with it."""
    if count <= 0:
        return Cost()
    if of == 1:
        return full.scale(count)
    return one + (full + one.scale(-1.0)).scale((count - 1) / (of - 1))
