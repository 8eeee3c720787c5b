"""A protocol plan per block type of a ViT: which variant its attention maps, its MLP
activations and its norms run (:class:`ModelPlan`), and which plan fields each priced
entry of a cost file depends on.

Each secure module carries its own :class:`~mpcvit.mpc.protocols.plan.ProtocolPlan`
(``vit.Attention``, ``vit.Mlp`` and ``vit.LayerNorm``: their ``plan_block``), so a model
may run FSS comparisons in its attention and the carry tree in its LayerNorms: the cheapest
variant of one block type on one network need not be the cheapest of another (on a LAN a
LayerNorm's few comparisons cost less by the carry tree than by FSS keys, on a WAN the
rounds dominate everywhere).  One plan per block type, not per attention or activation
kind: the plan is chosen for one architecture, so a layer mixing kinds is priced exactly,
and a module never needs more than one plan.

The plan is public, like the spec: both parties must run the same.  It is plain data
(:meth:`ModelPlan.to_dict`: ``{block: ProtocolPlan fields that differ from the default}``)
that rides in the checkpoint, in the arch spec YAML the search writes (``plan:`` next to
``layers:``) and in the model description party 0 sends party 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml
from mpcvit.mpc.protocols.plan import DEFAULT, PLANS, ProtocolPlan

BLOCKS = ("attention", "activation", "norm")

# Per block, the sub-plans worth pricing, default first.  The spline variants run with FSS
# comparisons only: with the carry tree every breakpoint is a full comparison (~350 bytes
# per element, 8-10 breakpoints), more bytes than the rounds it saves are worth on any
# link below ~1 s RTT at 100 Mbps.  ``rsqrt=spline`` is priced too, although at batch 1
# the LayerNorm already uses the pieces (``functions.PIECES_MAX_EXTRA``), the same
# protocol: the named plan ``fss`` asks for it, and every plan a user can name must have a
# measured price.
_FSS = {"comparison": "fss"}
CANDIDATES: dict[str, tuple[dict[str, Any], ...]] = {
    "attention": ({}, _FSS, {**_FSS, "exp": "spline"}, {**_FSS, "reciprocal": "spline"},
                  {**_FSS, "exp": "spline", "reciprocal": "spline"}),
    "activation": ({}, _FSS, {**_FSS, "gelu": "spline"}),
    "norm": ({}, _FSS, {**_FSS, "rsqrt": "spline"}),
}

_CMP = ("comparison", "fss_bits")
# The plan fields each attention map / activation / norm depends on.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "attention.softmax": (*_CMP, "exp", "reciprocal"),
    "attention.relu_softmax": (*_CMP, "reciprocal"),
    "attention.quad2": (*_CMP, "reciprocal"),
    "attention.scale": (),
    "activation.gelu": (*_CMP, "gelu"),
    "activation.relu": _CMP,
    "activation.relu_nobias": _CMP,
    "activation.quad": (),
    "activation.identity": (),
    "layernorm": (*_CMP, "rsqrt"),
}


@dataclass(frozen=True)
class ModelPlan:
    """One :class:`ProtocolPlan` per block type (see the module doc)."""

    attention: ProtocolPlan = DEFAULT
    activation: ProtocolPlan = DEFAULT
    norm: ProtocolPlan = DEFAULT

    def __post_init__(self) -> None:
        for name in BLOCKS:
            if not isinstance(getattr(self, name), ProtocolPlan):
                raise ValueError(f"protocol plan: {name} must be a ProtocolPlan")

    def block(self, name: str) -> ProtocolPlan:
        """The plan of block type ``name`` (one of :data:`BLOCKS`)."""
        if name not in BLOCKS:
            raise ValueError(f"protocol plan: unknown block {name!r}; known: {list(BLOCKS)}")
        return getattr(self, name)

    def with_block(self, name: str, plan: ProtocolPlan) -> ModelPlan:
        self.block(name)
        return replace(self, **{name: plan})

    @classmethod
    def uniform(cls, plan: ProtocolPlan) -> ModelPlan:
        """Every block type runs ``plan``."""
        return cls(plan, plan, plan)

    @property
    def is_default(self) -> bool:
        return self == ModelPlan()

    @property
    def uses_dealer_keys(self) -> bool:
        return any(self.block(b).uses_dealer_keys for b in BLOCKS)

    # -- plain data -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{block: fields that differ from the default}``, default blocks left out
        (``{}`` is the default plan)."""
        out = {}
        for name in BLOCKS:
            diff = _diff(self.block(name))
            if diff:
                out[name] = diff
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelPlan:
        """From :meth:`to_dict`'s output, or a single ProtocolPlan's dict for every block;
        None or {} is the default plan.  Unknown blocks or fields are refused."""
        if not d:
            return cls()
        if not isinstance(d, Mapping):
            raise ValueError(f"protocol plan must be a mapping, got {type(d).__name__}")
        keys = set(d)
        if keys <= set(BLOCKS):
            return cls(**{b: ProtocolPlan.from_dict(_mapping(d[b], b)) for b in keys})
        plan_fields = {f.name for f in fields(ProtocolPlan)}
        if keys <= plan_fields:
            return cls.uniform(ProtocolPlan.from_dict(dict(d)))
        raise ValueError(f"protocol plan: unknown keys {sorted(keys - set(BLOCKS))}; a plan "
                         f"maps blocks {list(BLOCKS)} to ProtocolPlan fields "
                         f"{sorted(plan_fields)}")

    @classmethod
    def of(cls, plan: ModelPlan | ProtocolPlan | Mapping[str, Any] | str | None) -> ModelPlan:
        """A model plan from a model plan, one ProtocolPlan for every block, a dict
        (:meth:`from_dict`), text (:meth:`parse`) or None (the default)."""
        if plan is None:
            return cls()
        if isinstance(plan, ModelPlan):
            return plan
        if isinstance(plan, ProtocolPlan):
            return cls.uniform(plan)
        if isinstance(plan, str):
            return cls.parse(plan)
        return cls.from_dict(plan)

    @classmethod
    def parse(cls, text: str) -> ModelPlan:
        """A named plan (:data:`NAMED`), a YAML/JSON file (a plan, or an arch spec file
        with a ``plan:`` entry), or ``[block.]field=value,...`` over the default (a field
        without a block sets it in every block), e.g.
        ``attention.comparison=fss,attention.exp=spline,activation.comparison=fss``."""
        text = text.strip()
        if text in NAMED:
            return NAMED[text]
        path = Path(text)
        if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
            return read_plan_file(path)
        changes: dict[str, dict[str, Any]] = {b: {} for b in BLOCKS}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"protocol plan: expected a name in {sorted(NAMED)}, a plan "
                                 f"file or [block.]field=value items, got {item!r}")
            block, dot, name = key.strip().rpartition(".")
            value = value.strip()
            parsed: Any = int(value) if name == "fss_bits" else value
            for b in ((block,) if dot else BLOCKS):
                if b not in BLOCKS:
                    raise ValueError(f"protocol plan: unknown block {b!r}; known: {list(BLOCKS)}")
                changes[b][name] = parsed
        return cls.from_dict({b: c for b, c in changes.items() if c})

    def describe(self) -> str:
        """The plan's name if it has one, else ``block: field=variant,...`` for every block
        that differs from the default."""
        for name, plan in NAMED.items():
            if plan == self:
                return name
        return "; ".join(f"{b}: {self.block(b).describe()}" for b in BLOCKS
                         if self.block(b) != DEFAULT)

    def to_yaml(self) -> str:
        return yaml.safe_dump({"plan": self.to_dict()}, sort_keys=False)


