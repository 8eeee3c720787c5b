"""Benchmark commands' output contracts (speed is reported, never asserted)."""

from __future__ import annotations

import json

import pytest
from mpcvit.commands import main

pytestmark = pytest.mark.slow


def test_bench_transport_json_contract(capsys):
    assert main(["bench", "transport", "--tokens", "5", "--dim", "16", "--heads", "2",
                 "--hidden", "32", "--repeats", "1", "--runs", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("gloo_s", "grpc_s", "ratio", "gloo_bytes", "grpc_bytes", "gloo_rounds",
                "grpc_rounds"):
        assert key in res
    assert res["grpc_rounds"] == res["gloo_rounds"] > 0
    assert res["grpc_bytes"] == res["gloo_bytes"] > 0
    assert res["ratio"] == pytest.approx(res["grpc_s"] / res["gloo_s"])
    assert res["max_abs_diff"] < 0.05  # both transports computed the same block


def test_ceiling_shrink_factor():
    from mpcvit.bench.report import shrink_needed

    # 10 s against 4 s with 3 s shared: shrinking the shared part 3x gives 8/2 = 4x
    assert abs(shrink_needed(10.0, 4.0, 3.0, 4.0) - 3.0) < 1e-9
    assert shrink_needed(10.0, 2.0, 1.0, 4.0) == 1.0  # already 5x
    assert shrink_needed(10.0, 4.0, 1.0, 4.0) is None  # 9/3 = 3x even with it free


def test_pareto_scores_every_checkpoint_on_the_whole_test_set(tmp_path):
    """The Pareto table's accuracies come from all 10,000 test images, not the
    training run's own --test-limit sample."""
    import json

    import torch
    from mpcvit.bench import pareto
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.data import load_dataset
    from mpcvit.models.train import evaluate
    from mpcvit.models.vit import build_model

    (tmp_path / "ckpt").mkdir()
    torch.manual_seed(0)
    model = build_model("demo").eval()
    ckpt = tmp_path / "ckpt" / "m.pt"
    save_checkpoint(model, ckpt, extra={"test_acc": 0.5})
    # not evaluated yet: the training run's own score
    assert pareto.checkpoint_accuracy(ckpt) == 0.5
    pareto.evaluate_step(tmp_path)()
    res = json.loads((tmp_path / "eval" / "m.json").read_text())
    x, y = load_dataset("fashion-mnist").test.tensors()
    with torch.no_grad():
        _, want = evaluate(model, x, y)
    assert res == {"accuracy": want, "images": 10000}
    assert pareto.checkpoint_accuracy(ckpt) == want != 0.5


def test_pareto_models_run_under_their_own_protocol_plan(tmp_path):
    """A searched spec's plan (and the replanned softmax baseline's) travels from the spec
    file into the checkpoint, the measured party program and the prediction: the
    pipeline must not time an FSS-planned model under the default plan."""
    import argparse
    import io

    import torch
    from mpcvit.bench import pareto
    from mpcvit.models.checkpoint import load_checkpoint, save_checkpoint
    from mpcvit.models.plan import ModelPlan, arch_plan
    from mpcvit.models.vit import build_model

    args = argparse.Namespace(out=tmp_path, limit=100, test_limit=100, epochs=1,
                              batch_size=32, threads=1, search_limit=None, network="lan",
                              search_epochs=1, plus_network="loopback", teacher=None,
                              distill=False, images=1, wan_images=0)
    jobs, models = pareto.plan(args)
    assert list(models)[:2] == ["softmax", "softmax_wan"]
    replan = next(j for j in jobs if j.name == "replan_softmax_wan")
    assert replan.deps == ["train_softmax"] and replan.fn is not None
    torch.manual_seed(0)
    save_checkpoint(build_model("demo").eval(), tmp_path / "ckpt" / "softmax.pt",
                    extra={"test_acc": 0.25})
    replan.fn()
    model, extra = load_checkpoint(tmp_path / "ckpt" / "softmax_wan.pt")
    assert model.protocol == ModelPlan.of("wan") and extra == {"test_acc": 0.25}
    blob, plain = pareto._trained_models(models, tmp_path)
    entries = torch.load(io.BytesIO(blob), weights_only=True)
    assert ModelPlan.from_dict(entries["softmax_wan"][3]) == ModelPlan.of("wan")
    assert ModelPlan.from_dict(entries["softmax"][3]).is_default
    # the spec file the prediction reads carries the plan too
    assert arch_plan(str(models["softmax_wan"]["spec"])) == ModelPlan.of("wan")
    assert arch_plan(str(models["softmax"]["spec"])) is None


def test_pareto_report_shows_measured_wan_speed_ups(tmp_path):
    """Rows with a measurement on the emulated WAN get that column and its speed-up
    against the softmax ViT; the setup line says how the link was emulated."""
    import argparse

    from mpcvit.bench import pareto

    def row(name, acc, meas_s, wan_s):
        return {"name": name, "group": "baseline", "kinds": {"scale": 16}, "acc": acc,
                "acc_kd": None, "pred_rounds": 89, "pred_bytes": 1e7,
                "pred_compute_s": meas_s, "meas_rounds": 89, "meas_bytes": 1e7,
                "meas_s": meas_s, "meas_lan_s": meas_s, "meas_wan_s": wan_s,
                "wan_meas_s": wan_s, "wan_emulation": "namespaces + tbf + relays",
                "agree": "5/5"}

    rows = [row("softmax", 0.745, 0.367, 8.42), row("cheap", 0.745, 0.116, 2.5)]
    args = argparse.Namespace(limit=20000, test_limit=2000, epochs=5, search_epochs=2,
                              search_limit=10000, network="lan", teacher=None, images=20,
                              wan_images=5, plus_network="loopback", out=tmp_path,
                              batch_size=256, distill=False)
    md = pareto.markdown(rows, args)
    cheap = next(line for line in md.splitlines() if line.startswith("| cheap |"))
    assert "| 2.500 | 3.37x |" in cheap  # 8.42 / 2.5
    assert "| 3.16x |" in cheap  # loopback: 0.367 / 0.116
    assert "namespaces + tbf + relays" in md and "median of 5 test images" in md
    assert "(batch 256)" in md and "no distillation" in md
    pareto.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_soak_json_contract(capsys, tmp_path):
    """A small soak: the last line is one JSON object with the documented keys, and a
    short run of the real TLS service has no failure, no crossed session, every kill
    recovered and no unauthorized connection accepted."""
    assert main(["bench", "soak", "--requests", "3", "--clients", "2", "--per-client", "2",
                 "--party-kills", "1", "--dealer-kills", "1", "--workdir", str(tmp_path),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("requests", "failures", "mismatches", "crossed", "rss_growth_mb", "kills",
                "recovered", "max_error_s", "max_recover_s", "unauthorized_accepted"):
        assert key in res
    assert res["requests"] == 3 + 2 * 2
    assert res["failures"] == res["crossed"] == res["unauthorized_accepted"] == 0
    assert res["kills"] == res["recovered"] == 2
    assert res["hostile_unexpected"] == 0
    # the recovery splits into the restarted process's start-up and the service's rejoin
    assert 0 <= res["max_startup_s"] and 0 <= res["max_rejoin_s"] <= res["max_recover_s"]


def test_bench_network_json_reports_the_plan_it_ran(capsys):
    """`mpcvit bench network --protocol PLAN --json` keeps its figures' keys and names the
    plan; a named plan with FSS comparisons takes fewer rounds than the default."""
    from mpcvit.models.plan import NAMED

    rounds = {}
    for plan in ("default", "wan"):
        assert main(["bench", "network", "--model", "demo", "--arch", "relu_softmax+relu",
                     "--network", "1gbit,2ms", "--images", "1", "--protocol", plan,
                     "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["loopback"]["rounds"] == res["measured"]["rounds"] > 0
        assert res["measured"]["online_s"] > 0 and "predicted_online_s" in res
        assert res["plan"] == NAMED[plan].to_dict() and res["plan_describe"] == plan
        rounds[plan] = res["measured"]["rounds"]
    assert rounds["wan"] < rounds["default"]
