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
- ``dealer_requests``: party 0's dealer round trips (recorded, not priced: the network
  model assumes the dealer is near party 0 or preprocessed offline).

The blocks are profiled one layer at a time with batch 1: attention kinds at one head and
at all heads of a layer (rounds do not depend on the head count, bytes and compute grow
with it, so a kind used by ``n`` heads of a layer costs the affine interpolation), the
activation on one layer's hidden tensor, one LayerNorm on all tokens, the final
LayerNorm on the class token, the four linear layers of a block, and the stem (patch
embedding) plus head.  A whole model is then the sum over its layers.  CrypTen runs every
op eagerly and in program order, so rounds of independent blocks never merge: the sum is
exact for rounds and bytes, not an upper bound.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from mpcvit.mpc.netem import PRESETS, NetworkProfile
from mpcvit.mpc.netem import parse_network as parse_link

from .configs import ViTConfig
from .spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec

COST_FILE_VERSION = 1

ATTENTION_KINDS = tuple(k.value for k in AttentionKind)
ACTIVATION_KINDS = tuple(k.value for k in ActivationKind)
BLOCK_NAMES = (
    *(f"attention.{k}" for k in ATTENTION_KINDS),
    *(f"activation.{k}" for k in ACTIVATION_KINDS),
    "layernorm",
    "linear",
)


# ----------------------------------------------------------------------------- costs


