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
from typing import Any

import torch
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.protocols.plan import ProtocolPlan

from .configs import ViTConfig
from .costs import (
    ACTIVATION_KINDS,
    ATTENTION_KINDS,
    Cost,
    CostModel,
    cost_model_from_measurements,
)
from .secure import program_fingerprint
from .spec import ActivationKind, ArchSpec, AttentionKind


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


def open_dealer():
    """The dealer provider if a dealer session is open in this process, else None."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    return provider if provider.in_session else None


def record_trace(provider, fn: Callable[[], Any]) -> list:
    """Run ``fn`` once and return the dealer tuple requests it made ([] without a
    dealer): what an offline phase must prepare for its next run."""
    if provider is None:
        fn()
        return []
    start = len(provider.trace)
    fn()
    return list(provider.trace[start:])


def prepare_offline(provider, trace: list) -> float:
    """The offline phase for the next run of a program whose tuple requests were
    ``trace``, as the party service runs it before each request: every party calls this
    at the same point.  Returns the seconds it took."""
    comm = import_crypten().communicator.get()
    return provider.restart_prepared(f"{comm.session}/offline-{next(_offline_sessions)}", trace)


def measure(fn: Callable[[], Any], repeats: int = 3) -> Cost:
    """Run ``fn`` once to warm up, then ``repeats`` times: this party's rounds and bytes
    (identical every time) and the median wall seconds.  Parties start each repeat
    together (a barrier outside the counted region).

    Under the dealer the seconds are online seconds, as the party service delivers them:
    the warm-up records ``fn``'s tuple requests and the dealer prepares them before each
    repeat (outside the timed region)."""
    comm = import_crypten().communicator.get()
    provider = open_dealer()
    trace = record_trace(provider, fn)
    times, stats, dealer, material = [], None, 0.0, 0.0
    for _ in range(max(1, repeats)):
        b0 = _dealer_bytes()
        if provider is not None:
            prepare_offline(provider, trace)
            b0 = 0.0  # a fresh session: its bytes so far are the prepared material
        comm.barrier()
        comm.reset_communication_stats()
        d0 = _dealer_requests()
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
        stats = comm.get_communication_stats()
        dealer = _dealer_requests() - d0
        material = _dealer_bytes() - b0
    assert stats is not None
    return Cost(float(stats["rounds"]), float(stats["bytes"]), statistics.median(times), dealer,
                material)


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

    crypten = import_crypten()
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
    out |= _token_mask_blocks(enc, cfg, activation_kinds, repeats)

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


def _token_mask_blocks(enc: Callable[..., Any], cfg: ViTConfig, activation_kinds: Iterable[str],
                       repeats: int) -> dict[str, dict[str, float]]:
    """MPCViT+ token masks (``vit.Mlp``): each maskable activation on one token's hidden
    row, and the ReLU after fc2 on one token's and on all tokens' rows."""
    from . import ops
    from .spec import MASKABLE_ACTIVATIONS

    out = {}
    one = enc(1, 1, cfg.mlp_hidden, std=1.5)
    for kind in activation_kinds:
        act = ActivationKind(kind)
        if act in MASKABLE_ACTIVATIONS:
            fn = ops.ACTIVATION_FNS[act.value]
            out[f"token_mask.{kind}.one_token"] = measure(lambda fn=fn: fn(one), repeats).to_dict()
    for label, n in (("one_token", 1), ("all_tokens", cfg.num_tokens)):
        y = enc(1, n, cfg.dim, std=2.0)
        out[f"token_mask.relu_after.{label}"] = measure(lambda y=y: ops.relu(y),
                                                        repeats).to_dict()
    return out


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
            "ops_sha1": program_fingerprint(),
            "profiled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return cost_model_from_measurements(config, res[0], meta)


# ----------------------------------------------------------------------------- whole model


def build_secure(config_dict: dict[str, Any], spec_dict: dict[str, Any],
                 state_dict: dict[str, torch.Tensor] | None,
                 protocol_dict: dict[str, Any] | None = None):
    """Party program helper: the ``SecureViT`` of a model party 0 owns (``state_dict``,
    or a seeded random init when None); the other party builds the public structure.
    Both run the protocol plan ``protocol_dict`` (``ProtocolPlan.to_dict``; None: the
    default)."""
    from mpcvit.mpc.protocols.plan import ProtocolPlan

    from .secure import SecureViT
    from .vit import ViT

    cfg, spec = ViTConfig.from_dict(config_dict), ArchSpec.from_dict(spec_dict)
    plan = ProtocolPlan.from_dict(protocol_dict)
    if import_crypten().communicator.get().get_rank() == 0:
        torch.manual_seed(0)
        model = ViT(cfg, spec).eval()
        if state_dict is not None:
            model.load_state_dict(state_dict)
        return SecureViT.from_model(model, protocol=plan)
    return SecureViT.from_model(None, cfg, spec, protocol=plan)


def timed_forward(secure, image: torch.Tensor) -> dict[str, Any]:
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
    protocol: ProtocolPlan | None = None,
) -> SecureRun:
    """Run the whole secure model on ``images`` (one at a time) in 2 real parties, with
    the protocol plan ``protocol`` (None: the default)."""
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
