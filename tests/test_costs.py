"""Cost model: network presets and parsing, the cost file, prediction arithmetic, and (slow)
profiled blocks against a whole-model secure run on the demo config."""

from __future__ import annotations

import json
import math

import pytest
from mpcvit.models.configs import get_config
from mpcvit.models.costs import (
    BLOCK_NAMES,
    NETWORKS,
    Cost,
    CostModel,
    NetworkModel,
    cost_model_from_measurements,
    parse_network,
)
from mpcvit.models.plan import ModelPlan
from mpcvit.models.profiler import measure_secure_model
from mpcvit.models.spec import ArchSpec, LayerSpec
from mpcvit.mpc.protocols.plan import PLANS, ProtocolPlan

DEMO = get_config("demo")


def _measurements() -> dict[str, dict[str, float]]:
    """Profiler-shaped figures (distinct per block so mix-ups show)."""
    m: dict[str, dict[str, float]] = {}
    for i, kind in enumerate(("softmax", "relu_softmax", "scale", "quad2")):
        m[f"attention.{kind}.one_head"] = {"rounds": 80 - 10 * i, "bytes": 1000 * (i + 1),
                                           "compute_s": 0.1 * (i + 1)}
        m[f"attention.{kind}.all_heads"] = {"rounds": 80 - 10 * i, "bytes": 3400 * (i + 1),
                                            "compute_s": 0.25 * (i + 1)}
    for i, kind in enumerate(("gelu", "relu", "quad", "identity", "relu_nobias")):
        m[f"activation.{kind}"] = {"rounds": 13 - 3 * i, "bytes": 500 - 100 * i,
                                   "compute_s": 0.05 * (4 - i)}
    m["token_mask.gelu.one_token"] = {"rounds": 13, "bytes": 10, "compute_s": 0.001}
    m["token_mask.relu_after.one_token"] = {"rounds": 5, "bytes": 3, "compute_s": 0.001}
    m["token_mask.relu_after.all_tokens"] = {"rounds": 5, "bytes": 150, "compute_s": 0.01}
    m["layernorm"] = {"rounds": 20, "bytes": 300, "compute_s": 0.02}
    m["layernorm.final"] = {"rounds": 20, "bytes": 7, "compute_s": 0.01}
    m["linear"] = {"rounds": 4, "bytes": 900, "compute_s": 0.03}
    m["linear.stem_head"] = {"rounds": 2, "bytes": 100, "compute_s": 0.004}
    # folded BatchNorms: nothing; an identity MLP merged without a LayerNorm to fuse
    m["batchnorm"] = {"rounds": 0, "bytes": 0, "compute_s": 0.0001}
    m["batchnorm.identity"] = {"rounds": -1, "bytes": -77, "compute_s": -0.002}
    m["batchnorm.final"] = {"rounds": 0, "bytes": 0, "compute_s": 0.0}
    return m


# ----------------------------------------------------------------------------- network


def test_network_presets_are_the_documented_ones():
    assert NETWORKS["lan"].bandwidth_bps == 3e9 and NETWORKS["lan"].rtt_s == 0.8e-3
    assert NETWORKS["wan"].bandwidth_bps == 100e6 and NETWORKS["wan"].rtt_s == 40e-3
    lo = NETWORKS["loopback"]
    c = Cost(rounds=100, bytes=1e9, compute_s=1.5)
    assert lo.seconds(c) == 1.5  # loopback adds nothing to the measured compute
    # a party's 1 GB count is 0.5 GB each way: 40 s at 100 Mbps; 100 rounds wait
    # 20 ms (RTT/2) each: 2 s; plus compute
    assert NETWORKS["wan"].seconds(c) == pytest.approx(1.5 + 40 + 2)


@pytest.mark.parametrize(
    "text,bps,rtt",
    [("1gbit,5ms", 1e9, 5e-3), ("100Mbps, 40ms", 100e6, 40e-3), ("2.5gbit,250us", 2.5e9, 250e-6),
     ("WAN", 100e6, 40e-3), ("10mbit,0.1s", 10e6, 0.1)],
)
def test_parse_network(text, bps, rtt):
    net = parse_network(text)
    assert net.bandwidth_bps == pytest.approx(bps) and net.rtt_s == pytest.approx(rtt)


