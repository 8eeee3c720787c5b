"""MPC-latency-aware differentiable architecture search.

A supernet is the plaintext ViT with each block's attention and MLP swapped for mixing
modules that evaluate every candidate kind (with ``models.vit.attend`` and
``models.ops``, the very functions the plain and secure models use) and blend them:

- per head, softmax(α[layer, head]) over the candidate attention kinds;
- per layer, softmax(β[layer]) over the candidate MLP activations (MPCViT+);
- per layer (both of its norms) and for the final norm, softmax(δ) over the candidate
  norm kinds (LayerNorm, or a BatchNorm folded away under MPC).

The loss is the task loss plus λ times the *expected* latency under the cost file:
Σ over heads of softmax(α)·(per-head cost of each kind) + Σ over layers of
softmax(β)·(activation cost) + Σ over norms of softmax(δ)·(norm cost) + the fixed part,
divided by the latency of the most expensive candidate model so that λ is unitless.
An activation's cost may depend on the norm before it (a bias-free ReLU rides in a
LayerNorm's comparison, not in a folded BatchNorm): with both searched, a layer's
expected activation cost is Σ softmax(δ)ₙ·softmax(β)ₐ·cost(a after n).  The per-head
cost of a kind is its whole-layer cost (all heads) divided by the head count: exact
when a layer's heads share a kind.

Afterwards the mixture is binarised either MPCViT-style, a global top-k keeping the
fraction μ of heads with the highest weight on a non-cheapest kind, or greedily into
the spec the search prefers most that meets a latency budget under the cost model.

Protocol plans (``models/planner.py``): the search picks the plan with the architecture.
A kind's price in the loss is its cheapest protocol variant on the network; a whole spec
is priced under its cheapest plan (``planner.choose_plan``), which the command writes
next to the spec.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, planner
from .configs import ViTConfig
from .costs import CostModel, NetworkModel
from .data import DataBundle, Split
from .plan import ModelPlan
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec, NormKind
from .train import augment_batch, evaluate, iterate_batches, warmup_cosine
from .vit import Attention, Mlp, ViT, attend, make_norm, normed_linear

# ----------------------------------------------------------------------------- mixing


class MixedAttention(nn.Module):
    """Attention whose every head is a softmax(α)-weighted mix of candidate kinds.

    Holds the wrapped layer's ``qkv``/``proj`` (same parameter names, so the weights load
    straight into a ViT with any binarised spec)."""

    def __init__(self, attn: Attention, kinds: Sequence[AttentionKind]) -> None:
        super().__init__()
        self.kinds = tuple(AttentionKind(k) for k in kinds)
        self.heads, self.head_dim, self.scale, self.eps = (attn.heads, attn.head_dim,
                                                           attn.scale, attn.eps)
        self.qkv, self.proj = attn.qkv, attn.proj
        self.alpha = nn.Parameter(torch.zeros(self.heads, len(self.kinds)))

    def weights(self) -> torch.Tensor:
        """(heads, kinds) mixing weights."""
        return self.alpha.softmax(-1)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = normed_linear(self.qkv, x, norm)
        qkv = qkv.reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        outs = torch.stack([attend(kind, q, k, v, self.eps) for kind in self.kinds])
        o = torch.einsum("kbhnd,hk->bhnd", outs, self.weights())
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class MixedMlp(nn.Module):
    """MLP whose activation is a softmax(β)-weighted mix of candidate activations."""

    def __init__(self, mlp: Mlp, kinds: Sequence[ActivationKind]) -> None:
        super().__init__()
        self.kinds = tuple(ActivationKind(k) for k in kinds)
        self.fc1, self.fc2 = mlp.fc1, mlp.fc2
        self.beta = nn.Parameter(torch.zeros(len(self.kinds)))

    def weights(self) -> torch.Tensor:
        return self.beta.softmax(-1)

    def forward(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        n = x if norm is None else norm(x)  # once: a BatchNorm updates its statistics
        h = self.fc1(n)
        w = self.weights()
        y = sum(w[i] * self._activation(k, h, n, norm) for i, k in enumerate(self.kinds))
        return self.fc2(y)

    def _activation(self, kind: ActivationKind, h: torch.Tensor, n: torch.Tensor,
                    norm: nn.Module | None) -> torch.Tensor:
        if not kind.bias_free:
            return ops.ACTIVATION_FNS[kind.value](h)
        # As the derived layer computes it: no fc1 bias, no shift in the norm.
        return F.relu(F.linear(n - norm_shift(norm), self.fc1.weight))


def norm_shift(norm: nn.Module | None) -> torch.Tensor | float:
    """The shift β a norm adds after normalising and scaling (0 without one); a mixed
    norm's is the weighted shift of its candidates."""
    if norm is None:
        return 0.0
    if isinstance(norm, MixedNorm):
        w = norm.weights()
        return sum(w[i] * norm_shift(norm.norms[k.value]) for i, k in enumerate(norm.kinds))
    return 0.0 if norm.bias is None else norm.bias


