"""Profiling programs: measure what each block and whole secure models cost.

These functions run inside real party processes (``mpcvit.mpc.launcher.run_parties``):
a 2-party CrypTen run over gRPC with the dealer.  :func:`profile` measures every block of
one layer at a model's real shapes and returns a :class:`~mpcvit.models.costs.CostModel`
(the cost file the search reads); :func:`measure_secure_model` times a whole secure model,
image by image, to check the file's prediction.  Rounds and bytes are party 0's
CrypTen counts; seconds are online seconds (the dealer material of each repeat is
prepared offline first, as the party service does); ``offline_bytes`` is that material as
party 0 received it from the dealer.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.protocols.plan import ProtocolPlan
from torch import nn

from .configs import ViTConfig
from .costs import (
    ACTIVATION_KINDS,
    ATTENTION_KINDS,
    Cost,
    CostModel,
    cost_model_from_measurements,
)
from .plan import ModelPlan
from .secure import program_fingerprint
from .spec import ActivationKind, ArchSpec, AttentionKind

if TYPE_CHECKING:  # the dealer (grpc) and the model classes are imported where used
    from crypten.mpc import MPCTensor
    from mpcvit.mpc.dealer import DealerProvider

    from .secure import SecureModule, SecureViT
    from .vit import Block, CCTBlock, ViT


def _dealer_requests() -> float:
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    return float(provider.stats()["requests"]) if provider.in_session else 0.0


def _dealer_bytes(key: str = "bytes") -> float:
    """Bytes this party has received from the dealer in the open session (0 without);
    ``offline_bytes``: those fetched before the session began (``prepare``)."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    return float(provider.stats()[key]) if provider.in_session else 0.0


_offline_sessions = itertools.count()