@pytest.mark.parametrize("text", ["moon", "1gbit", "1gbit,5ms,3", "fast,5ms", "1gbit,5min",
                                  "0gbit,5ms", "1gbit,"])
def test_parse_network_errors(text):
    with pytest.raises(ValueError):
        parse_network(text)


def test_network_rejects_bad_values():
    with pytest.raises(ValueError):
        NetworkModel("x", 0.0, 1e-3)
    with pytest.raises(ValueError):
        NetworkModel("x", 1e9, -1.0)


# ----------------------------------------------------------------------------- model/file


def test_cost_file_round_trip(tmp_path):
    cm = cost_model_from_measurements(DEMO, _measurements(), {"provider": "dealer"})
    path = tmp_path / "costs.yaml"
    cm.save(path, NETWORKS["wan"])
    back = CostModel.load(path)
    assert back == cm
    assert CostModel.load(path, DEMO) == cm
    with pytest.raises(ValueError, match="cost file is for"):
        CostModel.load(path, get_config("vit_7_4_32"))  # profiled for another shape
    text = path.read_text()
    assert "blocks:" in text and "network:" in text
    assert set(cm.blocks()) == set(BLOCK_NAMES)
    table = cm.blocks_table(NETWORKS["wan"])
    b = table["attention.softmax"]
    assert b["seconds"] == pytest.approx(NETWORKS["wan"].seconds(cm.blocks()["attention.softmax"]))


def test_cost_file_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 99\n")
    with pytest.raises(ValueError):
        CostModel.load(path)
    d = cost_model_from_measurements(DEMO, _measurements()).to_dict()
    del d["per_layer"]["layernorm"]
    with pytest.raises(ValueError, match="lacks"):
        CostModel.from_dict(d)
    d = cost_model_from_measurements(DEMO, _measurements()).to_dict()
    d["per_layer"]["attention.bogus"] = d["per_layer"]["attention.scale"]
    with pytest.raises(ValueError):
        CostModel.from_dict(d)


def test_prediction_sums_layers_and_interpolates_heads():
    m = _measurements()
    cm = cost_model_from_measurements(DEMO, m)
    d, h = DEMO.depth, DEMO.heads
    # one and all heads reproduce the measurements; bytes grow linearly in between
    assert cm.attention_cost("relu_softmax", 1).bytes == 2000
    assert cm.attention_cost("relu_softmax", h).bytes == 6800
    assert cm.attention_cost("relu_softmax", 2).bytes == pytest.approx(2000 + 4800 / 3)
    assert cm.attention_cost("relu_softmax", 0) == Cost()
    uniform = ArchSpec.uniform(d, h, "softmax", "gelu")
    want_rounds = d * (80 + 13 + 2 * 20 + 4) + 20 + 2
    assert cm.predict(uniform).rounds == want_rounds
    # blocks of a uniform spec add up to its prediction
    blocks = cm.blocks()
    parts = ["attention.softmax", "activation.gelu", "layernorm", "linear"]
    assert sum(blocks[p].bytes for p in parts) == pytest.approx(cm.predict(uniform).bytes)
    # a layer mixing two kinds pays both kinds' rounds (groups run one after another)
    mixed = ArchSpec(tuple(LayerSpec(("relu_softmax", "scale", "scale", "scale"), "relu")
                           for _ in range(d)))
    per_layer = (70 + 60) + 10 + 40 + 4
    assert cm.predict(mixed).rounds == d * per_layer + 22
    lan = NETWORKS["lan"]
    assert cm.seconds(mixed, lan) == pytest.approx(lan.seconds(cm.predict(mixed)))