class MixedNorm(nn.Module):
    """A norm that is a softmax(δ)-weighted mix of candidate norm kinds, each with its own
    parameters (``norms.<kind>.*``; :meth:`SuperNet.derive` keeps the chosen kind's).
    ``delta`` may be shared: a block's two norms have one kind."""

    def __init__(self, dim: int, eps: float, kinds: Sequence[NormKind], delta: nn.Parameter,
                 bias: bool = True) -> None:
        super().__init__()
        self.kinds = tuple(NormKind(k) for k in kinds)
        self.norms = nn.ModuleDict({k.value: make_norm(k, dim, eps, bias) for k in self.kinds})
        self.delta = delta

    def weights(self) -> torch.Tensor:
        return self.delta.softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        return sum(w[i] * self.norms[k.value](x) for i, k in enumerate(self.kinds))


class SuperNet(nn.Module):
    """A ViT whose blocks mix attention kinds per head (and activations per layer).

    The ViT's own block classes run unchanged; only their ``attn``/``mlp`` children (and,
    with ``norm_kinds``, their norms and the final norm) are swapped.
    ``activation_kinds=None`` keeps every layer's activation fixed (``activation``);
    ``norm_kinds=None`` every norm (``norm``).
    """

    def __init__(
        self,
        config: ViTConfig,
        attention_kinds: Sequence[AttentionKind | str],
        activation_kinds: Sequence[ActivationKind | str] | None = None,
        activation: ActivationKind | str = ActivationKind.GELU,
        norm_kinds: Sequence[NormKind | str] | None = None,
        norm: NormKind | str = NormKind.LAYERNORM,
    ) -> None:
        super().__init__()
        if not attention_kinds:
            raise ValueError("need at least one candidate attention kind")
        if norm_kinds is not None and not norm_kinds:
            raise ValueError("need at least one candidate norm kind")
        self.attention_kinds = tuple(AttentionKind(k) for k in attention_kinds)
        self.activation_kinds = (None if activation_kinds is None
                                 else tuple(ActivationKind(k) for k in activation_kinds))
        self.activation = ActivationKind(activation)
        self.norm_kinds = None if norm_kinds is None else tuple(NormKind(k) for k in norm_kinds)
        self.norm = NormKind(norm)
        spec = ArchSpec.uniform(config.depth, config.heads, self.attention_kinds[0],
                                self.activation, self.norm)
        self.vit = ViT(config, spec)
        for blk in self.vit.blocks:
            blk.attn = MixedAttention(blk.attn, self.attention_kinds)
            if self.activation_kinds is not None:
                blk.mlp = MixedMlp(blk.mlp, self.activation_kinds)
        if self.norm_kinds is not None:
            self._mix_norms(config)

    def _mix_norms(self, config: ViTConfig) -> None:
        """Every norm a :class:`MixedNorm`; one δ per block (both its norms) and one for
        the final norm."""
        if config.block != "prenorm":
            raise ValueError("searching norm kinds needs pre-norm blocks (a CCT block "
                             "keeps LayerNorms)")
        kinds = self.norm_kinds

        def mixed(old: nn.Module, delta: nn.Parameter) -> MixedNorm:
            return MixedNorm(config.dim, config.ln_eps, kinds, delta, old.bias is not None)

        for blk in self.vit.blocks:
            delta = nn.Parameter(torch.zeros(len(kinds)))
            blk.norm1, blk.norm2 = mixed(blk.norm1, delta), mixed(blk.norm2, delta)
        self.vit.norm = mixed(self.vit.norm, nn.Parameter(torch.zeros(len(kinds))))

    @property
    def config(self) -> ViTConfig:
        return self.vit.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith(_ARCH_NAMES)]

    def weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.endswith(_ARCH_NAMES)]

    def attention_probs(self) -> torch.Tensor:
        """(depth, heads, kinds)."""
        return torch.stack([blk.attn.weights() for blk in self.vit.blocks])

    def activation_probs(self) -> torch.Tensor | None:
        """(depth, kinds), or None when activations are not searched."""
        if self.activation_kinds is None:
            return None
        return torch.stack([blk.mlp.weights() for blk in self.vit.blocks])

    def norm_probs(self) -> torch.Tensor | None:
        """(depth + 1, kinds): each block's, then the final norm's; None when norms are
        not searched."""
        if self.norm_kinds is None:
            return None
        return torch.stack([*(blk.norm1.weights() for blk in self.vit.blocks),
                            self.vit.norm.weights()])

    def derive(self, spec: ArchSpec) -> ViT:
        """A plain ViT with ``spec`` carrying the supernet's shared weights (of each
        mixed norm, the chosen kind's)."""
        model = ViT(self.config, spec)
        # bias-free layers (``relu_nobias``) leave out their fc1 and norm2 biases
        wanted = model.state_dict().keys()
        state = {}
        for key, value in self.state_dict().items():
            key = key.removeprefix("vit.")
            owner, mixed, rest = key.partition(".norms.")
            if mixed:
                kind, _, leaf = rest.partition(".")
                if kind != _chosen_norm(spec, owner).value:
                    continue
                key = f"{owner}.{leaf}"
            if key in wanted:
                state[key] = value
        model.load_state_dict(state)
        return model