def _mapping(value: Any, block: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"protocol plan: {block} must map fields to variants, got {value!r}")
    return dict(value)


def _diff(plan: ProtocolPlan) -> dict[str, Any]:
    return {f.name: getattr(plan, f.name) for f in fields(plan)
            if getattr(plan, f.name) != getattr(DEFAULT, f.name)}


# Named plans.  ``lan`` and ``wan`` are what ``mpcvit plan`` chose for the softmax
# vit_7_4_32 (CPU-priced, from a profile on this project's machine; docs/benchmarks.md,
# "Protocol plans per network"); fields a spec does not use do not matter (scale + ReLU
# gets the same plan).  ``mpcvit plan`` prices any other model and network.
NAMED: dict[str, ModelPlan] = {
    "default": ModelPlan(),
    "fss": ModelPlan.uniform(PLANS["fss"]),
    "lan": ModelPlan(attention=ProtocolPlan(comparison="fss"),
                     norm=ProtocolPlan(comparison="fss")),
    "wan": ModelPlan(
        attention=ProtocolPlan(comparison="fss", exp="spline", reciprocal="spline"),
        activation=ProtocolPlan(comparison="fss", gelu="spline"),
        norm=ProtocolPlan(comparison="fss")),
}


# ----------------------------------------------------------------------------- files


