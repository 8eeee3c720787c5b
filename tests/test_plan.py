"""Protocol plans per block type: plain validated data, carried by the model's modules, the
checkpoint, the arch spec YAML and the model facts party 1 receives; priced from the cost
file's variants; chosen per network by the planner and the search (on crafted cost files:
test data, not latency tables anything ships with); (slow) party 1 runs the plan party 0
serves."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from mpcvit.models.configs import get_config
from mpcvit.models.costs import NETWORKS, Cost, CostModel, cost_model_from_measurements
from mpcvit.models.plan import (
    BLOCKS,
    NAMED,
    ModelPlan,
    arch_plan,
    arch_yaml,
    entry_block,
    entry_variants,
)
from mpcvit.models.planner import choose_plan, plan_report
from mpcvit.models.spec import ArchSpec, LayerSpec
from mpcvit.mpc.protocols.plan import PLANS, ProtocolPlan

DEMO = get_config("demo")
LAN, WAN = NETWORKS["lan"], NETWORKS["wan"]
FSS = ProtocolPlan(comparison="fss")
MIXED = ModelPlan(attention=PLANS["fss"], activation=FSS.replace(gelu="spline"))


def _default_measurements() -> dict[str, dict[str, float]]:
    """A demo-shaped cost file's default entries (rounds as the demo's, round numbers)."""
    m: dict[str, dict[str, float]] = {}
    for kind, rounds, nbytes in (("softmax", 50, 3e6), ("relu_softmax", 16, 2e6),
                                 ("quad2", 12, 1.4e6), ("scale", 2, 1.7e5)):
        m[f"attention.{kind}.one_head"] = {"rounds": rounds, "bytes": nbytes / 4,
                                           "compute_s": 0.01}
        m[f"attention.{kind}.all_heads"] = {"rounds": rounds, "bytes": nbytes,
                                            "compute_s": 0.04}
    for kind, rounds, nbytes in (("gelu", 9, 2e6), ("relu", 5, 6e5), ("quad", 1, 2e5),
                                 ("identity", -1, -2e5), ("relu_nobias", 0, 6e5)):
        m[f"activation.{kind}"] = {"rounds": rounds, "bytes": nbytes, "compute_s": 0.02}
    for kind in ("gelu", "relu", "quad"):
        m[f"token_mask.{kind}.one_token"] = {"rounds": 5, "bytes": 1e4, "compute_s": 0.005}
    m["token_mask.relu_after.one_token"] = {"rounds": 5, "bytes": 3e3, "compute_s": 0.005}
    m["token_mask.relu_after.all_tokens"] = {"rounds": 5, "bytes": 1.5e5, "compute_s": 0.01}
    m["layernorm"] = {"rounds": 7, "bytes": 8e5, "compute_s": 0.02}
    m["layernorm.final"] = {"rounds": 7, "bytes": 1e4, "compute_s": 0.005}
    m["linear"] = {"rounds": 4, "bytes": 8e5, "compute_s": 0.01}
    m["linear.stem_head"] = {"rounds": 2, "bytes": 1e5, "compute_s": 0.001}
    return m


def _costs(variant: callable, config=DEMO) -> CostModel:
    """Every entry's variants priced as ``variant(default cost dict)``."""
    m = _default_measurements()
    rectify = config.block == "prenorm"  # the demo fuses its norms (asserted below)
    for entry in list(m):
        for name in entry_variants(entry, rectify):
            if name != "default":
                m[f"{entry}@{name}"] = variant(m[entry])
    return cost_model_from_measurements(config, m)


