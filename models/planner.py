"""The cheapest protocol plan of an architecture on a network, from the cost file.

A plan (``models/plan.py``) names one variant per block type: attention, activation,
norm.  The blocks' costs are independent (each cost file entry is run by exactly one
block type's plan: :meth:`CostModel.breakdown`), so the cheapest plan is the cheapest
variant of each block type, priced over the architecture's own layers with the network
model (``seconds = compute + bytes/bandwidth + rounds·RTT/2``).

Only the **online** phase is priced: the dealer's material (Beaver corrections, FSS keys)
is fetched before the image arrives, and the party service prepares it while idle, so it
costs throughput, not latency.  It is reported (``offline_bytes``) but does not choose.

Compute seconds are medians measured on a shared machine, the one noisy term (rounds and
bytes are exact).  A variant therefore replaces the default only when it saves more than
``min_gain`` of the larger of the two compute figures: a near tie stays with the default,
which needs no FSS keys.  It follows that a plan never prices slower than the default on
the network it was chosen for, block by block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mpcvit.mpc.protocols.plan import DEFAULT, ProtocolPlan

from .costs import PLAN_BLOCKS, Cost, CostModel, NetworkModel, cost_row, total
from .plan import BLOCKS, ModelPlan, block_candidates, entry_block
from .spec import ActivationKind, ArchSpec, AttentionKind, NormKind

MIN_GAIN = 0.1  # of the block's compute seconds (see the module doc)


def pick(block: str, price: Callable[[ProtocolPlan], Cost], network: NetworkModel,
         min_gain: float = MIN_GAIN) -> tuple[ProtocolPlan, Cost]:
    """The cheapest candidate sub-plan of ``block`` under ``price`` (a sub-plan's cost)
    and its cost; candidates without prices in the cost file are skipped."""
    base = price(DEFAULT)
    best, best_cost = DEFAULT, base
    best_s = network.seconds(base)
    for cand in block_candidates(block)[1:]:
        try:
            cost = price(cand)
        except KeyError:
            continue
        s = network.seconds(cost)
        margin = min_gain * max(base.compute_s, cost.compute_s)
        if s < best_s and s < network.seconds(base) - margin:
            best, best_cost, best_s = cand, cost, s
    return best, best_cost


def choose_plan(costs: CostModel, spec: ArchSpec, network: NetworkModel,
                min_gain: float = MIN_GAIN) -> ModelPlan:
    """The cheapest plan of ``spec`` on ``network`` (see the module doc)."""
    plan = ModelPlan()
    for block in BLOCKS:
        def price(sub: ProtocolPlan, block: str = block, base: ModelPlan = plan) -> Cost:
            return costs.breakdown(spec, base.with_block(block, sub))[block]

        sub, _ = pick(block, price, network, min_gain)
        plan = plan.with_block(block, sub)
    return plan


def has_variants(costs: CostModel) -> bool:
    """Whether the cost file prices any variant besides the default."""
    return bool(costs.variants)


# ----------------------------------------------------------------------------- search prices


def head_seconds(costs: CostModel, kind: AttentionKind | str, network: NetworkModel,
                 min_gain: float = MIN_GAIN) -> float:
    """One head's share of a layer whose heads all use ``kind``, under the kind's cheapest
    attention variant."""
    h = costs.config.heads
    _, cost = pick("attention", lambda p: costs.attention_cost(
        kind, h, ModelPlan(attention=p)), network, min_gain)
    return network.seconds(cost) / h


def activation_seconds(costs: CostModel, kind: ActivationKind | str, network: NetworkModel,
                       min_gain: float = MIN_GAIN,
                       norm: NormKind | str = NormKind.LAYERNORM) -> float:
    """One layer's activation after a norm of kind ``norm``, under its cheapest variant
    (a bias-free ReLU riding in its LayerNorm: under the norm's)."""
    block = costs.activation_block(kind, norm)
    _, cost = pick(block, lambda p: costs.activation_cost(
        kind, ModelPlan().with_block(block, p), norm), network, min_gain)
    return network.seconds(cost)


def fixed_seconds(costs: CostModel, network: NetworkModel, min_gain: float = MIN_GAIN,
                  norm: NormKind | str | None = NormKind.LAYERNORM) -> float:
    """Norms of kind ``norm``, linear layers, stem and head, under the norm's cheapest
    variant (which only a LayerNorm has); ``norm=None``: the linear part alone (the
    norms are searched: :func:`norm_seconds`)."""
    if norm is None:
        return network.seconds(costs.linear_cost())
    _, cost = pick("norm", lambda p: costs.fixed_cost(ModelPlan(norm=p), norm), network,
                   min_gain)
    return network.seconds(cost)


def norm_seconds(costs: CostModel, kind: NormKind | str, network: NetworkModel,
                 final: bool = False, min_gain: float = MIN_GAIN) -> float:
    """A layer's two norms of ``kind`` (``final``: the final norm) under the cheapest
    norm variant."""
    def price(p: ProtocolPlan) -> Cost:
        plan = ModelPlan(norm=p)
        if final:
            return costs.final_norm_cost(kind, plan)
        return costs.norm_cost(kind, plan).scale(2)

    _, cost = pick("norm", price, network, min_gain)
    return network.seconds(cost)


# ----------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class PlanReport:
    """A chosen plan with its per-block costs, and the default plan's for comparison."""

    network: NetworkModel
    plan: ModelPlan
    blocks: dict[str, Cost]
    default_blocks: dict[str, Cost]

    @property
    def cost(self) -> Cost:
        return total(self.blocks.values())

    @property
    def default_cost(self) -> Cost:
        return total(self.default_blocks.values())

    def to_dict(self) -> dict[str, Any]:
        net = self.network
        return {
            "network": net.to_dict(), "plan": self.plan.to_dict(),
            "describe": self.plan.describe(),
            "blocks": {b: {"variant": self.variant(b), **cost_row(c, net),
                           "offline_bytes": int(round(c.offline_bytes))}
                       for b, c in self.blocks.items()},
            "total": {**cost_row(self.cost, net),
                      "offline_bytes": int(round(self.cost.offline_bytes))},
            "default_total": {**cost_row(self.default_cost, net),
                              "offline_bytes": int(round(self.default_cost.offline_bytes))},
        }

    def variant(self, block: str) -> str:
        return self.plan.block(block).describe() if block in BLOCKS else "-"

    def lines(self, title: str) -> list[str]:
        """The report as a printed table."""
        net = self.network
        out = [f"{title} on {net.describe()}: plan {self.plan.describe() or 'default'}",
               f"  {'block':<11}{'variant':<44}{'rounds':>7}{'MB':>9}{'dealer MB':>11}"
               f"{'seconds':>9}{'default s':>11}"]
        rows = [(b, self.blocks[b], self.default_blocks[b]) for b in PLAN_BLOCKS]
        rows.append(("total", self.cost, self.default_cost))
        for name, c, d in rows:
            variant = self.variant(name) if name != "total" else ""
            out.append(f"  {name:<11}{variant:<44}{c.rounds:>7.0f}{c.bytes / 1e6:>9.2f}"
                       f"{c.offline_bytes / 1e6:>11.1f}{net.seconds(c):>9.3f}"
                       f"{net.seconds(d):>11.3f}")
        return out


def plan_report(costs: CostModel, spec: ArchSpec, network: NetworkModel,
                plan: ModelPlan | None = None, min_gain: float = MIN_GAIN) -> PlanReport:
    """The cheapest plan of ``spec`` on ``network`` (or ``plan``, priced) with its costs."""
    plan = plan if plan is not None else choose_plan(costs, spec, network, min_gain)
    return PlanReport(network, plan, costs.breakdown(spec, plan), costs.breakdown(spec))


def variants_table(costs: CostModel, networks: list[NetworkModel]) -> list[dict[str, Any]]:
    """Every priced variant of every block name, whole model (all layers use the kind),
    with its seconds on each network: rows of {block, variant, rounds, bytes,
    offline_bytes, seconds: {network: s}}."""
    rows = []
    for block_name in costs.block_names():
        plan_block, _ = _block_of(costs, block_name)
        if plan_block is None:
            subs = [DEFAULT]
        else:
            subs = block_candidates(plan_block)
        seen: set[str] = set()
        for sub in subs:
            plan = ModelPlan().with_block(plan_block, sub) if plan_block else ModelPlan()
            name = costs.entry_label(_entry_of(block_name), plan)
            if name in seen:
                continue
            try:
                c = costs.block(block_name, plan)
            except KeyError:
                continue
            seen.add(name)
            rows.append({"block": block_name, "variant": name, "rounds": int(round(c.rounds)),
                         "bytes": int(round(c.bytes)), "offline_bytes": int(round(
                             c.offline_bytes)), "compute_s": c.compute_s,
                         "seconds": {n.name: n.seconds(c) for n in networks}})
    return rows


def _entry_of(block_name: str) -> str:
    """A cost file entry of a ``CostModel.blocks`` name (for its variant label)."""
    return f"{block_name}.all_heads" if block_name.startswith("attention.") else block_name


def _block_of(costs: CostModel, block_name: str) -> tuple[str | None, tuple[str, ...]]:
    return entry_block(_entry_of(block_name), costs.rectify_in_norm)