def test_batchnorm_specs_are_priced_per_layer_norm_kind(tmp_path):
    m = _measurements()
    cm = cost_model_from_measurements(DEMO, m)
    d, h = DEMO.depth, DEMO.heads
    bn = ArchSpec.uniform(d, h, "softmax", "gelu", "batchnorm")
    ln = ArchSpec.uniform(d, h, "softmax", "gelu")
    # the norms cost nothing: only the attention, activation, linear layers and stem
    assert cm.predict(bn).rounds == d * (80 + 13 + 4) + 2
    assert cm.predict(ln).rounds - cm.predict(bn).rounds == (2 * d + 1) * 20
    assert cm.breakdown(bn)["norm"].rounds == 0 and cm.block("batchnorm").rounds == 0
    # after a BatchNorm a bias-free ReLU is a ReLU (its own comparison, the MLP's plan)
    # and an identity MLP merges without a norm to fuse with
    layers = (LayerSpec(("scale",) * 4, "relu_nobias", norm="batchnorm"),
              LayerSpec(("scale",) * 4, "relu_nobias"),
              LayerSpec(("scale",) * 4, "identity", norm="batchnorm"),
              LayerSpec(("scale",) * 4, "identity"))
    mixed = ArchSpec(layers, final_norm="batchnorm")
    acts = (13 - 3) + (13 - 12) + (-1) + (13 - 9)
    norms = 2 * 2 * 20 + 0
    assert cm.predict(mixed).rounds == d * (60 + 4) + acts + norms + 2
    parts = cm.breakdown(mixed)
    assert parts["activation"] == (cm.activation_cost("relu") + cm.activation_cost("identity")
                                   + Cost.from_dict(m["batchnorm.identity"]))
    assert parts["norm"] == cm.layernorm_cost().scale(4) + cm.activation_cost("relu_nobias") \
        + cm.batchnorm["layer"].scale(4) + cm.batchnorm["final"]
    assert cm.activation_block("relu_nobias", "batchnorm") == "activation"
    assert cm.activation_block("relu_nobias", "layernorm") == "norm"  # rides in the LN
    # a cost file from before batchnorm existed still loads and prices layernorm specs
    old = {k: v for k, v in m.items() if not k.startswith("batchnorm")}
    path = tmp_path / "old.yaml"
    cost_model_from_measurements(DEMO, old).save(path)
    back = CostModel.load(path)
    assert back.batchnorm == {} and "batchnorm" not in back.block_names()
    assert back.predict(ln) == cm.predict(ln)
    with pytest.raises(KeyError, match="no price of batchnorm; re-run mpcvit profile"):
        back.predict(bn)
    assert CostModel.load(_saved(cm, tmp_path)).batchnorm == cm.batchnorm


def _saved(cm: CostModel, tmp_path) -> str:
    path = tmp_path / "new.yaml"
    cm.save(path)
    return str(path)


def test_token_masks_are_priced_per_token():
    cm = cost_model_from_measurements(DEMO, _measurements())
    n, d, h = DEMO.num_tokens, DEMO.depth, DEMO.heads
    assert cm.token_mask["gelu.one_token"].bytes == 10
    # GeLU on k of n tokens: its rounds, bytes interpolated between 1 and n tokens; the
    # other n - k tokens take the ReLU after fc2
    k = 20
    got = cm.masked_activation_cost("gelu", k)
    assert got.rounds == 13 + 5
    assert got.bytes == pytest.approx(10 + (500 - 10) * (k - 1) / (n - 1)
                                      + 3 + (150 - 3) * (n - k - 1) / (n - 1))
    assert cm.masked_activation_cost("gelu", n) == cm.activation_cost("gelu")
    # no token selected: fc1 and fc2 merge (identity's saving) before the ReLU
    none = cm.masked_activation_cost("gelu", 0)
    assert none.rounds == 4 + 5 and none.bytes == 200 + 150
    layers = (LayerSpec(("scale",) * h, "gelu", tuple(range(k))),
              LayerSpec(("scale",) * h, "gelu", ()),
              *(LayerSpec(("scale",) * h, "gelu") for _ in range(d - 2)))
    spec, plain = ArchSpec(layers), ArchSpec.uniform(d, h, "scale", "gelu")
    diff = cm.predict(plain).bytes - cm.predict(spec).bytes
    assert diff == pytest.approx(2 * 500 - got.bytes - none.bytes)
    assert cm.layer_cost(layers[0]).bytes - cm.layer_cost(layers[2]).bytes == pytest.approx(
        got.bytes - 500)
    assert CostModel.from_dict(cm.to_dict()) == cm
    with pytest.raises(ValueError):
        cm.masked_activation_cost("gelu", n + 1)
    # a cost file profiled before token masks were priced says what to do
    older = CostModel.from_dict({**cm.to_dict(), "per_layer": {
        k: v for k, v in cm.to_dict()["per_layer"].items() if not k.startswith("token_mask.")}})
    assert older.predict(plain) == cm.predict(plain)
    with pytest.raises(KeyError, match="re-run mpcvit profile"):
        older.predict(spec)