def read_plan_file(path: str | Path) -> ModelPlan:
    """A plan from a YAML/JSON file: ``{plan: {...}}`` (what ``mpcvit plan --out`` and
    ``mpcvit search`` write, an arch spec file included) or the plan mapping itself."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protocol plan file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if isinstance(data, Mapping) and "layers" in data and "plan" not in data:
        raise ValueError(f"{path}: an arch spec without a protocol plan")
    if isinstance(data, Mapping) and "plan" in data:
        data = data["plan"]
    try:
        return ModelPlan.from_dict(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def arch_plan(text: str | None) -> ModelPlan | None:
    """The plan stored in an arch spec YAML file (``plan:``), None when ``text`` is not a
    file or the file has no plan."""
    if not text:
        return None
    path = Path(text)
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, Mapping) or "plan" not in data:
        return None
    try:
        return ModelPlan.from_dict(data["plan"])
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def arch_yaml(spec: Any, plan: ModelPlan | None) -> str:
    """An arch spec's YAML with the plan chosen for it next to its layers."""
    d = spec.to_dict()
    if plan is not None:
        d["plan"] = plan.to_dict()
    return yaml.safe_dump(d, sort_keys=False, default_flow_style=None)


# ----------------------------------------------------------------------------- pricing keys


def entry_block(entry: str, fused_rectify: bool = True) -> tuple[str | None, tuple[str, ...]]:
    """The block type whose plan runs a cost file entry, and the plan fields its price
    depends on ((None, ()) for an entry without variants: linear layers).

    ``entry`` is a cost file name (``attention.softmax.one_head``, ``activation.gelu``,
    ``token_mask.relu.one_token``, ``token_mask.relu_after.all_tokens``, ``layernorm``,
    ``layernorm.final``).  A bias-free ReLU rides in its LayerNorm's comparison when the
    norm is fused with fc1 (``fused_rectify``; ``vit.fuses_norm``): then the norm's plan
    runs it."""
    parts = entry.split(".")
    if parts[0] == "attention":
        return "attention", KIND_FIELDS[f"attention.{parts[1]}"]
    if parts[0] == "activation":
        if parts[1] == "relu_nobias" and fused_rectify:
            return "norm", KIND_FIELDS["activation.relu_nobias"]
        return "activation", KIND_FIELDS[f"activation.{parts[1]}"]
    if parts[0] == "token_mask":
        kind = "relu" if parts[1] == "relu_after" else parts[1]
        return "activation", KIND_FIELDS[f"activation.{kind}"]
    if parts[0] == "layernorm":
        return "norm", KIND_FIELDS["layernorm"]
    return None, ()


def label(plan: ProtocolPlan, relevant: tuple[str, ...]) -> str:
    """The variant of ``plan`` an entry depending on ``relevant`` fields runs, as the
    cost file names it: ``field=value,...`` for the relevant fields that differ from the
    default, ``default`` when none does (``fss_bits`` only counts with FSS)."""
    diff = _diff(plan)
    if plan.comparison != "fss":
        diff.pop("fss_bits", None)
    items = [f"{k}={v}" for k, v in diff.items() if k in relevant]
    return ",".join(items) or "default"


def entry_variants(entry: str, fused_rectify: bool = True) -> dict[str, ProtocolPlan]:
    """The distinct variants of an entry worth profiling: label -> a plan running it."""
    block, relevant = entry_block(entry, fused_rectify)
    out: dict[str, ProtocolPlan] = {}
    for sub in CANDIDATES.get(block or "", ({},)):
        plan = ProtocolPlan.from_dict(sub)
        out.setdefault(label(plan, relevant), plan)
    return out


def block_candidates(block: str) -> list[ProtocolPlan]:
    """The sub-plans of a block type the planner tries, default first."""
    return [ProtocolPlan.from_dict(sub) for sub in CANDIDATES[block]]