_ARCH_NAMES = (".alpha", ".beta", ".delta")  # mixing weights: attention, MLP, norm


def _chosen_norm(spec: ArchSpec, owner: str) -> NormKind:
    """The norm kind ``spec`` gives the norm at module path ``owner`` (``norm``, or
    ``blocks.<i>.norm1``/``norm2``)."""
    if owner == "norm":
        return spec.final_norm
    return spec.layers[int(owner.split(".")[1])].norm


# ----------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyPrices:
    """Seconds per head of each candidate attention kind, per layer of each candidate
    activation and norm kind, and the fixed part, all under one network."""

    head: torch.Tensor  # (attention kinds,)
    # (activation kinds,) when searched; (norm kinds, activation kinds) when norms are too
    activation: torch.Tensor | None
    fixed: float  # linears, stem, head; the norms and activation when not searched
    reference: float  # the most expensive candidate model (normalises the penalty)
    norm: torch.Tensor | None = None  # (norm kinds,): a layer's two, when searched
    final_norm: torch.Tensor | None = None  # (norm kinds,): the final norm

    @classmethod
    def from_costs(cls, costs: CostModel, network: NetworkModel, net: SuperNet) -> LatencyPrices:
        cfg = net.config
        if costs.config.replace(name="", num_classes=1) != cfg.replace(name="", num_classes=1):
            raise ValueError(f"cost file is for {costs.config}, the model is {cfg}")
        head = torch.tensor([planner.head_seconds(costs, k, network)
                             for k in net.attention_kinds])
        norms = net.norm_kinds
        fixed = planner.fixed_seconds(costs, network, norm=None if norms else net.norm)
        norm = final = None

        def act_price(kind: ActivationKind, after: NormKind) -> float:
            return planner.activation_seconds(costs, kind, network, norm=after)

        if norms is not None:
            norm = torch.tensor([planner.norm_seconds(costs, k, network) for k in norms])
            final = torch.tensor([planner.norm_seconds(costs, k, network, final=True)
                                  for k in norms])
        if net.activation_kinds is None:
            act = None
            if norms is None:
                fixed += cfg.depth * act_price(net.activation, net.norm)
            else:  # the fixed activation's price depends on the norm before it
                norm = norm + torch.tensor([act_price(net.activation, k) for k in norms])
        elif norms is None:
            act = torch.tensor([act_price(k, net.norm) for k in net.activation_kinds])
        else:
            act = torch.tensor([[act_price(k, n) for k in net.activation_kinds]
                                for n in norms])
        ref = fixed + cfg.depth * cfg.heads * float(head.max())
        if act is not None:
            ref += cfg.depth * float(act.max())
        if norm is not None and final is not None:
            ref += cfg.depth * float(norm.max()) + float(final.max())
        return cls(head, act, fixed, ref, norm, final)

    def expected(self, att_probs: torch.Tensor, act_probs: torch.Tensor | None,
                 norm_probs: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable expected seconds of the mixture (``norm_probs``: (depth + 1,
        norm kinds), the final norm last)."""
        e = (att_probs * self.head).sum() + self.fixed
        if act_probs is not None and self.activation is not None:
            if self.activation.dim() == 2:
                e = e + torch.einsum("ln,la,na->", norm_probs[:-1], act_probs, self.activation)
            else:
                e = e + (act_probs * self.activation).sum()
        if norm_probs is not None and self.norm is not None and self.final_norm is not None:
            e = e + (norm_probs[:-1] * self.norm).sum() + (norm_probs[-1] * self.final_norm).sum()
        return e


# ----------------------------------------------------------------------------- binarise


def plan_seconds(costs: CostModel, spec: ArchSpec, network: NetworkModel) -> float:
    """Predicted seconds of ``spec`` under its cheapest protocol plan on ``network``."""
    return costs.seconds(spec, network, planner.choose_plan(costs, spec, network))


def cheapest(kinds: Sequence[AttentionKind], costs: CostModel, network: NetworkModel) -> int:
    """Index of the cheapest attention kind per head under ``network`` (each under its
    cheapest protocol variant)."""
    prices = [planner.head_seconds(costs, k, network) for k in kinds]
    return min(range(len(kinds)), key=lambda i: prices[i])


def _activations(act_probs: torch.Tensor | None,
                 act_kinds: Sequence[ActivationKind | str] | None,
                 default: ActivationKind | str, depth: int) -> list[ActivationKind]:
    if act_probs is None:
        return [ActivationKind(default)] * depth
    return [ActivationKind(act_kinds[int(i)]) for i in act_probs.argmax(-1)]


def _norms(norm_probs: torch.Tensor | None, norm_kinds: Sequence[NormKind | str] | None,
           default: NormKind | str, depth: int) -> list[NormKind]:
    """depth + 1 norm kinds (each layer's, then the final norm's): argmax, or ``default``
    when norms are not searched."""
    if norm_probs is None:
        return [NormKind(default)] * (depth + 1)
    return [NormKind(norm_kinds[int(i)]) for i in norm_probs.argmax(-1)]


def _spec(rows: Sequence[Sequence[AttentionKind]], acts: Sequence[ActivationKind],
          norms: list[NormKind]) -> ArchSpec:
    return ArchSpec(tuple(LayerSpec(tuple(r), a, norm=n)
                          for r, a, n in zip(rows, acts, norms[:-1], strict=True)),
                    final_norm=norms[-1])


def binarize_mu(
    att_probs: torch.Tensor,
    attention_kinds: Sequence[AttentionKind],
    mu: float,
    cheap_index: int,
    act_probs: torch.Tensor | None = None,
    activation_kinds: Sequence[ActivationKind] | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
    norm_probs: torch.Tensor | None = None,
    norm_kinds: Sequence[NormKind] | None = None,
    norm: NormKind | str = NormKind.LAYERNORM,
) -> ArchSpec:
    """MPCViT's global top-k: the round(μ·heads) heads with the most weight off the
    cheapest kind keep their best non-cheapest kind; every other head becomes the cheapest
    kind.  Activations and norms take their argmax (or ``activation``/``norm`` when not
    searched)."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    depth, heads, nk = att_probs.shape
    kinds = [AttentionKind(k) for k in attention_kinds]
    keep = round(mu * depth * heads)
    score = (1.0 - att_probs[..., cheap_index]).reshape(-1).tolist()
    order = sorted(range(depth * heads), key=lambda i: (-score[i], i))[:keep]
    others = att_probs.clone()
    others[..., cheap_index] = -1.0
    best = others.argmax(-1)
    rows = [[kinds[cheap_index]] * heads for _ in range(depth)]
    if nk > 1:
        for i in order:
            layer, h = divmod(i, heads)
            rows[layer][h] = kinds[int(best[layer, h])]
    acts = _activations(act_probs, activation_kinds, activation, depth)
    return _spec(rows, acts, _norms(norm_probs, norm_kinds, norm, depth))


@dataclass(frozen=True)
class _Move:
    """One head's, one layer's activation or one norm's kind changed: the new index
    lists, and the old and new kinds' search weights and per-unit prices."""

    att: list[list[int]]
    act: list[int]
    weight_from: float
    weight_to: float
    price_from: float
    price_to: float
    from_cheapest: bool = False  # the slot's current kind is its cheapest candidate
    norm: list[int] = field(default_factory=list)


class _SpecSpace:
    """Index-encoded specs over the candidate kinds, their single-change moves and costs.
    Norms: depth + 1 indices (each layer's, then the final norm's), [] when not
    searched."""

    def __init__(self, att_probs: torch.Tensor, attention_kinds: Sequence[AttentionKind],
                 costs: CostModel, network: NetworkModel, act_probs: torch.Tensor | None,
                 activation_kinds: Sequence[ActivationKind] | None,
                 activation: ActivationKind | str, norm_probs: torch.Tensor | None = None,
                 norm_kinds: Sequence[NormKind | str] | None = None,
                 norm: NormKind | str = NormKind.LAYERNORM) -> None:
        self.att_probs, self.costs, self.network = att_probs, costs, network
        self.a_kinds = [AttentionKind(k) for k in attention_kinds]
        self.searched = act_probs is not None and activation_kinds is not None
        self.act_probs = act_probs
        self.f_kinds = [ActivationKind(k) for k in activation_kinds] if self.searched else []
        self.fixed_act = ActivationKind(activation)
        self.norms_searched = norm_probs is not None and norm_kinds is not None
        self.norm_probs = norm_probs
        self.n_kinds = [NormKind(k) for k in norm_kinds] if self.norms_searched else []
        self.fixed_norm = NormKind(norm)
        self.a_price = [planner.head_seconds(costs, k, network) for k in self.a_kinds]
        # an activation's price after each norm kind (a bias-free ReLU's depends on it)
        self.f_price = {n: [planner.activation_seconds(costs, k, network, norm=n)
                            for k in self.f_kinds]
                        for n in (self.n_kinds or [self.fixed_norm])}
        self.n_price = [planner.norm_seconds(costs, k, network) for k in self.n_kinds]
        self.final_price = [planner.norm_seconds(costs, k, network, final=True)
                            for k in self.n_kinds]

    def _norm_kinds(self, nrm: list[int], depth: int) -> list[NormKind]:
        if not self.norms_searched:
            return [self.fixed_norm] * (depth + 1)
        return [self.n_kinds[i] for i in nrm]

    def spec(self, att: list[list[int]], act: list[int], nrm: list[int]) -> ArchSpec:
        acts = [self.f_kinds[i] for i in act] if self.searched else [self.fixed_act] * len(att)
        return _spec([[self.a_kinds[i] for i in row] for row in att], acts,
                     self._norm_kinds(nrm, len(att)))

    def seconds(self, att: list[list[int]], act: list[int], nrm: list[int]) -> float:
        return plan_seconds(self.costs, self.spec(att, act, nrm), self.network)

    def moves(self, att: list[list[int]], act: list[int], nrm: list[int]) -> Iterator[_Move]:
        norms = self._norm_kinds(nrm, len(att))
        for layer, row in enumerate(att):
            for h, cur in enumerate(row):
                p = self.att_probs[layer, h]
                for k in range(len(self.a_kinds)):
                    if k != cur:
                        cand = [r[:] for r in att]
                        cand[layer][h] = k
                        yield _Move(cand, act, float(p[cur]), float(p[k]), self.a_price[cur],
                                    self.a_price[k], self.a_price[cur] == min(self.a_price),
                                    norm=nrm)
            if self.searched:
                p, cur = self.act_probs[layer], act[layer]
                price = self.f_price[norms[layer]]
                for k in range(len(self.f_kinds)):
                    if k != cur:
                        cand_act = act[:]
                        cand_act[layer] = k
                        yield _Move(att, cand_act, float(p[cur]), float(p[k]), price[cur],
                                    price[k], price[cur] == min(price), norm=nrm)
        for slot, cur in enumerate(nrm):
            p = self.norm_probs[slot]
            price = self.final_price if slot == len(att) else self.n_price
            for k in range(len(self.n_kinds)):
                if k != cur:
                    cand_norm = nrm[:]
                    cand_norm[slot] = k
                    yield _Move(att, act, float(p[cur]), float(p[k]), price[cur], price[k],
                                price[cur] == min(price), norm=cand_norm)


def binarize_budget(
    att_probs: torch.Tensor,
    attention_kinds: Sequence[AttentionKind],
    costs: CostModel,
    network: NetworkModel,
    budget_s: float,
    act_probs: torch.Tensor | None = None,
    activation_kinds: Sequence[ActivationKind] | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
    norm_probs: torch.Tensor | None = None,
    norm_kinds: Sequence[NormKind] | None = None,
    norm: NormKind | str = NormKind.LAYERNORM,
) -> ArchSpec:
    """The spec the search prefers that fits ``budget_s`` under the cost model.

    Start from every head's, layer's and norm's argmax kind.  While the prediction
    exceeds the budget, make the single downgrade (one head, one layer's activation or
    one norm to another kind) losing the least log-weight per second saved; raises
    ValueError if no downgrade reaches the budget.  Then spend what is left: while an
    upgrade (a kind with a higher per-head / per-layer price) still fits, take the one
    whose kind has the most weight.  A strong latency penalty can leave the argmax far
    below the budget; the upgrades rank heads as μ top-k does, but stop at the budget
    instead of at μ.  The penalty explains only a slot sitting on its cheapest kind: a
    slot on any other kind moves up only to a kind with more weight (a pricier kind is
    not a better one: quad costs more than relu_nobias on a WAN, and the search may
    weight it far lower)."""
    space = _SpecSpace(att_probs, attention_kinds, costs, network, act_probs,
                       activation_kinds, activation, norm_probs, norm_kinds, norm)
    att = att_probs.argmax(-1).tolist()
    act = act_probs.argmax(-1).tolist() if space.searched else []
    nrm = norm_probs.argmax(-1).tolist() if space.norms_searched else []
    current = space.seconds(att, act, nrm)
    while current > budget_s:
        best, best_key = None, None
        for mv in space.moves(att, act, nrm):
            s = space.seconds(mv.att, mv.act, mv.norm)
            saved = current - s
            if saved <= 1e-12:
                continue
            lost = math.log(max(mv.weight_from, 1e-12)) - math.log(max(mv.weight_to, 1e-12))
            key = (max(lost, 0.0) / saved, -saved)
            if best_key is None or key < best_key:
                best, best_key = (mv, s), key
        if best is None:
            raise ValueError(f"no spec of these kinds meets the {budget_s:.4g} s budget "
                             f"(reached {current:.4g} s)")
        (mv, current) = best
        att, act, nrm = mv.att, mv.act, mv.norm
    while True:
        best, best_key = None, None
        for mv in space.moves(att, act, nrm):
            if mv.price_to <= mv.price_from:
                continue
            if not mv.from_cheapest and mv.weight_to <= mv.weight_from:
                continue
            s = space.seconds(mv.att, mv.act, mv.norm)
            key = (-mv.weight_to, s)
            if s <= budget_s and (best_key is None or key < best_key):
                best, best_key = mv, key
        if best is None:
            return space.spec(att, act, nrm)
        att, act, nrm = best.att, best.act, best.norm


# ----------------------------------------------------------------------------- search


@dataclass(frozen=True)
class SearchConfig:
    """Hyper-parameters of one search run."""

    lam: float = 0.5  # weight of the normalised expected latency
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    arch_lr: float = 1e-2
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    augment: bool = True
    val_fraction: float = 0.1
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        if self.lam < 0 or self.epochs < 0 or self.batch_size <= 0:
            raise ValueError("lam and epochs must be >= 0, batch_size positive")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")


@dataclass(frozen=True)
class SearchEpoch:
    epoch: int
    epochs: int
    loss: float
    task_loss: float
    train_acc: float
    val_acc: float
    expected_s: float  # expected latency of the mixture
    argmax_s: float  # predicted latency of every head/layer's argmax kind
    seconds: float

    def line(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs} loss={self.loss:.4f} "
                f"task={self.task_loss:.4f} train_acc={self.train_acc:.4f} "
                f"val_acc={self.val_acc:.4f} expected_latency={self.expected_s:.4f}s "
                f"argmax_latency={self.argmax_s:.4f}s {self.seconds:.1f}s")