def _fewer_rounds_more_compute(d: dict[str, float]) -> dict[str, float]:
    """FSS-like: a quarter of the rounds, half the bytes, three times the compute plus
    50 ms, dealer keys: wins where rounds are dear (WAN), loses where compute is (LAN)."""
    return {"rounds": max(1, d["rounds"] // 4) if d["rounds"] > 0 else d["rounds"],
            "bytes": d["bytes"] / 2, "compute_s": 3 * d["compute_s"] + 0.05,
            "offline_bytes": 1e7}


def _cheaper_everywhere(d: dict[str, float]) -> dict[str, float]:
    return {"rounds": d["rounds"] // 2, "bytes": d["bytes"] / 2,
            "compute_s": d["compute_s"] / 2}


SOFTMAX = ArchSpec.uniform(DEMO.depth, DEMO.heads, "softmax", "gelu")
MIX = ArchSpec(tuple(LayerSpec(("relu_softmax", "scale", "quad2", "scale"), act)
                     for act in ("relu", "relu_nobias", "gelu", "quad")))


# ----------------------------------------------------------------------------- plain data


def test_model_plan_is_plain_validated_data(tmp_path):
    plan = ModelPlan(attention=PLANS["fss"], norm=FSS)
    d = plan.to_dict()
    assert d == {"attention": {"comparison": "fss", "gelu": "spline", "exp": "spline",
                               "reciprocal": "spline", "rsqrt": "spline"},
                 "norm": {"comparison": "fss"}}
    assert ModelPlan.from_dict(json.loads(json.dumps(d))) == plan
    assert ModelPlan().to_dict() == {} and ModelPlan.from_dict(None) == ModelPlan()
    # one ProtocolPlan's dict means every block runs it (what older senders sent)
    assert ModelPlan.from_dict(FSS.to_dict()) == ModelPlan.uniform(FSS)
    assert ModelPlan.of(FSS) == ModelPlan.uniform(FSS) and ModelPlan.of(None) == ModelPlan()
    for bad in ({"attn": {}}, {"attention": {"gelu": "erf"}}, {"attention": "fss"},
                {"norm": {"comparison": "fss"}, "gelu": "poly"}, ["fss"]):
        with pytest.raises(ValueError, match="protocol plan"):
            ModelPlan.from_dict(bad)
    # text: named plans, inline [block.]field=value items, files
    assert ModelPlan.parse("fss") == ModelPlan.uniform(PLANS["fss"]) == NAMED["fss"]
    assert ModelPlan.parse("default").is_default and "wan" in NAMED and "lan" in NAMED
    got = ModelPlan.parse("attention.comparison=fss,attention.exp=spline,norm.comparison=fss")
    assert got == ModelPlan(attention=FSS.replace(exp="spline"), norm=FSS)
    assert ModelPlan.parse("comparison=fss,fss_bits=28") == ModelPlan.uniform(
        FSS.replace(fss_bits=28))
    assert got.describe() == "attention: comparison=fss,exp=spline; norm: comparison=fss"
    assert NAMED["wan"].describe() == "wan" and ModelPlan().describe() == "default"
    for bad in ("fast", "mlp.comparison=fss", "attention.comparison=tree"):
        with pytest.raises(ValueError, match="protocol plan"):
            ModelPlan.parse(bad)
    path = tmp_path / "plan.yaml"
    path.write_text(got.to_yaml())
    assert ModelPlan.parse(str(path)) == got
    with pytest.raises(FileNotFoundError):
        ModelPlan.parse(str(tmp_path / "missing.yaml"))


def test_each_module_runs_its_block_types_plan():
    from mpcvit.models.secure import prepare_for_mpc
    from mpcvit.models.vit import ViT

    model = ViT(DEMO, protocol=MIXED.with_block("norm", FSS))
    prepared = prepare_for_mpc(model)
    seen = {b: 0 for b in BLOCKS}
    for m in prepared.modules():
        if hasattr(m, "plan_block"):
            assert m.protocol == prepared.protocol.block(m.plan_block)
            seen[m.plan_block] += 1
    # per block: attention and MLP of each layer; two norms per layer and the final one
    assert seen == {"attention": DEMO.depth, "activation": DEMO.depth,
                    "norm": 2 * DEMO.depth + 1}
    model.set_protocol(None)
    assert all(m.protocol == ProtocolPlan() for m in model.modules() if hasattr(m, "plan_block"))


def test_plan_round_trips_through_checkpoint_spec_yaml_and_model_facts(tmp_path):
    from mpcvit.models.checkpoint import load_checkpoint, save_checkpoint
    from mpcvit.models.vit import ViT
    from mpcvit.party.backend import ModelFacts, describe_model

    torch.manual_seed(0)
    model = ViT(DEMO, MIX, protocol=MIXED)
    save_checkpoint(model, tmp_path / "m.pt")
    back, _ = load_checkpoint(tmp_path / "m.pt")
    assert back.protocol == MIXED and back.spec == MIX
    assert all(m.protocol == MIXED.block(m.plan_block) for m in back.modules()
               if hasattr(m, "plan_block"))
    # a checkpoint written before plans existed (no "plan" key) runs the default plan
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    del blob["plan"]
    torch.save(blob, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")[0].protocol == ModelPlan()
    # the arch spec YAML the search writes: the spec reads as before, the plan beside it
    arch = tmp_path / "arch.yaml"
    arch.write_text(arch_yaml(MIX, MIXED))
    assert ArchSpec.parse(str(arch), DEMO.depth, DEMO.heads) == MIX
    assert arch_plan(str(arch)) == MIXED == ModelPlan.parse(str(arch))
    plain = tmp_path / "plain.yaml"
    plain.write_text(MIX.to_yaml())
    assert arch_plan(str(plain)) is None and arch_plan("scale+relu") is None
    with pytest.raises(ValueError, match="without a protocol plan"):
        ModelPlan.parse(str(plain))
    # what party 0 sends party 1
    facts = describe_model(back, "demo", None)
    received = ModelFacts.from_dict(json.loads(json.dumps(facts.to_dict())))
    assert ModelPlan.from_dict(received.protocol) == MIXED


def test_party_zero_serves_the_checkpoint_plan_or_the_configured_one(tmp_path):
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.vit import ViT
    from mpcvit.mpc.errors import ConfigError
    from mpcvit.party.config import PartyConfig
    from mpcvit.party.server import load_party_model

    save_checkpoint(ViT(DEMO, protocol=MIXED), tmp_path / "m.pt")
    base = {"rank": 0, "listen": "127.0.0.1:0", "peer": "127.0.0.1:1", "provider": "tfp",
            "model": str(tmp_path / "m.pt")}
    model, facts = load_party_model(PartyConfig.from_dict(base, env={}))
    assert model.protocol == MIXED and facts.protocol == MIXED.to_dict()
    for override, want in (("wan", NAMED["wan"]), ("default", ModelPlan()),
                           ("norm.comparison=fss", ModelPlan(norm=FSS))):
        cfg = PartyConfig.from_dict(base | {"protocol": override}, env={})
        model, facts = load_party_model(cfg)
        assert model.protocol == want and ModelPlan.from_dict(facts.protocol) == want
    env = PartyConfig.from_dict(base, env={"MPCVIT_PROTOCOL": "fss"})
    assert env.protocol == "fss"
    with pytest.raises(ConfigError, match="protocol"):
        PartyConfig.from_dict(base | {"protocol": "attention.comparison=tree"}, env={})


# ----------------------------------------------------------------------------- pricing


def test_cost_file_keeps_every_variant_and_reads_version_one(tmp_path):
    costs = _costs(_fewer_rounds_more_compute)
    assert "comparison=fss,exp=spline,reciprocal=spline" in costs.variants[
        "attention.softmax.all_heads"]
    assert set(costs.variants["activation.gelu"]) == {"comparison=fss",
                                                      "comparison=fss,gelu=spline"}
    assert "attention.scale.all_heads" not in costs.variants  # nothing to vary
    path = tmp_path / "costs.yaml"
    costs.save(path, WAN)
    back = CostModel.load(path)
    assert back == costs and back.to_dict()["version"] == 2
    # a version-1 file (no variants) still prices the default plan, and says what is
    # missing for any other
    d = costs.to_dict()
    d["version"] = 1
    del d["variants"]
    old = CostModel.from_dict(d)
    assert old.predict(SOFTMAX) == costs.predict(SOFTMAX)
    with pytest.raises(KeyError, match="re-run mpcvit profile"):
        old.predict(SOFTMAX, MIXED)
    assert choose_plan(old, SOFTMAX, WAN) == ModelPlan()
    with pytest.raises(ValueError, match="version 99"):
        CostModel.from_dict({**d, "version": 99})


def test_plans_are_priced_by_the_variant_each_block_runs():
    costs = _costs(_fewer_rounds_more_compute)
    default, fss = costs.predict(SOFTMAX), costs.predict(SOFTMAX, MIXED)
    parts = costs.breakdown(SOFTMAX, MIXED)
    assert sum(c.rounds for c in parts.values()) == fss.rounds
    # the norm stays default under MIXED: its part is the default plan's
    assert parts["norm"] == costs.breakdown(SOFTMAX)["norm"]
    d = DEMO.depth
    # softmax 50 -> 12 rounds and gelu 9 -> 2 per layer
    assert default.rounds - fss.rounds == d * (50 - 12) + d * (9 - 2)
    # the demo fuses norm2 with fc1, so its bias-free ReLU rides in the norm: the norm's
    # plan prices it; vit_7_4_32 does not fuse (fc1 is too wide at 65 tokens)
    assert costs.rectify_in_norm and entry_block("activation.relu_nobias", True)[0] == "norm"
    assert not CostModel(get_config("vit_7_4_32"), {}, {}, Cost(), Cost(), Cost(),
                         Cost()).rectify_in_norm
    norm_fss = costs.breakdown(MIX, ModelPlan(norm=FSS))
    act_fss = costs.breakdown(MIX, ModelPlan(activation=FSS))
    base = costs.breakdown(MIX)
    assert norm_fss["norm"].rounds < base["norm"].rounds
    assert act_fss["norm"] == base["norm"] and act_fss["activation"].rounds < \
        base["activation"].rounds


def test_lan_and_wan_plans_differ_where_they_must():
    costs = _costs(_fewer_rounds_more_compute)
    lan, wan = choose_plan(costs, SOFTMAX, LAN), choose_plan(costs, SOFTMAX, WAN)
    assert lan == ModelPlan()  # compute dominates: the carry tree everywhere
    assert wan.attention.fss and wan.activation.fss and wan.norm.fss
    assert costs.seconds(SOFTMAX, WAN, wan) < costs.seconds(SOFTMAX, WAN)
    # a spec with no comparison in attention or MLP: only the norm's plan can change
    cheap = ArchSpec.uniform(DEMO.depth, DEMO.heads, "scale", "quad")
    wan_cheap = choose_plan(costs, cheap, WAN)
    assert wan_cheap.attention == wan_cheap.activation == ProtocolPlan()
    assert wan_cheap.norm.fss
    # a variant cheaper in every respect wins on both networks: the same plan
    better = _costs(_cheaper_everywhere)
    assert choose_plan(better, SOFTMAX, LAN) == choose_plan(better, SOFTMAX, WAN) != ModelPlan()
    # fields a spec does not use stay at their defaults (no exp variant without softmax)
    relu_only = ArchSpec.uniform(DEMO.depth, DEMO.heads, "relu_softmax", "relu")
    plan = choose_plan(better, relu_only, WAN)
    assert plan.attention.exp == "square" and plan.activation.gelu == "poly"


def test_a_chosen_plan_never_prices_slower_than_the_default():
    rng = random.Random(0)

    def noisy(d: dict[str, float]) -> dict[str, float]:
        return {"rounds": max(0, int(d["rounds"] * rng.uniform(0.1, 1.5))),
                "bytes": d["bytes"] * rng.uniform(0.2, 3.0),
                "compute_s": d["compute_s"] * rng.uniform(0.3, 6.0)}

    specs = [SOFTMAX, MIX, ArchSpec.uniform(DEMO.depth, DEMO.heads, "scale", "relu_nobias")]
    for _ in range(20):
        costs = _costs(noisy)
        for spec in specs:
            for net in (LAN, WAN, NETWORKS["loopback"]):
                rep = plan_report(costs, spec, net)
                for block in rep.blocks:
                    assert net.seconds(rep.blocks[block]) <= net.seconds(
                        rep.default_blocks[block]) + 1e-12, (block, net.name)
                assert net.seconds(rep.cost) <= net.seconds(rep.default_cost) + 1e-12


# ----------------------------------------------------------------------------- commands


def _cli(*argv: str) -> tuple[int, str]:
    from mpcvit.commands import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


def test_search_and_plan_commands_pick_the_plan_per_network(tmp_path):
    costs = tmp_path / "costs.yaml"
    _costs(_fewer_rounds_more_compute).save(costs)
    data = "synthetic:size=28,classes=4,train=64,test=32"
    plans = {}
    for net in ("lan", "wan"):
        arch = tmp_path / f"arch_{net}.yaml"
        rc, out = _cli("search", "--model", "demo", "--data", data, "--costs", str(costs),
                       "--mu", "0.25", "--epochs", "0", "--network", net, "--out", str(arch),
                       "--json")
        assert rc == 0, out
        plans[net] = arch_plan(str(arch))
        report = json.loads(out.strip().splitlines()[-1])
        assert ModelPlan.from_dict(report["plan"]) == plans[net]
        assert "plan for" in out
    assert plans["lan"] == ModelPlan() and plans["wan"].attention.fss
    spec = ArchSpec.parse(str(tmp_path / "arch_wan.yaml"), DEMO.depth, DEMO.heads)
    rc, out = _cli("plan", "--model", "demo", "--arch", str(tmp_path / "arch_wan.yaml"),
                   "--costs", str(costs), "--json")
    assert rc == 0, out
    report = json.loads(out.strip().splitlines()[-1])
    assert ModelPlan.from_dict(report["plans"]["wan"]["plan"]) == plans["wan"]
    assert report["plans"]["lan"]["plan"] == {}
    assert report["plans"]["wan"]["total"]["rounds"] < report["plans"]["wan"][
        "default_total"]["rounds"]
    assert ArchSpec.from_dict(report["spec"]) == spec
    out_plan = tmp_path / "wan_plan.yaml"
    rc, _ = _cli("plan", "--model", "demo", "--arch", str(tmp_path / "arch_wan.yaml"),
                 "--costs", str(costs), "--network", "wan", "--out", str(out_plan))
    assert rc == 0 and ModelPlan.parse(str(out_plan)) == plans["wan"]
    # training the searched spec keeps its plan in the checkpoint
    from mpcvit.models.checkpoint import load_checkpoint

    rc, out = _cli("train", "--model", "demo", "--data", data, "--epochs", "1",
                   "--arch", str(tmp_path / "arch_wan.yaml"), "--out", str(tmp_path / "s.pt"),
                   "--threads", "1")
    assert rc == 0, out
    student, _ = load_checkpoint(tmp_path / "s.pt")
    assert student.protocol == plans["wan"] and student.spec == spec
    rc, _ = _cli("plan", "--model", "demo", "--costs", str(costs), "--network", "moon")
    assert rc == 2
    rc, _ = _cli("plan", "--model", "demo", "--costs", str(costs), "--out", str(out_plan))
    assert rc == 2  # --out needs one network


def test_plan_command_saves_a_checkpoint_that_serves_the_plan(tmp_path):
    from mpcvit.models.checkpoint import load_checkpoint, save_checkpoint
    from mpcvit.models.vit import ViT

    costs = tmp_path / "costs.yaml"
    _costs(_fewer_rounds_more_compute).save(costs)
    torch.manual_seed(0)
    save_checkpoint(ViT(DEMO, MIX), tmp_path / "m.pt", {"dataset": "fashion-mnist"})
    rc, out = _cli("plan", "--model", str(tmp_path / "m.pt"), "--costs", str(costs),
                   "--network", "wan", "--save", str(tmp_path / "wan.pt"))
    assert rc == 0, out
    model, extra = load_checkpoint(tmp_path / "wan.pt")
    costs_model = CostModel.load(costs)
    assert model.protocol == choose_plan(costs_model, MIX, WAN) != ModelPlan()
    assert extra == {"dataset": "fashion-mnist"} and model.spec == MIX


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_party_one_runs_the_plan_party_zero_serves(tmp_path):
    """A checkpoint with a per-block plan served by real processes: party 1 learns the
    plan from party 0's model facts, and both run it (a different plan would desync the
    protocol: other rounds, wrong logits or a timeout)."""
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.profiler import measure_secure_model
    from mpcvit.models.vit import ViT
    from mpcvit.party.client import PrivateInferenceClient
    from mpcvit.party.images import load_images
    from mpcvit.party.local import LocalCluster

    plan = ModelPlan(attention=FSS.replace(reciprocal="spline"), norm=FSS)
    spec = ArchSpec(tuple(LayerSpec(("relu_softmax", "scale", "scale", "scale"), act)
                          for act in ("relu", "gelu", "relu", "gelu")))
    torch.manual_seed(0)
    model = ViT(DEMO, spec, protocol=plan).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)  # spread an untrained model's logits
    save_checkpoint(model, tmp_path / "m.pt", extra={"dataset": "fashion-mnist"})
    cluster = LocalCluster(tmp_path, model=str(tmp_path / "m.pt"),
                           party_overrides={"model_name": "demo",
                                            "timeouts": {"pairing": 5, "request": 120}})
    cluster.start()
    try:
        cluster.wait_ready(240)
        pixels = load_images(["fashion-mnist:test:0"])[0].pixels
        with PrivateInferenceClient(cluster.party_addresses, timeout=240) as client:
            info = client.model_info()
            pred = client.infer(pixels)
    finally:
        codes = cluster.stop()
    assert codes == {"dealer": 0, 0: 0, 1: 0}, codes
    x = torch.from_numpy(np.stack([info.preprocess(pixels)]))
    with torch.no_grad():
        expected = model(x).numpy()[0]
    np.testing.assert_allclose(pred.logits, expected, atol=0.1)
    # both parties ran the plan's rounds: those of the same model under that plan in a
    # direct 2-party run, and fewer than the default plan's
    rounds = {s.rounds for s in pred.stats}
    run = measure_secure_model(DEMO, spec, x, state_dict=model.state_dict(), protocol=plan)
    default = measure_secure_model(DEMO, spec, x, state_dict=model.state_dict())
    assert rounds == {run.rounds} and run.rounds < default.rounds


def test_bench_network_plan_auto_is_the_planners_pick(tmp_path):
    from mpcvit.commands.bench import network_plan

    costs = tmp_path / "costs.yaml"
    _costs(_fewer_rounds_more_compute).save(costs)
    model = CostModel.load(costs)
    for net in ("lan", "wan"):
        got = network_plan("auto", None, DEMO, SOFTMAX, net, str(costs))
        assert got == choose_plan(model.priced_by("cpu"), SOFTMAX, NETWORKS[net])
    assert network_plan("auto", None, DEMO, SOFTMAX, "wan", str(costs)) != ModelPlan()
    assert network_plan(None, None, DEMO, SOFTMAX, "wan", None) == ModelPlan()
    assert network_plan("fss", None, DEMO, SOFTMAX, "wan", None) == NAMED["fss"]
