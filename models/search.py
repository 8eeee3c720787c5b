"""MPC-latency-aware differentiable architecture search.

A supernet is the plaintext ViT with each block's attention and MLP swapped for mixing
modules that evaluate every candidate kind (with ``models.vit.attend`` and
``models.ops``, the very functions the plain and secure models use) and blend them:

- per head, softmax(α[layer, head]) over the candidate attention kinds;
- per layer, softmax(β[layer]) over the candidate MLP activations (MPCViT+).

The loss is the task loss plus λ times the *expected* latency under the cost file:
Σ over heads of softmax(α)·(per-head cost of each kind) + Σ over layers of
softmax(β)·(activation cost) + the fixed part, divided by the latency of the most
expensive candidate model so that λ is unitless.  The per-head cost of a kind is its
whole-layer cost (all heads) divided by the head count: exact when a layer's heads
share a kind.

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
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec
from .train import augment_batch, evaluate, iterate_batches, warmup_cosine
from .vit import Attention, Mlp, ViT, attend, normed_linear

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
        h = normed_linear(self.fc1, x, norm)
        w = self.weights()
        y = sum(w[i] * self._activation(k, h, x, norm) for i, k in enumerate(self.kinds))
        return self.fc2(y)

    def _activation(self, kind: ActivationKind, h: torch.Tensor, x: torch.Tensor,
                    norm: nn.Module | None) -> torch.Tensor:
        if not kind.bias_free:
            return ops.ACTIVATION_FNS[kind.value](h)
        # As the derived layer computes it: no fc1 bias, no shift in the LayerNorm.
        if norm is not None:
            x = F.layer_norm(x, x.shape[-1:], norm.weight, None, norm.eps)
        return F.relu(F.linear(x, self.fc1.weight))


class SuperNet(nn.Module):
    """A ViT whose blocks mix attention kinds per head (and activations per layer).

    The ViT's own block classes run unchanged; only their ``attn``/``mlp`` children are
    swapped.  ``activation_kinds=None`` keeps every layer's activation fixed (``activation``).
    """

    def __init__(
        self,
        config: ViTConfig,
        attention_kinds: Sequence[AttentionKind | str],
        activation_kinds: Sequence[ActivationKind | str] | None = None,
        activation: ActivationKind | str = ActivationKind.GELU,
    ) -> None:
        super().__init__()
        if not attention_kinds:
            raise ValueError("need at least one candidate attention kind")
        self.attention_kinds = tuple(AttentionKind(k) for k in attention_kinds)
        self.activation_kinds = (None if activation_kinds is None
                                 else tuple(ActivationKind(k) for k in activation_kinds))
        self.activation = ActivationKind(activation)
        spec = ArchSpec.uniform(config.depth, config.heads, self.attention_kinds[0],
                                self.activation)
        self.vit = ViT(config, spec)
        for blk in self.vit.blocks:
            blk.attn = MixedAttention(blk.attn, self.attention_kinds)
            if self.activation_kinds is not None:
                blk.mlp = MixedMlp(blk.mlp, self.activation_kinds)

    @property
    def config(self) -> ViTConfig:
        return self.vit.config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.endswith((".alpha", ".beta"))]

    def weight_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters()
                if not n.endswith((".alpha", ".beta"))]

    def attention_probs(self) -> torch.Tensor:
        """(depth, heads, kinds)."""
        return torch.stack([blk.attn.weights() for blk in self.vit.blocks])

    def activation_probs(self) -> torch.Tensor | None:
        """(depth, kinds), or None when activations are not searched."""
        if self.activation_kinds is None:
            return None
        return torch.stack([blk.mlp.weights() for blk in self.vit.blocks])

    def derive(self, spec: ArchSpec) -> ViT:
        """A plain ViT with ``spec`` carrying the supernet's shared weights."""
        model = ViT(self.config, spec)
        # bias-free layers (``relu_nobias``) leave out their fc1 and norm2 biases
        wanted = model.state_dict().keys()
        state = {k.removeprefix("vit."): v for k, v in self.state_dict().items()
                 if k.removeprefix("vit.") in wanted}
        model.load_state_dict(state)
        return model