@dataclass(frozen=True)
class Cost:
    """What one block costs (party 0's counts; see the module docstring)."""

    rounds: float = 0.0
    bytes: float = 0.0
    compute_s: float = 0.0
    dealer_requests: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.rounds + other.rounds, self.bytes + other.bytes,
                    self.compute_s + other.compute_s,
                    self.dealer_requests + other.dealer_requests)

    def scale(self, k: float) -> Cost:
        return Cost(self.rounds * k, self.bytes * k, self.compute_s * k,
                    self.dealer_requests * k)

    def to_dict(self) -> dict[str, float]:
        return {"rounds": _num(self.rounds), "bytes": _num(self.bytes),
                "compute_s": float(self.compute_s),
                "dealer_requests": _num(self.dealer_requests)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Cost:
        try:
            return cls(float(d["rounds"]), float(d["bytes"]), float(d["compute_s"]),
                       float(d.get("dealer_requests", 0.0)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad cost entry {d!r}: need rounds, bytes, compute_s") from e


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
    """

    config: ViTConfig
    attention: dict[str, tuple[Cost, Cost]]
    activation: dict[str, Cost]
    layernorm: Cost
    layernorm_final: Cost
    linear: Cost
    stem: Cost
    meta: dict[str, Any] = field(default_factory=dict)

    # -- prediction ----------------------------------------------------------------------
    def attention_cost(self, kind: AttentionKind | str, heads: int) -> Cost:
        """One layer's attention for ``heads`` heads of ``kind`` (0 heads cost nothing)."""
        kind = AttentionKind(kind).value
        if heads <= 0:
            return Cost()
        if kind not in self.attention:
            raise KeyError(f"cost file has no attention kind {kind!r}")
        one, full = self.attention[kind]
        h = self.config.heads
        if h == 1:
            return full.scale(heads)
        t = (heads - 1) / (h - 1)
        return one + (full + one.scale(-1.0)).scale(t)

    def activation_cost(self, kind: ActivationKind | str) -> Cost:
        kind = ActivationKind(kind).value
        if kind not in self.activation:
            raise KeyError(f"cost file has no activation kind {kind!r}")
        return self.activation[kind]

    def layer_cost(self, layer: LayerSpec) -> Cost:
        """One block: its attention groups (run one after another), activation, two
        LayerNorms and four linear layers."""
        att = total(self.attention_cost(k, len(hs)) for k, hs in layer.groups())
        return att + self.activation_cost(layer.activation) + self.layernorm.scale(2) + self.linear

    def fixed_cost(self) -> Cost:
        """What every spec pays: LayerNorms, linear layers, stem, head, final norm."""
        d = self.config.depth
        return (self.layernorm.scale(2 * d) + self.layernorm_final + self.linear.scale(d)
                + self.stem)

    def predict(self, spec: ArchSpec) -> Cost:
        """Whole-model cost of one batch-1 secure forward with ``spec``."""
        spec.validate(self.config.depth, self.config.heads)
        att = total(self.attention_cost(k, len(hs)) for layer in spec.layers
                    for k, hs in layer.groups())
        act = total(self.activation_cost(layer.activation) for layer in spec.layers)
        return att + act + self.fixed_cost()

    def seconds(self, spec: ArchSpec, network: NetworkModel) -> float:
        return network.seconds(self.predict(spec))

    def blocks(self) -> dict[str, Cost]:
        """Whole-model cost of each block name (all layers, all heads of that kind)."""
        d, h = self.config.depth, self.config.heads
        out = {f"attention.{k}": self.attention_cost(k, h).scale(d) for k in self.attention}
        out |= {f"activation.{k}": c.scale(d) for k, c in self.activation.items()}
        out["layernorm"] = self.layernorm.scale(2 * d) + self.layernorm_final
        out["linear"] = self.linear.scale(d) + self.stem
        return out

    def blocks_table(self, network: NetworkModel) -> dict[str, dict[str, float]]:
        """``blocks`` as the JSON/YAML report shape, with ``seconds`` under ``network``."""
        return {name: {"rounds": int(round(c.rounds)), "bytes": int(round(c.bytes)),
                       "compute_s": c.compute_s, "seconds": network.seconds(c)}
                for name, c in self.blocks().items()}

    # -- per-head / per-layer prices for the search ---------------------------------------
    def head_seconds(self, kind: AttentionKind | str, network: NetworkModel) -> float:
        """One head's share of a layer whose heads all use ``kind``."""
        return network.seconds(self.attention_cost(kind, self.config.heads)) / self.config.heads

    def activation_seconds(self, kind: ActivationKind | str, network: NetworkModel) -> float:
        return network.seconds(self.activation_cost(kind))

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
        if network is not None:
            d["network"] = network.to_dict()
            d["blocks"] = self.blocks_table(network)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> CostModel:
        if not isinstance(d, dict) or d.get("version") != COST_FILE_VERSION:
            raise ValueError(f"not a version-{COST_FILE_VERSION} cost file")
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
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"cost file lacks a field: {e}") from e

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


# ----------------------------------------------------------------------------- profiling
# The functions below run inside party processes (mpcvit.mpc.launcher.run_parties).


def _crypten():
    from mpcvit.mpc.compat import import_crypten

    return import_crypten()


def _dealer_requests() -> float:
    from mpcvit.mpc import runtime

    try:
        return float(runtime.dealer_provider().stats()["requests"])
    except Exception:  # no dealer session (TFP provider)
        return 0.0


_offline_sessions = itertools.count()


def _open_dealer():
    """The dealer provider if a dealer session is open in this process, else None."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    try:
        provider.state  # noqa: B018 (raises without an open session)
    except Exception:  # TFP provider
        return None
    return provider


def record_trace(provider, fn: Callable[[], Any]) -> list:
    """Run ``fn`` once and return the dealer tuple requests it made ([] without a
    dealer): what an offline phase must prepare for its next run."""
    if provider is None:
        fn()
        return []
    start = len(provider.state.trace)
    fn()
    return list(provider.state.trace[start:])


def prepare_offline(provider, trace: list) -> float:
    """The offline phase for the next run of a program whose tuple requests were
    ``trace``, as the party service runs it before each request: every party calls this
    at the same point.  Returns the seconds it took."""
    comm = _crypten().communicator.get()
    spec, rank, world = provider.state.spec, comm.get_rank(), comm.get_world_size()
    session = f"{comm.session}/offline-{next(_offline_sessions)}"
    provider.end()
    seconds = provider.prepare(session, rank, world, spec, trace)
    provider.begin(session, rank, world, spec)
    return seconds


def measure(fn: Callable[[], Any], repeats: int = 3) -> Cost:
    """Run ``fn`` once to warm up, then ``repeats`` times: this party's rounds and bytes
    (identical every time) and the median wall seconds.  Parties start each repeat
    together (a barrier outside the counted region).

    Under the dealer the seconds are online seconds, as the party service delivers them:
    the warm-up records ``fn``'s tuple requests and the dealer prepares them before each
    repeat (outside the timed region)."""
    comm = _crypten().communicator.get()
    provider = _open_dealer()
    trace = record_trace(provider, fn)
    times, stats, dealer = [], None, 0.0
    for _ in range(max(1, repeats)):
        if provider is not None:
            prepare_offline(provider, trace)
        comm.barrier()
        comm.reset_communication_stats()
        d0 = _dealer_requests()
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        stats = comm.get_communication_stats()
        dealer = _dealer_requests() - d0
    assert stats is not None
    return Cost(float(stats["rounds"]), float(stats["bytes"]), statistics.median(times), dealer)


def _difference(a: Cost, b: Cost, floor: bool = True) -> Cost:
    """``a - b``, seconds floored at 0 unless ``floor`` is False (both are noisy
    medians; a block that saves has a negative difference)."""
    seconds = a.compute_s - b.compute_s
    return Cost(a.rounds - b.rounds, a.bytes - b.bytes, max(0.0, seconds) if floor else seconds,
                a.dealer_requests - b.dealer_requests)


def _model_for(config: ViTConfig, seed: int):
    from .secure import fold_norms
    from .vit import ViT

    torch.manual_seed(seed)
    return fold_norms(ViT(config).eval())  # as SecureViT shares it


def profile_blocks_party(
    config_dict: dict[str, Any],
    attention_kinds: tuple[str, ...] = ATTENTION_KINDS,
    activation_kinds: tuple[str, ...] = ACTIVATION_KINDS,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Party program: every block of one layer at the config's real shapes (batch 1),
    evaluated by the model's own modules and ``models.ops``/``models.vit.attend``."""
    from . import ops
    from .secure import merged_linear, share_module
    from .vit import Block, Linear, attend, normed_linear

    crypten = _crypten()
    cfg = ViTConfig.from_dict(config_dict)
    model = _model_for(cfg, seed)
    blk = model.blocks[0]
    n, d, h, hd = cfg.num_tokens, cfg.dim, cfg.heads, cfg.head_dim
    g = torch.Generator().manual_seed(seed)

    def enc(*shape: int, std: float = 1.0):
        return crypten.cryptensor(torch.randn(*shape, generator=g) * std, src=0)

    out: dict[str, dict[str, float]] = {}
    # Attention cores: q is already scaled by 1/sqrt(d) in the model; scores ~ N(0, 1..4).
    for kind in attention_kinds:
        k = AttentionKind(kind)
        for label, heads in (("one_head", 1), ("all_heads", h)):
            q, kk, v = enc(1, heads, n, hd, std=0.5), enc(1, heads, n, hd), enc(1, heads, n, hd)
            cost = measure(lambda k=k, q=q, kk=kk, v=v: attend(k, q, kk, v, cfg.attn_eps),
                           repeats)
            out[f"attention.{kind}.{label}"] = cost.to_dict()
    hidden = enc(1, n, cfg.mlp_hidden, std=1.5)
    x = enc(1, n, d, std=2.0)
    qkv, proj = share_module(blk.attn.qkv), share_module(blk.attn.proj)
    fc1, fc2 = share_module(blk.mlp.fc1), share_module(blk.mlp.fc2)
    xh = enc(1, n, cfg.mlp_hidden)
    for kind in activation_kinds:
        act = ActivationKind(kind)
        if act is ActivationKind.IDENTITY:
            # A linear MLP is one merged layer (``secure.merge_linear_mlps``): the cost is
            # what that layer costs against fc1 and fc2 (negative: it saves).
            merged = share_module(merged_linear(blk.mlp.fc1, blk.mlp.fc2))
            if isinstance(blk, Block):
                norm2 = share_module(blk.norm2)
                cost = _difference(
                    measure(lambda m=merged, n=norm2: normed_linear(m, x, n), repeats),
                    measure(lambda n=norm2: (normed_linear(fc1, x, n), fc2(xh)), repeats),
                    floor=False)
            else:
                cost = _difference(measure(lambda m=merged: m(x), repeats),
                                   measure(lambda: (fc1(x), fc2(xh)), repeats), floor=False)
        elif act.bias_free and isinstance(blk, Block):
            # Its ReLU rides in the norm2 -> fc1 pair (``vit.normed_linear``): the cost is
            # what the rectified pair costs beyond the plain one.
            norm2 = share_module(blk.norm2)
            free = Linear(d, cfg.mlp_hidden, bias=False)
            free.weight = blk.mlp.fc1.weight
            fc1_free = share_module(free)
            cost = _difference(
                measure(lambda f=fc1_free, n=norm2: normed_linear(f, x, n, rectify=True),
                        repeats),
                measure(lambda n=norm2: normed_linear(fc1, x, n), repeats))
        else:
            fn = ops.ACTIVATION_FNS[act.value]
            cost = measure(lambda fn=fn: fn(hidden), repeats)
        out[f"activation.{kind}"] = cost.to_dict()

    def linears() -> None:
        qkv(x)
        proj(x)
        fc1(x)
        fc2(xh)

    out["linear"] = measure(linears, repeats).to_dict()
    # A folded LayerNorm shares rounds with the linear layer it feeds
    # (``vit.normed_linear``), so its cost is what the pair costs beyond the layer alone;
    # ``layernorm`` is the mean of a block's two.
    if isinstance(blk, Block):
        norm1, norm2 = share_module(blk.norm1), share_module(blk.norm2)
        pair = measure(lambda: (normed_linear(qkv, x, norm1), normed_linear(fc1, x, norm2)),
                       repeats)
        alone = measure(lambda: (qkv(x), fc1(x)), repeats)
    else:  # CCT: pre_norm feeds qkv; norm1 keeps its affine part (it feeds the residual)
        pre_norm, norm1 = share_module(blk.pre_norm), share_module(blk.norm1)
        pair = measure(lambda: (normed_linear(qkv, x, pre_norm), norm1(x)), repeats)
        alone = measure(lambda: qkv(x), repeats)
    out["layernorm"] = _difference(pair, alone).scale(0.5).to_dict()
    norm = share_module(model.norm)
    xc = enc(1, d, std=2.0)
    head_only = share_module(model.head)
    final = measure(lambda: normed_linear(head_only, xc, norm), repeats)
    out["layernorm.final"] = _difference(final, measure(lambda: head_only(xc), repeats)).to_dict()
    embed, head = share_module(model.patch_embed), share_module(model.head)
    img = enc(1, cfg.in_chans, cfg.image_size, cfg.image_size)

    def stem() -> None:
        embed(img)
        head(xc)

    out["linear.stem_head"] = measure(stem, repeats).to_dict()
    return out


def cost_model_from_measurements(
    config: ViTConfig, m: Mapping[str, Mapping[str, float]], meta: dict[str, Any] | None = None
) -> CostModel:
    """Assemble a :class:`CostModel` from :func:`profile_blocks_party`'s output."""
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
        meta=dict(meta or {}),
    )


def ops_fingerprint() -> str:
    """Hash of the secure op definitions a profile measured (a changed ops.py means the
    cost file is stale)."""
    import hashlib

    from . import compare, fused, masked, ops, vit

    h = hashlib.sha1()
    for mod in (ops, compare, fused, masked, vit):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:12]


