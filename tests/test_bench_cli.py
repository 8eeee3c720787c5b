"""Benchmark commands' output contracts (speed is reported, never asserted)."""

from __future__ import annotations

import json

import pytest
from mpcvit.party.cli import main

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
    assert pareto._acc(ckpt) == 0.5  # not evaluated yet: the training run's own score
    pareto.evaluate_step(tmp_path)()
    res = json.loads((tmp_path / "eval" / "m.json").read_text())
    x, y = load_dataset("fashion-mnist").test.tensors()
    with torch.no_grad():
        _, want = evaluate(model, x, y)
    assert res == {"accuracy": want, "images": 10000}
    assert pareto._acc(ckpt) == want != 0.5