# ----------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyPrices:
    """Seconds per head of each candidate attention kind, per layer of each candidate
    activation, and the fixed part, all under one network."""

    head: torch.Tensor  # (attention kinds,)
    activation: torch.Tensor | None  # (activation kinds,) when searched
    fixed: float  # LN, linears, stem, head; plus the fixed activation when not searched
    reference: float  # the most expensive candidate model (normalises the penalty)

    @classmethod
    def from_costs(cls, costs: CostModel, network: NetworkModel, net: SuperNet) -> LatencyPrices:
        cfg = net.config
        if costs.config.replace(name="", num_classes=1) != cfg.replace(name="", num_classes=1):
            raise ValueError(f"cost file is for {costs.config}, the model is {cfg}")
        head = torch.tensor([planner.head_seconds(costs, k, network)
                             for k in net.attention_kinds])
        fixed = planner.fixed_seconds(costs, network)
        if net.activation_kinds is None:
            act = None
            fixed += cfg.depth * planner.activation_seconds(costs, net.activation, network)
            act_max = 0.0
        else:
            act = torch.tensor([planner.activation_seconds(costs, k, network)
                                for k in net.activation_kinds])
            act_max = cfg.depth * float(act.max())
        ref = fixed + cfg.depth * cfg.heads * float(head.max()) + act_max
        return cls(head, act, fixed, ref)

    def expected(self, att_probs: torch.Tensor, act_probs: torch.Tensor | None) -> torch.Tensor:
        """Differentiable expected seconds of the mixture."""
        e = (att_probs * self.head).sum() + self.fixed
        if act_probs is not None and self.activation is not None:
            e = e + (act_probs * self.activation).sum()
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


def binarize_mu(
    att_probs: torch.Tensor,
    attention_kinds: Sequence[AttentionKind],
    mu: float,
    cheap_index: int,
    act_probs: torch.Tensor | None = None,
    activation_kinds: Sequence[ActivationKind] | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
) -> ArchSpec:
    """MPCViT's global top-k: the round(μ·heads) heads with the most weight off the
    cheapest kind keep their best non-cheapest kind; every other head becomes the cheapest
    kind.  Activations take their argmax (or ``activation`` when not searched)."""
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
    return ArchSpec(tuple(LayerSpec(tuple(r), a) for r, a in zip(rows, acts, strict=True)))


@dataclass(frozen=True)
class _Move:
    """One head's or one layer's kind changed: the new index lists, and the old and new
    kinds' search weights and per-unit prices."""

    att: list[list[int]]
    act: list[int]
    weight_from: float
    weight_to: float
    price_from: float
    price_to: float
    from_cheapest: bool = False  # the slot's current kind is its cheapest candidate


class _SpecSpace:
    """Index-encoded specs over the candidate kinds, their single-change moves and costs."""

    def __init__(self, att_probs: torch.Tensor, attention_kinds: Sequence[AttentionKind],
                 costs: CostModel, network: NetworkModel, act_probs: torch.Tensor | None,
                 activation_kinds: Sequence[ActivationKind] | None,
                 activation: ActivationKind | str) -> None:
        self.att_probs, self.costs, self.network = att_probs, costs, network
        self.a_kinds = [AttentionKind(k) for k in attention_kinds]
        self.searched = act_probs is not None and activation_kinds is not None
        self.act_probs = act_probs
        self.f_kinds = [ActivationKind(k) for k in activation_kinds] if self.searched else []
        self.fixed_act = ActivationKind(activation)
        self.a_price = [planner.head_seconds(costs, k, network) for k in self.a_kinds]
        self.f_price = [planner.activation_seconds(costs, k, network) for k in self.f_kinds]

    def spec(self, att: list[list[int]], act: list[int]) -> ArchSpec:
        return ArchSpec(tuple(
            LayerSpec(tuple(self.a_kinds[i] for i in row),
                      self.f_kinds[act[layer]] if self.searched else self.fixed_act)
            for layer, row in enumerate(att)))

    def seconds(self, att: list[list[int]], act: list[int]) -> float:
        return plan_seconds(self.costs, self.spec(att, act), self.network)

    def moves(self, att: list[list[int]], act: list[int]) -> Iterator[_Move]:
        for layer, row in enumerate(att):
            for h, cur in enumerate(row):
                p = self.att_probs[layer, h]
                for k in range(len(self.a_kinds)):
                    if k != cur:
                        cand = [r[:] for r in att]
                        cand[layer][h] = k
                        yield _Move(cand, act, float(p[cur]), float(p[k]), self.a_price[cur],
                                    self.a_price[k], self.a_price[cur] == min(self.a_price))
            if self.searched:
                p, cur = self.act_probs[layer], act[layer]
                for k in range(len(self.f_kinds)):
                    if k != cur:
                        cand_act = act[:]
                        cand_act[layer] = k
                        yield _Move(att, cand_act, float(p[cur]), float(p[k]),
                                    self.f_price[cur], self.f_price[k],
                                    self.f_price[cur] == min(self.f_price))