# ----------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """`mpcvit profile --model demo --json --out FILE` (one real 2-party gRPC run)."""
    import contextlib
    import io

    from mpcvit.commands import main

    out = tmp_path_factory.mktemp("profile") / "costs.yaml"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["profile", "--model", "demo", "--repeats", "1", "--network", "wan",
                   "--json", "--out", str(out)])
    assert rc == 0
    report = json.loads(buf.getvalue().strip().splitlines()[-1])
    return report, CostModel.load(out)


@pytest.mark.slow
def test_profile_cli_reports_every_block(profiled):
    report, costs = profiled
    assert set(report["blocks"]) == set(BLOCK_NAMES)
    for name, b in report["blocks"].items():
        assert set(b) == {"rounds", "bytes", "compute_s", "seconds"}
        if name != "activation.identity":
            assert b["seconds"] >= b["compute_s"] >= 0.0, name
    for name in BLOCK_NAMES:
        if name not in ("activation.identity", "activation.relu_nobias", "batchnorm"):
            assert report["blocks"][name]["rounds"] > 0, name
    # a BatchNorm is folded into the linear layer it feeds: no round, no byte
    assert report["blocks"]["batchnorm"]["rounds"] == report["blocks"]["batchnorm"]["bytes"] == 0
    assert costs.batchnorm["identity"].rounds == -1  # the merge saves fc2's round
    # identity merges fc1 and fc2 into one layer: fc2's round and bytes are saved
    assert report["blocks"]["activation.identity"]["rounds"] == -DEMO.depth
    assert report["blocks"]["activation.identity"]["bytes"] < 0
    # a bias-free ReLU rides in its LayerNorm's comparison: bytes, but no round
    assert report["blocks"]["activation.relu_nobias"]["rounds"] == 0
    assert 0 < report["blocks"]["activation.relu_nobias"]["bytes"] \
        <= report["blocks"]["activation.relu"]["bytes"]
    # MPC cost ordering the search relies on
    b = report["blocks"]
    assert b["attention.softmax"]["rounds"] > b["attention.relu_softmax"]["rounds"] \
        > b["attention.scale"]["rounds"]
    assert b["activation.gelu"]["bytes"] > b["activation.quad"]["bytes"]
    assert costs.config == DEMO
    # every variant a plan can choose was profiled: FSS comparisons take fewer rounds
    rows = {(r["block"], r["variant"]): r for r in report["variants"]}
    for block, variant in (("attention.softmax", "comparison=fss,exp=spline,reciprocal=spline"),
                           ("activation.gelu", "comparison=fss,gelu=spline"),
                           ("activation.relu", "comparison=fss"),
                           ("layernorm", "comparison=fss")):
        assert rows[(block, variant)]["rounds"] < rows[(block, "default")]["rounds"], block
        assert rows[(block, variant)]["offline_bytes"] > 0  # FSS keys from the dealer
    # the demo's bias-free ReLU rides in its LayerNorm: it follows the norm's comparison
    assert rows[("activation.relu_nobias", "comparison=fss")]["rounds"] == 0
    assert ("attention.scale", "comparison=fss") not in rows  # nothing to vary