@dataclass
class SearchResult:
    net: SuperNet
    prices: LatencyPrices
    history: list[SearchEpoch] = field(default_factory=list)
    val: Split | None = None

    @property
    def attention_probs(self) -> torch.Tensor:
        return self.net.attention_probs().detach()

    @property
    def activation_probs(self) -> torch.Tensor | None:
        p = self.net.activation_probs()
        return None if p is None else p.detach()

    @property
    def norm_probs(self) -> torch.Tensor | None:
        p = self.net.norm_probs()
        return None if p is None else p.detach()


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, validation): a deterministic random ``fraction`` held out for validation."""
    n = len(split)
    n_val = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    val, train = sorted(perm[:n_val]), sorted(perm[n_val:])
    return (Split(split.images[train], split.labels[train]),
            Split(split.images[val], split.labels[val]))


def argmax_spec(net: SuperNet) -> ArchSpec:
    """Every head's, layer's and norm's highest-weight kind."""
    kinds = net.attention_kinds
    rows = [[kinds[i] for i in r] for r in net.attention_probs().argmax(-1).tolist()]
    depth = net.config.depth
    acts = _activations(net.activation_probs(), net.activation_kinds, net.activation, depth)
    return _spec(rows, acts, _norms(net.norm_probs(), net.norm_kinds, net.norm, depth))