def binarize_budget(
    att_probs: torch.Tensor,
    attention_kinds: Sequence[AttentionKind],
    costs: CostModel,
    network: NetworkModel,
    budget_s: float,
    act_probs: torch.Tensor | None = None,
    activation_kinds: Sequence[ActivationKind] | None = None,
    activation: ActivationKind | str = ActivationKind.GELU,
) -> ArchSpec:
    """The spec the search prefers that fits ``budget_s`` under the cost model.

    Start from every head's and layer's argmax kind.  While the prediction exceeds the
    budget, make the single downgrade (one head or one layer's activation to another kind)
    losing the least log-weight per second saved; raises ValueError if no downgrade
    reaches the budget.  Then spend what is left: while an upgrade (a kind with a higher
    per-head / per-layer price) still fits, take the one whose kind has the most weight.
    A strong latency penalty can leave the argmax far below the budget; the upgrades rank
    heads as μ top-k does, but stop at the budget instead of at μ.  The penalty explains
    only a slot sitting on its cheapest kind: a slot on any other kind moves up only to a
    kind with more weight (a pricier kind is not a better one: quad costs more than
    relu_nobias on a WAN, and the search may weight it far lower)."""
    space = _SpecSpace(att_probs, attention_kinds, costs, network, act_probs,
                       activation_kinds, activation)
    att = att_probs.argmax(-1).tolist()
    act = act_probs.argmax(-1).tolist() if space.searched else []
    current = space.seconds(att, act)
    while current > budget_s:
        best, best_key = None, None
        for mv in space.moves(att, act):
            s = space.seconds(mv.att, mv.act)
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
        att, act = mv.att, mv.act
    while True:
        best, best_key = None, None
        for mv in space.moves(att, act):
            if mv.price_to <= mv.price_from:
                continue
            if not mv.from_cheapest and mv.weight_to <= mv.weight_from:
                continue
            s = space.seconds(mv.att, mv.act)
            key = (-mv.weight_to, s)
            if s <= budget_s and (best_key is None or key < best_key):
                best, best_key = mv, key
        if best is None:
            return space.spec(att, act)
        att, act = best.att, best.act


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


def split_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """(train, validation): a deterministic random ``fraction`` held out for validation."""
    n = len(split)
    n_val = max(1, int(round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    val, train = sorted(perm[:n_val]), sorted(perm[n_val:])
    return (Split(split.images[train], split.labels[train]),
            Split(split.images[val], split.labels[val]))


def argmax_spec(net: SuperNet) -> ArchSpec:
    """Every head's and layer's highest-weight kind."""
    kinds = net.attention_kinds
    rows = net.attention_probs().argmax(-1).tolist()
    acts = _activations(net.activation_probs(), net.activation_kinds, net.activation,
                        net.config.depth)
    return ArchSpec(tuple(LayerSpec(tuple(kinds[i] for i in r), a)
                          for r, a in zip(rows, acts, strict=True)))


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
            lat = prices.expected(net.attention_probs(), net.activation_probs())
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
            expected = float(prices.expected(net.attention_probs(), net.activation_probs()))
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
                           result.activation_probs, net.activation_kinds, net.activation)
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