def open_dealer() -> DealerProvider | None:
    """The dealer provider if a dealer session is open in this process, else None."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    return provider if provider.in_session else None


def record_trace(provider: DealerProvider | None, fn: Callable[[], Any]) -> list:
    """Run ``fn`` once and return the dealer tuple requests it made ([] without a
    dealer): what an offline phase must prepare for its next run."""
    if provider is None:
        fn()
        return []
    start = len(provider.trace)
    fn()
    return list(provider.trace[start:])


def prepare_offline(provider: DealerProvider, trace: list) -> float:
    """The offline phase for the next run of a program whose tuple requests were
    ``trace``, as the party service runs it before each request: every party calls this
    at the same point.  Returns the seconds it took."""
    comm = import_crypten().communicator.get()
    return provider.restart_prepared(f"{comm.session}/offline-{next(_offline_sessions)}", trace)


def measure(fn: Callable[[], Any], repeats: int = 3) -> Cost:
    """Run ``fn`` once to warm up, then ``repeats`` times: this party's rounds and bytes
    (identical every time), the median wall seconds and the median CPU seconds of this
    process.  Parties start each repeat together (a barrier outside the counted region).

    Under the dealer the seconds are online seconds, as the party service delivers them:
    the warm-up records ``fn``'s tuple requests and the dealer prepares them before each
    repeat (outside the timed region)."""
    comm = import_crypten().communicator.get()
    provider = open_dealer()
    trace = record_trace(provider, fn)
    times, cpus, stats, dealer, material = [], [], None, 0.0, 0.0
    for _ in range(max(1, repeats)):
        b0 = _dealer_bytes()
        if provider is not None:
            prepare_offline(provider, trace)
            b0 = 0.0  # a fresh session: its bytes so far are the prepared material
        comm.barrier()
        comm.reset_communication_stats()
        d0 = _dealer_requests()
        tic, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - tic)
        cpus.append(time.process_time() - cpu)
        stats = comm.get_communication_stats()
        dealer = _dealer_requests() - d0
        material = _dealer_bytes() - b0
    assert stats is not None
    return Cost(float(stats["rounds"]), float(stats["bytes"]), statistics.median(times), dealer,
                material, statistics.median(cpus))


def _difference(a: Cost, b: Cost, floor: bool = True) -> Cost:
    """``a - b``, seconds floored at 0 unless ``floor`` is False (both are noisy
    medians; a block that saves has a negative difference)."""
    seconds, cpu = a.compute_s - b.compute_s, a.cpu_s - b.cpu_s
    return Cost(a.rounds - b.rounds, a.bytes - b.bytes, max(0.0, seconds) if floor else seconds,
                a.dealer_requests - b.dealer_requests, a.offline_bytes - b.offline_bytes,
                max(0.0, cpu) if floor else cpu)


class _Entries:
    """The profiler's output: an entry's default cost under its name and its other
    protocol variants under ``name@label`` (``plan.entry_variants``)."""

    def __init__(self, config: ViTConfig, variants: bool) -> None:
        from .vit import fuses_norm

        self.out: dict[str, dict[str, float]] = {}
        self.variants = variants
        self.rectify_in_norm = config.block == "prenorm" and fuses_norm(
            config.mlp_hidden, config.dim, config.num_tokens)

    def plans(self, entry: str) -> dict[str, ProtocolPlan]:
        """label -> plan for every variant of ``entry`` to measure (default first)."""
        from .plan import entry_variants

        found = entry_variants(entry, self.rectify_in_norm)
        return found if self.variants else {"default": found["default"]}

    def governed_by(self, entry: str) -> str | None:
        from .plan import entry_block

        return entry_block(entry, self.rectify_in_norm)[0]

    def add(self, entry: str, measure_with: Callable[[ProtocolPlan], Cost]) -> None:
        """Measure ``entry`` under each of its variants (``measure_with(plan)``)."""
        for name, plan in self.plans(entry).items():
            key = entry if name == "default" else f"{entry}@{name}"
            self.out[key] = measure_with(plan).to_dict()


def _model_for(config: ViTConfig, seed: int) -> ViT:
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
    variants: bool = True,
) -> dict[str, dict[str, float]]:
    """Party program: every block of one layer at the config's real shapes (batch 1),
    evaluated by the model's own modules and ``models.ops``/``models.vit.attend``; with
    ``variants``, each block whose protocol a plan can change also under every variant
    worth pricing (``plan.entry_variants``), stored as ``entry@label``."""
    from .secure import share_module
    from .vit import Block, attend

    crypten = import_crypten()
    cfg = ViTConfig.from_dict(config_dict)
    model = _model_for(cfg, seed)
    blk = model.blocks[0]
    n, d, h, hd = cfg.num_tokens, cfg.dim, cfg.heads, cfg.head_dim
    g = torch.Generator().manual_seed(seed)

    def enc(*shape: int, std: float = 1.0) -> MPCTensor:
        return crypten.cryptensor(torch.randn(*shape, generator=g) * std, src=0)

    entries = _Entries(cfg, variants)
    # Attention cores: q is already scaled by 1/sqrt(d) in the model; scores ~ N(0, 1..4).
    for kind in attention_kinds:
        k = AttentionKind(kind)
        for label, heads in (("one_head", 1), ("all_heads", h)):
            q, kk, v = enc(1, heads, n, hd, std=0.5), enc(1, heads, n, hd), enc(1, heads, n, hd)
            entries.add(f"attention.{kind}.{label}", lambda p, k=k, q=q, kk=kk, v=v: measure(
                lambda: attend(k, q, kk, v, cfg.attn_eps, p), repeats))
    hidden = enc(1, n, cfg.mlp_hidden, std=1.5)
    x = enc(1, n, d, std=2.0)
    qkv, proj = share_module(blk.attn.qkv), share_module(blk.attn.proj)
    fc1, fc2 = share_module(blk.mlp.fc1), share_module(blk.mlp.fc2)
    xh = enc(1, n, cfg.mlp_hidden)
    layers = {"qkv": qkv, "proj": proj, "fc1": fc1, "fc2": fc2}
    for kind in activation_kinds:
        entries.add(f"activation.{kind}", lambda p, kind=kind: _activation_cost(
            model, kind, p, entries, x, hidden, xh, layers, repeats))
    entries.out |= _token_mask_blocks(enc, cfg, activation_kinds, repeats, entries)

    def linears() -> None:
        qkv(x)
        proj(x)
        fc1(x)
        fc2(xh)

    entries.out["linear"] = measure(linears, repeats).to_dict()
    # A folded LayerNorm shares rounds with the linear layer it feeds
    # (``vit.normed_linear``), so its cost is what the pair costs beyond the layer alone;
    # ``layernorm`` is the mean of a block's two.
    if isinstance(blk, Block):
        alone = measure(lambda: (qkv(x), fc1(x)), repeats)
    else:
        alone = measure(lambda: qkv(x), repeats)
    entries.add("layernorm", lambda p: _difference(
        _norm_pair(blk, p, x, qkv, fc1, repeats), alone).scale(0.5))
    norm = share_module(model.norm)
    xc = enc(1, d, std=2.0)
    head_only = share_module(model.head)
    head_alone = measure(lambda: head_only(xc), repeats)

    def final(p: ProtocolPlan) -> Cost:
        from .vit import normed_linear

        norm.protocol = p
        return _difference(measure(lambda: normed_linear(head_only, xc, norm), repeats),
                           head_alone)

    entries.add("layernorm.final", final)
    _batchnorm_blocks(model, entries, x, xh, xc, layers, head_alone, alone, repeats)
    embed, head = share_module(model.patch_embed), share_module(model.head)
    img = enc(1, cfg.in_chans, cfg.image_size, cfg.image_size)

    def stem() -> None:
        embed(img)
        head(xc)

    entries.out["linear.stem_head"] = measure(stem, repeats).to_dict()
    return entries.out


def _batchnorm_folded(linear: nn.Linear, seed: int) -> nn.Linear:
    """A copy of ``linear`` with a BatchNorm of trained-like statistics folded into it,
    as ``secure.fold_norms`` folds one (a plain module)."""
    import copy

    from .secure import fold_batchnorm
    from .vit import BatchNorm

    g = torch.Generator().manual_seed(seed)
    dim = linear.weight.shape[1]
    holder = nn.Module()
    holder.norm = BatchNorm(dim)
    with torch.no_grad():
        holder.norm.running_mean.normal_(0.0, 1.0, generator=g)
        holder.norm.running_var.uniform_(0.5, 4.0, generator=g)
    folded = copy.deepcopy(linear)
    fold_batchnorm(holder, "norm", folded)
    return folded


def _batchnorm_blocks(model: ViT, entries: _Entries, x: MPCTensor, xh: MPCTensor,
                      xc: MPCTensor, layers: dict[str, SecureModule],
                      head_alone: Cost, alone: Cost, repeats: int) -> None:
    """The batchnorm kind (``costs.BATCHNORM_ENTRIES``), measured as what it runs: a
    block's two BatchNorms folded into qkv and fc1 beyond the two layers alone (halved),
    the final one folded into the head beyond the head alone, and an identity MLP merged
    without a norm to fuse with, against fc1 and fc2.  Pre-norm blocks only: a CCT block
    keeps LayerNorms (``vit.CCTBlock``), but its final norm may be a BatchNorm."""
    from .secure import merged_linear, share_module
    from .vit import Block, normed_linear

    blk = model.blocks[0]
    head = share_module(_batchnorm_folded(model.head, 3))
    entries.add("batchnorm.final", lambda p: _difference(
        measure(lambda: normed_linear(head, xc, None), repeats), head_alone))
    if not isinstance(blk, Block):
        return
    qkv = share_module(_batchnorm_folded(blk.attn.qkv, 1))
    fc1_plain = _batchnorm_folded(blk.mlp.fc1, 2)
    fc1 = share_module(fc1_plain)
    entries.add("batchnorm", lambda p: _difference(measure(
        lambda: (normed_linear(qkv, x, None), normed_linear(fc1, x, None)), repeats),
        alone).scale(0.5))
    merged = share_module(merged_linear(fc1_plain, blk.mlp.fc2))
    fc1_alone, fc2 = layers["fc1"], layers["fc2"]
    entries.add("batchnorm.identity", lambda p: _difference(
        measure(lambda: merged(x), repeats),
        measure(lambda: (fc1_alone(x), fc2(xh)), repeats), floor=False))


def _norm_pair(blk: Block | CCTBlock, plan: ProtocolPlan, x: MPCTensor, qkv: SecureModule,
               fc1: SecureModule, repeats: int) -> Cost:
    """A block's two (LayerNorm, linear) pairs under the norm plan ``plan`` (CCT: pre_norm
    with qkv, and norm1, which keeps its affine part as it feeds the residual)."""
    from .secure import share_module
    from .vit import Block, normed_linear

    if isinstance(blk, Block):
        norm1, norm2 = share_module(blk.norm1), share_module(blk.norm2)
        norm1.protocol = norm2.protocol = plan
        return measure(lambda: (normed_linear(qkv, x, norm1), normed_linear(fc1, x, norm2)),
                       repeats)
    pre_norm, norm1 = share_module(blk.pre_norm), share_module(blk.norm1)
    pre_norm.protocol = norm1.protocol = plan
    return measure(lambda: (normed_linear(qkv, x, pre_norm), norm1(x)), repeats)


def _activation_cost(model: ViT, kind: str, plan: ProtocolPlan, entries: _Entries,
                     x: MPCTensor, hidden: MPCTensor, xh: MPCTensor,
                     layers: dict[str, SecureModule], repeats: int) -> Cost:
    """One layer's MLP activation ``kind`` under ``plan`` (see docs/search.md: identity
    and relu_nobias are measured by what they change around them)."""
    from . import ops
    from .secure import merged_linear, share_module
    from .vit import Block, Linear, normed_linear

    blk, cfg = model.blocks[0], model.config
    fc1, fc2 = layers["fc1"], layers["fc2"]
    act = ActivationKind(kind)
    if act is ActivationKind.IDENTITY:
            # A linear MLP is one merged layer (``secure.merge_linear_mlps``): the cost is
            # what that layer costs against fc1 and fc2 (negative: it saves).
        # A linear MLP is one merged layer (``secure.merge_linear_mlps``): the cost is
        # what that layer costs against fc1 and fc2 (negative: it saves).
        merged = share_module(merged_linear(blk.mlp.fc1, blk.mlp.fc2))
        if isinstance(blk, Block):
            norm2 = share_module(blk.norm2)
            return _difference(
                measure(lambda: normed_linear(merged, x, norm2), repeats),
                measure(lambda: (normed_linear(fc1, x, norm2), fc2(xh)), repeats),
                floor=False)
        return _difference(measure(lambda: merged(x), repeats),
                           measure(lambda: (fc1(x), fc2(xh)), repeats), floor=False)
    if act.bias_free and isinstance(blk, Block):
        # Its ReLU rides in the norm2 -> fc1 pair (``vit.normed_linear``): the cost is
        # what the rectified pair costs beyond the plain one.  Fused, the norm's plan runs
        # the ReLU's sign test; otherwise the MLP's plan runs a ReLU after fc1.
        in_norm = entries.governed_by(f"activation.{kind}") == "norm"
        norm2 = share_module(blk.norm2)
        norm2.protocol = plan if in_norm else None
        relu_plan = None if in_norm else plan
        free = Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        free.weight = blk.mlp.fc1.weight
        fc1_free = share_module(free)
        return _difference(
            measure(lambda: normed_linear(fc1_free, x, norm2, rectify=True,
                                          protocol=relu_plan), repeats),
            measure(lambda: normed_linear(fc1, x, norm2), repeats))
    fn = ops.ACTIVATION_FNS[act.value]
    return measure(lambda: fn(hidden, protocol=plan), repeats)


def _token_mask_blocks(enc: Callable[..., Any], cfg: ViTConfig, activation_kinds: Iterable[str],
                       repeats: int, entries: _Entries) -> dict[str, dict[str, float]]:
    """MPCViT+ token masks (``vit.Mlp``): each maskable activation on one token's hidden
    row, and the ReLU after fc2 on one token's and on all tokens' rows, each under the
    activation's variants."""
    from . import ops
    from .spec import MASKABLE_ACTIVATIONS

    before = dict(entries.out)
    one = enc(1, 1, cfg.mlp_hidden, std=1.5)
    for kind in activation_kinds:
        act = ActivationKind(kind)
        if act in MASKABLE_ACTIVATIONS:
            fn = ops.ACTIVATION_FNS[act.value]
            entries.add(f"token_mask.{kind}.one_token",
                        lambda p, fn=fn: measure(lambda: fn(one, protocol=p), repeats))
    for label, n in (("one_token", 1), ("all_tokens", cfg.num_tokens)):
        y = enc(1, n, cfg.dim, std=2.0)
        entries.add(f"token_mask.relu_after.{label}",
                    lambda p, y=y: measure(lambda: ops.relu(y, p), repeats))
    return {k: v for k, v in entries.out.items() if k not in before}