def profile(
    config: ViTConfig,
    attention_kinds: Iterable[str] = ATTENTION_KINDS,
    activation_kinds: Iterable[str] = ACTIVATION_KINDS,
    repeats: int = 3,
    seed: int = 0,
    provider: str = "dealer",
    timeout: float = 1800.0,
) -> CostModel:
    """Profile every block in a real 2-party run over gRPC; party 0's counts."""
    from mpcvit.mpc.launcher import run_parties

    res = run_parties(profile_blocks_party, config.to_dict(), tuple(attention_kinds),
                      tuple(activation_kinds), repeats, seed, provider=provider,
                      timeout=timeout)
    meta = {"provider": provider, "backend": "grpc", "batch": 1, "repeats": repeats,
            "counts": "party 0", "compute": "median loopback wall seconds",
            "ops_sha1": ops_fingerprint(),
            "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return cost_model_from_measurements(config, res[0], meta)


# ----------------------------------------------------------------------------- whole model


def build_secure(config_dict: dict[str, Any], spec_dict: dict[str, Any],
                 state_dict: dict[str, torch.Tensor] | None):
    """Party program helper: the ``SecureViT`` of a model party 0 owns (``state_dict``,
    or a seeded random init when None); the other party builds the public structure."""
    from .secure import SecureViT
    from .vit import ViT

    cfg, spec = ViTConfig.from_dict(config_dict), ArchSpec.from_dict(spec_dict)
    if _crypten().communicator.get().get_rank() == 0:
        torch.manual_seed(0)
        model = ViT(cfg, spec).eval()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return SecureViT.from_model(model)
    return SecureViT.from_model(None, cfg, spec)


def timed_forward(secure, image: torch.Tensor) -> dict[str, Any]:
    """Party program helper: one batch-1 secure forward of ``image`` (shared by party 1)
    with this party's rounds, bytes, wall seconds and the revealed logits."""
    from .secure import reveal_float, share_input

    comm = _crypten().communicator.get()
    x = share_input(image, tuple(image.shape))
    comm.barrier()
    comm.reset_communication_stats()
    d0 = _dealer_requests()
    tic = time.perf_counter()
    y = secure(x)
    seconds = time.perf_counter() - tic
    stats = comm.get_communication_stats()
    dealer = _dealer_requests() - d0
    return {"rounds": stats["rounds"], "bytes": stats["bytes"], "compute_s": seconds,
            "dealer_requests": dealer, "logits": reveal_float(y)[0]}


def secure_forward_party(
    config_dict: dict[str, Any],
    spec_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None,
    images: torch.Tensor,
    warmup: bool = True,
) -> dict[str, Any]:
    """Party program: the whole secure model on each image (batch 1); per-image rounds,
    bytes and wall seconds as this party counted them, plus the revealed logits.  Under
    the dealer, each image's material is prepared offline after the warm-up (online
    seconds, as :func:`measure` gives them).

    Party 0 owns the weights; the images are shared by party 1, as a client's would be.
    """
    secure = build_secure(config_dict, spec_dict, state_dict)
    provider = _open_dealer()
    trace = record_trace(provider, lambda: timed_forward(secure, images[:1])) if warmup else []
    rows = []
    for i in range(len(images)):
        offline_s = prepare_offline(provider, trace) if provider is not None and trace else 0.0
        rows.append(timed_forward(secure, images[i : i + 1]) | {"offline_s": offline_s})
    return {"rows": rows}


@dataclass(frozen=True)
class SecureRun:
    """Party 0's figures of a measured whole-model secure run."""

    rounds: float
    bytes: float
    seconds: list[float]
    dealer_requests: float
    logits: torch.Tensor

    @property
    def cost(self) -> Cost:
        """Per image: exact rounds/bytes, median wall seconds."""
        return Cost(self.rounds, self.bytes, statistics.median(self.seconds),
                    self.dealer_requests)


def measure_secure_model(
    config: ViTConfig,
    spec: ArchSpec,
    images: torch.Tensor,
    state_dict: dict[str, torch.Tensor] | None = None,
    provider: str = "dealer",
    timeout: float = 1800.0,
) -> SecureRun:
    """Run the whole secure model on ``images`` (one at a time) in 2 real parties."""
    from mpcvit.mpc.launcher import run_parties

    res = run_parties(secure_forward_party, config.to_dict(), spec.to_dict(), state_dict,
                      images, provider=provider, timeout=timeout)
    return secure_run(res[0]["rows"])


def secure_run(rows: list[dict[str, Any]]) -> SecureRun:
    """Summarise party 0's per-image rows (rounds and bytes must not vary)."""
    rounds = {r["rounds"] for r in rows}
    nbytes = {r["bytes"] for r in rows}
    if len(rounds) != 1 or len(nbytes) != 1:
        raise RuntimeError(f"rounds/bytes differ between images: {rounds} {nbytes}")
    return SecureRun(float(rounds.pop()), float(nbytes.pop()),
                     [float(r["compute_s"]) for r in rows],
                     float(statistics.median(r["dealer_requests"] for r in rows)),
                     torch.stack([r["logits"] for r in rows]))