SPECS = {
    "softmax": ArchSpec.uniform(DEMO.depth, DEMO.heads, "softmax", "gelu"),
    "mixed": ArchSpec(tuple(LayerSpec(("relu_softmax", "scale", "quad2", "scale"), act)
                            for act in ("relu", "quad", "identity", "gelu"))),
    "bias_free": ArchSpec(tuple(LayerSpec(("scale",) * 4, act)
                                for act in ("relu_nobias", "relu", "relu_nobias", "quad"))),
    # BatchNorms and LayerNorms, a bias-free ReLU and an identity MLP after each
    "batchnorm": ArchSpec(tuple(LayerSpec(("relu_softmax", "scale", "quad2", "scale"), act,
                                          norm=norm)
                                for act, norm in (("relu_nobias", "batchnorm"),
                                                  ("identity", "batchnorm"),
                                                  ("relu_nobias", "layernorm"),
                                                  ("identity", "layernorm"))),
                          final_norm="batchnorm"),
    "token_masks": ArchSpec((LayerSpec(("relu_softmax", "scale", "scale", "scale"), "gelu",
                                       tuple(range(0, 50, 3))),
                             LayerSpec(("scale",) * 4, "gelu", ()),
                             LayerSpec(("scale",) * 4, "relu", (0, 7, 49)),
                             LayerSpec(("scale",) * 4, "gelu"))),
}
_FSS = ProtocolPlan(comparison="fss")
# non-default plans: every block on its own variant, and blocks on different ones
PLAN_ALL = ModelPlan.uniform(PLANS["fss"])
PLAN_SPLIT = ModelPlan(attention=_FSS.replace(exp="spline"), activation=_FSS, norm=ProtocolPlan())
PLAN_NORM = ModelPlan(activation=_FSS.replace(gelu="spline"), norm=_FSS)


@pytest.mark.slow
@pytest.mark.parametrize("name,plan", [
    ("softmax", None), ("mixed", None), ("bias_free", None), ("token_masks", None),
    ("batchnorm", None), ("softmax", PLAN_SPLIT), ("mixed", PLAN_ALL),
    ("bias_free", PLAN_NORM), ("token_masks", PLAN_NORM), ("batchnorm", PLAN_NORM),
], ids=["softmax", "mixed", "bias_free", "token_masks", "batchnorm", "softmax-split_plan",
        "mixed-fss_plan", "bias_free-norm_plan", "token_masks-norm_plan",
        "batchnorm-norm_plan"])
def test_blocks_predict_whole_model_run(profiled, name, plan):
    import torch

    _, costs = profiled
    spec = SPECS[name]
    run = measure_secure_model(DEMO, spec, torch.randn(1, 1, 28, 28), provider="dealer",
                               protocol=plan)
    pred = costs.predict(spec, plan)
    assert math.isclose(pred.rounds, run.rounds, rel_tol=0.15), (pred.rounds, run.rounds)
    assert math.isclose(pred.bytes, run.bytes, rel_tol=0.15), (pred.bytes, run.bytes)
    if plan is not None:
        # each block priced by the variant its plan runs: rounds exact, bytes exact up to
        # the interpolation over heads and tokens (measured: exact)
        assert pred.rounds == run.rounds
        assert math.isclose(pred.bytes, run.bytes, rel_tol=0.01), (pred.bytes, run.bytes)
        assert run.rounds < costs.predict(spec).rounds  # and a plan that changes something
    if name == "batchnorm":
        # folded norms cost nothing; each layer's activation priced after its norm kind
        assert pred.rounds == run.rounds and pred.bytes == run.bytes
    if any(layer.token_mask is not None for layer in spec.layers):
        # token masks are priced from per-token measurements: rounds exact, bytes linear
        # in tokens (measured: exact)
        assert pred.rounds == run.rounds
        assert math.isclose(pred.bytes, run.bytes, rel_tol=0.01), (pred.bytes, run.bytes)
    assert run.logits.shape == (1, DEMO.num_classes)
    assert torch.isfinite(run.logits).all()