def search(
    net: SuperNet,
    data: DataBundle,
    costs: CostModel,
    network: NetworkModel,
    cfg: SearchConfig = SearchConfig(),
    progress: Callable[[SearchEpoch], None] | None = None,
) -> SearchResult:
    """Jointly train the supernet's weights and α/β on the training split (minus the held
    out validation part): loss = CE + λ · expected latency / reference latency."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prices = LatencyPrices.from_costs(costs, network, net)
    train_split, val_split = split_validation(data.train, cfg.val_fraction, cfg.seed)
    tx, ty = train_split.tensors()
    vx, vy = val_split.tensors()
    steps = max(1, math.ceil(len(ty) / cfg.batch_size))
    decay = [p for n, p in net.weight_parameters() if p.ndim > 1 and "emb" not in n
             and "token" not in n]
    no_decay = [p for n, p in net.weight_parameters() if not (p.ndim > 1 and "emb" not in n
                                                              and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    arch_opt = torch.optim.Adam(net.arch_parameters(), lr=cfg.arch_lr, betas=(0.5, 0.999))
    total_steps, warm = max(1, cfg.epochs * steps), int(round(cfg.warmup_epochs * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, total_steps, warm, 0.01))
    fill = torch.tensor([-m / s for m, s in zip(data.normalization.mean,
                                                 data.normalization.std, strict=True)])
    result = SearchResult(net, prices, val=val_split)
    for epoch in range(cfg.epochs):
        tic = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        net.train()
        sums = {"loss": 0.0, "task": 0.0, "correct": 0.0, "n": 0}
        for x, y in iterate_batches(tx, ty, cfg.batch_size, gen):
            if cfg.augment:
                x = augment_batch(x, data.crop_padding, data.hflip, fill, gen)
            logits = net(x)
            task = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            lat = prices.expected(net.attention_probs(), net.activation_probs(),
                                  net.norm_probs())
            loss = task + cfg.lam * lat / prices.reference
            opt.zero_grad(set_to_none=True)
            arch_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for _, p in net.weight_parameters()], 1.0)
            opt.step()
            arch_opt.step()
            sched.step()
            b = len(y)
            sums["loss"] += loss.item() * b
            sums["task"] += task.item() * b
            sums["correct"] += (logits.argmax(-1) == y).sum().item()
            sums["n"] += b
        _, val_acc = evaluate(net, vx, vy)
        with torch.no_grad():
            expected = float(prices.expected(net.attention_probs(), net.activation_probs(),
                                             net.norm_probs()))
        n = max(1, sums["n"])
        stats = SearchEpoch(epoch + 1, cfg.epochs, sums["loss"] / n, sums["task"] / n,
                            sums["correct"] / n, val_acc, expected,
                            plan_seconds(costs, argmax_spec(net), network),
                            time.perf_counter() - tic)
        result.history.append(stats)
        if progress is not None:
            progress(stats)
    return result


# ----------------------------------------------------------------------------- pareto


@dataclass(frozen=True)
class ParetoPoint:
    mu: float
    spec: ArchSpec
    predicted_s: float
    rounds: float
    bytes: float
    val_acc: float
    plan: ModelPlan = ModelPlan()

    def row(self) -> dict[str, object]:
        s = self.spec.summary()
        return {"mu": self.mu, "predicted_s": round(self.predicted_s, 6),
                "rounds": int(self.rounds), "bytes": int(self.bytes),
                "val_acc": round(self.val_acc, 4),
                "kinds": " ".join(f"{k}={v}" for k, v in sorted(s.items())),
                "plan": self.plan.describe() or "default"}


def mu_sweep(
    result: SearchResult,
    costs: CostModel,
    network: NetworkModel,
    mus: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
) -> list[ParetoPoint]:
    """Binarise at every μ; predicted latency and held-out accuracy of the supernet's
    weights under each binarised spec (no retraining: a ranking, not final accuracy)."""
    net = result.net
    cheap = cheapest(net.attention_kinds, costs, network)
    points = []
    for mu in mus:
        spec = binarize_mu(result.attention_probs, net.attention_kinds, mu, cheap,
                           result.activation_probs, net.activation_kinds, net.activation,
                           result.norm_probs, net.norm_kinds, net.norm)
        acc = float("nan")
        if result.val is not None:
            vx, vy = result.val.tensors()
            _, acc = evaluate(net.derive(spec), vx, vy)
        plan = planner.choose_plan(costs, spec, network)
        c = costs.predict(spec, plan)
        points.append(ParetoPoint(mu, spec, network.seconds(c), c.rounds, c.bytes, acc, plan))
    return points


def write_pareto_csv(points: Sequence[ParetoPoint], path: str | os.PathLike) -> None:
    import csv

    with open(path, "w", newline="") as f:
        rows = [p.row() for p in points]
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mu"])
        w.writeheader()
        w.writerows(rows)