def profile(
    config: ViTConfig,
    attention_kinds: Iterable[str] = ATTENTION_KINDS,
    activation_kinds: Iterable[str] = ACTIVATION_KINDS,
    repeats: int = 3,
    seed: int = 0,
    provider: str = "dealer",
    timeout: float = 3600.0,
    variants: bool = True,
) -> CostModel:
    """Profile every block in a real 2-party run over gRPC; party 0's counts.  With
    ``variants``, every protocol variant a plan can choose is measured too."""
    from mpcvit.mpc.launcher import run_parties

    res = run_parties(profile_blocks_party, config.to_dict(), tuple(attention_kinds),
                      tuple(activation_kinds), repeats, seed, variants, provider=provider,
                      timeout=timeout)
    meta = {"provider": provider, "backend": "grpc", "batch": 1, "repeats": repeats,
            "variants": variants,
            "counts": "party 0", "compute": "median loopback wall seconds",
            "ops_sha1": program_fingerprint(),
            "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return cost_model_from_measurements(config, res[0], meta)


# ----------------------------------------------------------------------------- whole model


def build_secure(config_dict: dict[str, Any], spec_dict: dict[str, Any],
                 state_dict: dict[str, torch.Tensor] | None,
                 protocol_dict: dict[str, Any] | None = None) -> SecureViT:
    """Party program helper: the ``SecureViT`` of a model party 0 owns (``state_dict``,
    or a seeded random init when None); the other party builds the public structure.
    Both run the protocol plan ``protocol_dict`` (``ModelPlan.to_dict``, or one
    ``ProtocolPlan.to_dict`` for every block; None: the default)."""
    from .plan import ModelPlan
    from .secure import SecureViT
    from .vit import ViT

    cfg, spec = ViTConfig.from_dict(config_dict), ArchSpec.from_dict(spec_dict)
    plan = ModelPlan.from_dict(protocol_dict)
    if import_crypten().communicator.get().get_rank() == 0:
        torch.manual_seed(0)
        model = ViT(cfg, spec).eval()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return SecureViT.from_model(model, protocol=plan)
    return SecureViT.from_model(None, cfg, spec, protocol=plan)


def timed_forward(secure: SecureViT, image: torch.Tensor) -> dict[str, Any]:
    """Party program helper: one batch-1 secure forward of ``image`` (shared by party 1)
    with this party's rounds, bytes, wall seconds, CPU seconds of this process (all its
    threads: on a shared machine wall time also counts waiting for a core), dealer
    material (``offline_bytes``: what the session prepared plus what the forward fetched
    online) and the revealed logits."""
    from .secure import reveal_float, share_input

    comm = import_crypten().communicator.get()
    x = share_input(image, tuple(image.shape))
    comm.barrier()
    comm.reset_communication_stats()
    d0, b0 = _dealer_requests(), _dealer_bytes()
    tic, cpu = time.perf_counter(), time.process_time()
    y = secure(x)
    seconds, cpu = time.perf_counter() - tic, time.process_time() - cpu
    stats = comm.get_communication_stats()
    dealer = _dealer_requests() - d0
    return {"rounds": stats["rounds"], "bytes": stats["bytes"], "compute_s": seconds,
            "cpu_s": cpu, "dealer_requests": dealer,
            "offline_bytes": _dealer_bytes("offline_bytes") + _dealer_bytes() - b0,
            "logits": reveal_float(y)[0]}


def secure_forward_party(
    config_dict: dict[str, Any],
    spec_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor] | None,
    images: torch.Tensor,
    warmup: bool = True,
    protocol_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Party program: the whole secure model on each image (batch 1); per-image rounds,
    bytes and wall seconds as this party counted them, plus the revealed logits.  Under
    the dealer, each image's material is prepared offline after the warm-up (online
    seconds, as :func:`measure` gives them).

    Party 0 owns the weights; the images are shared by party 1, as a client's would be.
    """
    secure = build_secure(config_dict, spec_dict, state_dict, protocol_dict)
    provider = open_dealer()
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
    offline_bytes: float = 0.0

    @property
    def cost(self) -> Cost:
        """Per image: exact rounds/bytes, median wall seconds."""
        return Cost(self.rounds, self.bytes, statistics.median(self.seconds),
                    self.dealer_requests, self.offline_bytes)


def measure_secure_model(
    config: ViTConfig,
    spec: ArchSpec,
    images: torch.Tensor,
    state_dict: dict[str, torch.Tensor] | None = None,
    provider: str = "dealer",
    timeout: float = 1800.0,
    protocol: ModelPlan | ProtocolPlan | None = None,
) -> SecureRun:
    """Run the whole secure model on ``images`` (one at a time) in 2 real parties, with
    the protocol plan ``protocol`` (per block type or one for all; None: the default)."""
    from mpcvit.mpc.launcher import run_parties

    plan = None if protocol is None else protocol.to_dict()
    res = run_parties(secure_forward_party, config.to_dict(), spec.to_dict(), state_dict,
                      images, protocol_dict=plan, provider=provider, timeout=timeout)
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
                     torch.stack([r["logits"] for r in rows]),
                     float(statistics.median(r.get("offline_bytes", 0.0) for r in rows)))
