"""Latency-aware search: supernet weight sharing, the latency penalty moving α, μ top-k,
budget binarisation, and the searched spec through `mpcvit search` and `mpcvit train`."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from mpcvit.models.configs import ViTConfig, get_config
from mpcvit.models.costs import NETWORKS, CostModel, cost_model_from_measurements
from mpcvit.models.data import limit_bundle, load_synthetic
from mpcvit.models.search import (
    LatencyPrices,
    SearchConfig,
    SuperNet,
    binarize_budget,
    binarize_mu,
    cheapest,
    mu_sweep,
    search,
)
from mpcvit.models.spec import ArchSpec, AttentionKind, LayerSpec, NormKind

TINY = ViTConfig(image_size=16, in_chans=1, patch=4, dim=16, depth=2, heads=2, num_classes=4)
LAN = NETWORKS["lan"]


def _costs(config: ViTConfig) -> CostModel:
    """A cost file's contents with the demo profile's ordering: softmax > relu_softmax >
    quad2 > scale per head; gelu > relu > quad > identity per layer (test data, not a
    latency table anything ships with)."""
    m: dict[str, dict[str, float]] = {}
    for kind, rounds, nbytes in (("softmax", 80, 7e6), ("relu_softmax", 26, 7e6),
                                 ("quad2", 18, 2.8e6), ("scale", 2, 1.7e5)):
        m[f"attention.{kind}.one_head"] = {"rounds": rounds, "bytes": nbytes / 4,
                                           "compute_s": 0.01}
        m[f"attention.{kind}.all_heads"] = {"rounds": rounds, "bytes": nbytes,
                                            "compute_s": 0.04}
    for kind, rounds, nbytes in (("gelu", 13, 6.7e6), ("relu", 9, 3e6), ("quad", 1, 2e5),
                                 ("identity", 0, 0), ("relu_nobias", 0, 3e6)):
        m[f"activation.{kind}"] = {"rounds": rounds, "bytes": nbytes, "compute_s": 0.01}
    # folded BatchNorms cost nothing; an identity MLP merged without a LayerNorm
    m["batchnorm"] = {"rounds": 0, "bytes": 0, "compute_s": 0.0}
    m["batchnorm.final"] = {"rounds": 0, "bytes": 0, "compute_s": 0.0}
    m["batchnorm.identity"] = {"rounds": -1, "bytes": -1e5, "compute_s": 0.0}
    m["layernorm"] = {"rounds": 20, "bytes": 5e5, "compute_s": 0.01}
    m["layernorm.final"] = {"rounds": 20, "bytes": 1e4, "compute_s": 0.001}
    m["linear"] = {"rounds": 4, "bytes": 8e5, "compute_s": 0.01}
    m["linear.stem_head"] = {"rounds": 2, "bytes": 1e5, "compute_s": 0.001}
    return cost_model_from_measurements(config, m)


def _data(n: int = 384):
    return limit_bundle(load_synthetic(), n, 128)


# ----------------------------------------------------------------------------- supernet


def test_one_hot_supernet_equals_derived_vit():
    torch.manual_seed(0)
    net = SuperNet(TINY, ["softmax", "relu_softmax", "scale"],
                   ["gelu", "relu", "identity", "relu_nobias"])
    spec = ArchSpec.from_dict({"version": 1, "layers": [
        {"attention": ["scale", "softmax"], "activation": "relu"},
        {"attention": ["relu_softmax", "relu_softmax"], "activation": "relu_nobias"}]})
    with torch.no_grad():
        # non-zero biases and norm shifts, which the relu_nobias layer must leave out
        for name, p in net.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
        for blk, layer in zip(net.vit.blocks, spec.layers, strict=True):
            blk.attn.alpha.fill_(-60.0)
            for h, kind in enumerate(layer.attention):
                blk.attn.alpha[h, net.attention_kinds.index(kind)] = 60.0
            blk.mlp.beta.fill_(-60.0)
            blk.mlp.beta[net.activation_kinds.index(layer.activation)] = 60.0
    x = torch.randn(3, 1, 16, 16)
    model = net.derive(spec).eval()
    net.eval()
    torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(net.arch_parameters()) == 2 * TINY.depth


def test_expected_latency_prices_match_cost_model():
    net = SuperNet(TINY, ["softmax", "scale"], ["gelu", "quad"])
    costs = _costs(TINY)
    prices = LatencyPrices.from_costs(costs, LAN, net)
    # one-hot mixtures reproduce the cost model's prediction of the uniform spec
    for a, act in ((0, 0), (1, 1)):
        att = torch.zeros(TINY.depth, TINY.heads, 2)
        att[..., a] = 1
        acts = torch.zeros(TINY.depth, 2)
        acts[:, act] = 1
        spec = ArchSpec.uniform(TINY.depth, TINY.heads, net.attention_kinds[a],
                                net.activation_kinds[act])
        assert float(prices.expected(att, acts)) == pytest.approx(costs.seconds(spec, LAN))
    assert prices.reference == pytest.approx(costs.seconds(
        ArchSpec.uniform(TINY.depth, TINY.heads, "softmax", "gelu"), LAN))
    with pytest.raises(ValueError):
        LatencyPrices.from_costs(_costs(get_config("demo")), LAN, net)


def _one_hot(n: int, *index: int) -> torch.Tensor:
    t = torch.zeros(*index[:-1], n) if len(index) > 1 else torch.zeros(n)
    t[..., index[-1]] = 1.0
    return t


def test_norm_search_supernet_equals_derived_vit_and_prices_each_norm_kind():
    torch.manual_seed(0)
    net = SuperNet(TINY, ["scale", "relu_softmax"], ["relu", "relu_nobias"],
                   norm_kinds=["layernorm", "batchnorm"])
    spec = ArchSpec((LayerSpec(("scale", "relu_softmax"), "relu_nobias", norm="batchnorm"),
                     LayerSpec(("relu_softmax",) * 2, "relu_nobias")), final_norm="batchnorm")
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 16, 16) * 2 + 1)  # running statistics for every BatchNorm
        for name, p in net.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)  # shifts the bias-free layer must leave out
        for i, (blk, layer) in enumerate(zip(net.vit.blocks, spec.layers, strict=True)):
            blk.attn.alpha.fill_(-60.0)
            for h, kind in enumerate(layer.attention):
                blk.attn.alpha[h, net.attention_kinds.index(kind)] = 60.0
            blk.mlp.beta.fill_(-60.0)
            blk.mlp.beta[net.activation_kinds.index(layer.activation)] = 60.0
            blk.norm1.delta.fill_(-60.0)
            blk.norm1.delta[net.norm_kinds.index(spec.norms()[i])] = 60.0
        net.vit.norm.delta.fill_(-60.0)
        net.vit.norm.delta[net.norm_kinds.index(spec.final_norm)] = 60.0
    assert net.vit.blocks[0].norm2.delta is net.vit.blocks[0].norm1.delta  # one per block
    x = torch.randn(3, 1, 16, 16)
    model = net.derive(spec).eval()
    net.eval()
    torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(net.arch_parameters()) == 3 * TINY.depth + 1
    # one-hot mixtures price what the cost model predicts: a bias-free ReLU rides in a
    # LayerNorm's comparison, not after a folded BatchNorm
    costs = _costs(TINY)
    prices = LatencyPrices.from_costs(costs, LAN, net)
    d, h = TINY.depth, TINY.heads
    for a in range(2):
        for f in range(2):
            for n in range(2):
                want = ArchSpec.uniform(d, h, net.attention_kinds[a], net.activation_kinds[f],
                                        net.norm_kinds[n])
                got = prices.expected(_one_hot(2, d, h, a), _one_hot(2, d, f),
                                      _one_hot(2, d + 1, n))
                assert float(got) == pytest.approx(costs.seconds(want, LAN)), (a, f, n)
    # a fixed activation is priced after each candidate norm
    fixed = SuperNet(TINY, ["scale"], None, "relu_nobias", ["layernorm", "batchnorm"])
    prices = LatencyPrices.from_costs(costs, LAN, fixed)
    for n in range(2):
        want = ArchSpec.uniform(d, h, "scale", "relu_nobias", fixed.norm_kinds[n])
        got = prices.expected(_one_hot(1, d, h, 0), None, _one_hot(2, d + 1, n))
        assert float(got) == pytest.approx(costs.seconds(want, LAN))
    with pytest.raises(ValueError, match="pre-norm"):
        SuperNet(TINY.replace(block="cct"), ["scale"], norm_kinds=["layernorm", "batchnorm"])


def test_budget_mode_chooses_norm_kinds():
    costs = _costs(TINY)
    kinds, d, h = [AttentionKind.SCALE], TINY.depth, TINY.heads
    att = torch.ones(d, h, 1)
    norm_kinds = [NormKind.LAYERNORM, NormKind.BATCHNORM]
    prefer_ln = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    ln = ArchSpec.uniform(d, h, "scale", "relu")
    bn = ln.with_norm("batchnorm")
    # generous: every norm keeps its argmax; tight: only BatchNorms fit
    loose = binarize_budget(att, kinds, costs, LAN, 10 * costs.seconds(ln, LAN), None, None,
                            "relu", prefer_ln, norm_kinds)
    assert loose == ln
    tight = binarize_budget(att, kinds, costs, LAN, costs.seconds(bn, LAN) * 1.0001, None,
                            None, "relu", prefer_ln, norm_kinds)
    assert tight == bn
    # in between: the layer whose LayerNorm weighs least gives it up first
    one = ArchSpec((ln.layers[0], bn.layers[1]))
    mid = binarize_budget(att, kinds, costs, LAN, costs.seconds(one, LAN) * 1.0001, None,
                          None, "relu", prefer_ln, norm_kinds)
    assert mid.norms() == (NormKind.LAYERNORM, NormKind.BATCHNORM, NormKind.LAYERNORM)
    # μ top-k: norms take their argmax
    spec = binarize_mu(att, kinds, 0.0, 0, norm_probs=1 - prefer_ln, norm_kinds=norm_kinds)
    assert spec.norms() == (NormKind.BATCHNORM,) * 3


# ----------------------------------------------------------------------------- search


def _cheap_weight(lam: float) -> float:
    torch.manual_seed(0)
    net = SuperNet(TINY, ["relu_softmax", "scale"], ["gelu", "quad"])
    cfg = SearchConfig(lam=lam, epochs=2, batch_size=64, lr=5e-3, arch_lr=5e-2, threads=1)
    seen = []
    res = search(net, _data(), _costs(TINY), LAN, cfg, progress=seen.append)
    assert [s.epoch for s in seen] == [1, 2]
    assert all(s.expected_s > 0 and 0.0 <= s.val_acc <= 1.0 for s in seen)
    att = res.attention_probs[..., 1].mean().item()  # scale
    act = res.activation_probs[..., 1].mean().item()  # quad
    return att + act


def test_latency_penalty_moves_weight_to_cheap_kinds():
    base = _cheap_weight(0.0)
    heavy = _cheap_weight(20.0)
    # Adam's normalised steps cap how far 12 steps can move α; λ = 0 stays near uniform.
    assert heavy > base + 0.5
    assert heavy > 1.3  # scale and quad each hold > 0.65 on average


def test_mu_top_k_keeps_the_right_heads():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(3, 4, 2, generator=g)
    probs = probs / probs.sum(-1, keepdim=True)
    kinds = [AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE]
    for mu, want in ((0.0, 0), (0.25, 3), (0.5, 6), (0.7, 8), (1.0, 12)):
        spec = binarize_mu(probs, kinds, mu, cheap_index=1)
        kept = [(i, h) for i, layer in enumerate(spec.layers)
                for h, k in enumerate(layer.attention) if k is AttentionKind.RELU_SOFTMAX]
        assert len(kept) == want
        top = sorted((-float(probs[i, h, 0]), i, h) for i in range(3) for h in range(4))
        assert sorted(kept) == sorted((i, h) for _, i, h in top[:want])
    with pytest.raises(ValueError):
        binarize_mu(probs, kinds, 1.5, cheap_index=1)


def _with_layer(spec: ArchSpec, index: int, layer: LayerSpec) -> ArchSpec:
    return ArchSpec(tuple(layer if i == index else old for i, old in enumerate(spec.layers)))


def _admissible_upgrades(spec, att, acts, kinds, act_kinds, costs):
    """Every spec one admissible upgrade away: a head or layer moved to a pricier kind,
    from its cheapest kind to any, otherwise only to a kind with more weight."""
    a_price = [costs.head_seconds(k, LAN) for k in kinds]
    f_price = [costs.activation_seconds(k, LAN) for k in act_kinds]
    a_idx = {AttentionKind(k): i for i, k in enumerate(kinds)}
    f_idx = {k: i for i, k in enumerate(act_kinds)}

    def ok(prices, weights, cur, k):
        return prices[k] > prices[cur] and (prices[cur] == min(prices) or
                                            weights[k] > weights[cur])

    for li, layer in enumerate(spec.layers):
        for hj, kind in enumerate(layer.attention):
            cur = a_idx[kind]
            for k in range(len(kinds)):
                if ok(a_price, att[li, hj], cur, k):
                    heads = list(layer.attention)
                    heads[hj] = kinds[k]
                    yield _with_layer(spec, li, LayerSpec(tuple(heads), layer.activation))
        cur = f_idx[layer.activation.value]
        for k in range(len(act_kinds)):
            if ok(f_price, acts[li], cur, k):
                yield _with_layer(spec, li, LayerSpec(layer.attention, act_kinds[k]))


def test_budget_mode_meets_budget():
    costs = _costs(TINY)
    kinds = [AttentionKind.SOFTMAX, AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE]
    g = torch.Generator().manual_seed(1)
    att = torch.rand(TINY.depth, TINY.heads, 3, generator=g).softmax(-1)
    acts = torch.rand(TINY.depth, 3, generator=g).softmax(-1)
    act_kinds = ["gelu", "relu", "identity"]
    top = costs.seconds(ArchSpec.uniform(TINY.depth, TINY.heads, "softmax", "gelu"), LAN)
    floor = costs.seconds(ArchSpec.uniform(TINY.depth, TINY.heads, "scale", "identity"), LAN)
    for frac in (0.9, 0.6, 0.3, 0.05):
        budget = floor + frac * (top - floor)
        spec = binarize_budget(att, kinds, costs, LAN, budget, acts, act_kinds)
        assert costs.seconds(spec, LAN) <= budget
        # the rest of the budget is spent: no admissible upgrade would still fit
        ups = list(_admissible_upgrades(spec, att, acts, kinds, act_kinds, costs))
        assert all(costs.seconds(u, LAN) > budget for u in ups)
    # a generous budget moves every head and layer off its cheapest kind, and no
    # admissible upgrade is left; an impossible budget is an error
    loose = binarize_budget(att, kinds, costs, LAN, 10 * top, acts, act_kinds)
    assert not list(_admissible_upgrades(loose, att, acts, kinds, act_kinds, costs))
    assert all(k is not AttentionKind.SCALE for layer in loose.layers for k in layer.attention)
    assert all(layer.activation.value != "identity" for layer in loose.layers)
    with pytest.raises(ValueError, match="budget"):
        binarize_budget(att, kinds, costs, LAN, 0.5 * floor, acts, act_kinds)
    assert cheapest(kinds, costs, LAN) == 2


def test_budget_mode_keeps_a_preferred_kind_over_a_dearer_unwanted_one():
    # relu is dearer than quad here, but the search weights quad far above it: with
    # budget to spare, a layer on quad stays there; a layer on identity (the cheapest)
    # moves up to its heaviest dearer kind.
    costs = _costs(TINY)
    kinds = [AttentionKind.SCALE]
    att = torch.ones(TINY.depth, TINY.heads, 1)
    act_kinds = ["relu", "quad", "identity"]
    acts = torch.tensor([[0.05, 0.9, 0.05], [0.3, 0.1, 0.6]])
    spec = binarize_budget(att, kinds, costs, LAN, 1e3, acts, act_kinds)
    assert [layer.activation.value for layer in spec.layers] == ["quad", "relu"]


def test_mu_sweep_is_monotone_in_kept_heads():
    torch.manual_seed(0)
    net = SuperNet(TINY, ["relu_softmax", "scale"])
    cfg = SearchConfig(lam=1.0, epochs=1, batch_size=64, threads=1)
    res = search(net, _data(256), _costs(TINY), LAN, cfg)
    pts = mu_sweep(res, _costs(TINY), LAN, mus=(0.0, 0.5, 1.0))
    kept = [p.spec.summary().get("relu_softmax", 0) for p in pts]
    assert kept == [0, 2, 4]
    assert pts[0].predicted_s < pts[-1].predicted_s
    assert all(0.0 <= p.val_acc <= 1.0 for p in pts)


# ----------------------------------------------------------------------------- CLIs


def _cli(*argv: str) -> tuple[int, str]:
    from mpcvit.commands import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def test_search_cli_then_distilled_train_of_searched_arch(tmp_path):
    from mpcvit.models.checkpoint import load_checkpoint

    demo = get_config("demo")
    costs = tmp_path / "costs.yaml"
    _costs(demo).save(costs, LAN)
    data = "synthetic:size=28,classes=4,train=256,test=128"
    rc, out = _cli("train", "--model", "demo", "--data", data, "--epochs", "1",
                   "--out", str(tmp_path / "teacher.pt"), "--threads", "1")
    assert rc == 0, out
    arch = tmp_path / "arch.yaml"
    rc, out = _cli("search", "--model", "demo", "--data", data, "--costs", str(costs),
                   "--mu", "0.25", "--epochs", "1", "--out", str(arch), "--threads", "1",
                   "--batch-size", "64")
    assert rc == 0, out
    assert "epoch 1/1" in out and "expected_latency" in out
    spec = ArchSpec.from_yaml(arch.read_text())
    assert spec.summary()["relu_softmax"] == 4 and spec.summary()["scale"] == 12
    rows = (tmp_path / "arch.pareto.csv").read_text().strip().splitlines()
    assert rows[0].startswith("mu,predicted_s") and len(rows) == 12
    rc, out = _cli("train", "--model", "demo", "--data", data, "--epochs", "1",
                   "--arch", str(arch), "--teacher", str(tmp_path / "teacher.pt"),
                   "--out", str(tmp_path / "student.pt"), "--threads", "1")
    assert rc == 0, out
    assert "soft=" in out  # the distillation terms were used
    student, extra = load_checkpoint(tmp_path / "student.pt")
    assert student.spec == spec
    assert 0.0 <= extra["test_acc"] <= 1.0


def test_search_cli_offers_norm_kinds(tmp_path):
    from mpcvit.models.vit import BatchNorm, ViT

    demo = get_config("demo")
    costs = tmp_path / "costs.yaml"
    _costs(demo).save(costs, LAN)
    data = "synthetic:size=28,classes=4,train=256,test=128"
    arch = tmp_path / "arch.yaml"
    rc, out = _cli("search", "--model", "demo", "--data", data, "--costs", str(costs),
                   "--mu", "0.25", "--epochs", "1", "--out", str(arch), "--threads", "1",
                   "--batch-size", "64", "--activations", "relu,relu_nobias",
                   "--norms", "layernorm,batchnorm", "--lam", "20")
    assert rc == 0, out
    assert "norms layernorm,batchnorm" in out
    spec = ArchSpec.from_yaml(arch.read_text())
    model = ViT(demo.replace(num_classes=4), spec)  # a valid spec for the model
    # the heavy latency penalty moved weight to the free BatchNorm
    assert NormKind.BATCHNORM in spec.norms()
    assert any(isinstance(m, BatchNorm) for m in model.modules())
    rc, out = _cli("train", "--model", "demo", "--data", data, "--epochs", "1",
                   "--arch", str(arch), "--out", str(tmp_path / "m.pt"), "--threads", "1")
    assert rc == 0, out


def test_search_cli_errors(tmp_path):
    rc, _ = _cli("search", "--model", "demo", "--data", "synthetic:size=28", "--mu", "2",
                 "--costs", str(tmp_path / "x.yaml"), "--out", str(tmp_path / "a.yaml"))
    assert rc == 2
    rc, _ = _cli("search", "--model", "demo", "--data", "synthetic:size=28", "--mu", "0.5",
                 "--network", "moon", "--out", str(tmp_path / "a.yaml"))
    assert rc == 2
    costs = tmp_path / "costs.yaml"
    _costs(get_config("demo")).save(costs)
    rc, _ = _cli("search", "--model", "demo", "--data",
                 "synthetic:size=28,classes=4,train=64,test=32", "--costs", str(costs),
                 "--latency-budget", "1e-6", "--epochs", "0", "--out", str(tmp_path / "a.yaml"))
    assert rc == 2
