"""Training loop: schedule, augmentation, learning, resume, distillation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from mpcvit.models.configs import ViTConfig
from mpcvit.models.data import limit_bundle, load_synthetic
from mpcvit.models.spec import ArchSpec
from mpcvit.models.train import (
    EpochStats,
    TrainConfig,
    augment_batch,
    distillation_loss,
    evaluate,
    feature_module,
    train,
    warmup_cosine,
)
from mpcvit.models.vit import build_model

TINY = ViTConfig(image_size=16, in_chans=1, patch=4, dim=16, depth=1, heads=2, num_classes=4)
# Three short epochs on the default synthetic set (1024 images, 4 classes): under a second.
FAST = TrainConfig(epochs=3, batch_size=32, lr=5e-3, warmup_epochs=0.5, threads=1)


def tiny_model(attention: str = "softmax", activation: str = "gelu", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY, ArchSpec.uniform(TINY.depth, TINY.heads, attention, activation))


def test_warmup_then_cosine():
    total, warm = 100, 10
    lrs = [warmup_cosine(s, total, warm, 0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))  # rising warm-up
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # cosine decay
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)
    assert warmup_cosine(0, 10, 0, 0.0) == pytest.approx(1.0)


def test_augment_crop_shifts_content_and_fills_black():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    same = augment_batch(x, 0, False, torch.tensor([-9.0]), gen)
    assert torch.equal(same, x)
    for _ in range(5):
        out = augment_batch(x, 1, False, torch.tensor([-9.0]), gen)
        assert out.shape == x.shape
        for img, src in zip(out, x, strict=True):
            inside = img[img != -9.0]
            # every kept pixel comes from the source image, in a shifted 3x3 window at least
            assert inside.numel() >= 9 and set(inside.tolist()) <= set(src.flatten().tolist())
    flipped = [augment_batch(x, 0, True, torch.tensor([0.0]), gen) for _ in range(20)]
    assert any(torch.equal(f[0], x[0].flip(-1)) for f in flipped)
    assert any(torch.equal(f[0], x[0]) for f in flipped)


def test_short_training_lowers_loss_and_beats_chance():
    data = load_synthetic()
    model = tiny_model()
    x, y = data.test.tensors()
    loss0, _ = evaluate(model, x, y)
    seen: list[EpochStats] = []
    result = train(model, data, FAST, progress=seen.append)
    assert [s.epoch for s in seen] == [1, 2, 3] and result.history == seen
    assert seen[-1].test_loss < loss0
    assert seen[-1].test_acc > 0.6  # 4 classes: chance is 0.25
    assert "epoch 3/3" in seen[-1].line()


def test_relu_softmax_model_trains_with_warmup():
    data = load_synthetic()
    model = tiny_model("relu_softmax", "relu")
    result = train(model, data, FAST, progress=None)
    assert result.final.test_acc > 0.6
    assert all(math.isfinite(s.loss) for s in result.history)


class _Stop(Exception):
    pass


def test_resume_continues_from_saved_epoch(tmp_path):
    data = limit_bundle(load_synthetic(), 256, 64)
    cfg = FAST
    unbroken = tiny_model()
    train(unbroken, data, cfg, progress=None)

    state = tmp_path / "run.state"

    def stop_after_first(stats: EpochStats) -> None:
        if stats.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):
        train(tiny_model(), data, cfg, state_path=state, progress=stop_after_first)
    assert state.is_file()

    resumed = tiny_model(seed=123)  # different init: the state must overwrite it
    seen: list[EpochStats] = []
    result = train(resumed, data, cfg, state_path=state, resume=True, progress=seen.append)
    assert result.start_epoch == 1
    assert [s.epoch for s in seen] == [2, 3]
    assert [s.epoch for s in result.history] == [1, 2, 3]
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    again = train(resumed, data, cfg, state_path=state, resume=True, progress=None)
    assert again.start_epoch == 3 and len(again.history) == 3  # nothing left to do
    other = build_model(TINY.replace(dim=32), ArchSpec.uniform(1, 2))
    with pytest.raises(ValueError, match="cannot resume"):
        train(other, data, cfg, state_path=state, resume=True, progress=None)


def test_distillation_loss_terms():
    cfg = TrainConfig(kd_temperature=2.0, label_smoothing=0.0)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    feats = torch.randn(2, 5)
    total, terms = distillation_loss(logits, labels, logits.clone(), feats, feats.clone(), cfg)
    assert terms["soft"] == pytest.approx(0.0, abs=1e-6)
    assert terms["feature"] == pytest.approx(0.0, abs=1e-6)
    assert total.item() == pytest.approx(terms["hard"], rel=1e-6)
    total2, terms2 = distillation_loss(logits, labels, -logits, feats, feats + 1.0, cfg)
    assert terms2["soft"] > 0.1 and terms2["feature"] == pytest.approx(1.0, rel=1e-5)
    assert total2.item() == pytest.approx(sum(terms2.values()), rel=1e-5)


def test_feature_module_is_final_norm():
    model = tiny_model()
    assert feature_module(model) is model.norm
    assert feature_module(model, "blocks.0.norm1") is model.blocks[0].norm1


def test_distillation_from_softmax_teacher_reduces_kd_terms():
    data = load_synthetic()
    teacher = tiny_model(seed=1)
    train(teacher, data, FAST, progress=None)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_model("relu_softmax", "relu", seed=2)
    cfg = replace(FAST, kd_temperature=2.0)
    result = train(student, data, cfg, teacher=teacher, progress=None)
    first, last = result.history[0].terms, result.history[-1].terms
    assert set(first) == {"hard", "soft", "feature"}
    assert last["soft"] < first["soft"] and last["feature"] < first["feature"]
    assert result.final.test_acc > 0.6
    for k, v in teacher.state_dict().items():  # the teacher is never updated
        assert torch.equal(v, frozen[k]), k
    assert not any(m._forward_hooks for m in student.modules())  # taps removed


# ----------------------------------------------------------------------------- CLI

TINY_DATA = "synthetic:size=28,classes=10,train=200,test=100"


def cli(*args: str) -> int:
    from mpcvit.commands import main

    return main(["train", "--model", "demo", "--data", TINY_DATA, "--batch-size", "50",
                 "--threads", "1", *args])  # fmt: skip


def test_cli_train_end_to_end_resume_and_teacher(tmp_path, capsys):
    from mpcvit.models.checkpoint import load_checkpoint

    out = tmp_path / "m.pt"
    assert cli("--out", str(out), "--epochs", "1", "--arch", "relu_softmax+relu") == 0
    text = capsys.readouterr().out
    assert "epoch 1/1" in text and f"saved {out}" in text
    model, extra = load_checkpoint(out)
    assert model.spec.summary() == {"relu_softmax": 16, "relu": 4}
    assert extra["dataset"] == "synthetic" and 0.0 <= extra["test_acc"] <= 1.0
    assert extra["train_images"] == 200 and extra["train_options"]["epochs"] == 1
    assert (tmp_path / "m.pt.state").is_file()

    assert cli("--out", str(out), "--epochs", "2", "--arch", "relu_softmax+relu", "--resume") == 0
    text = capsys.readouterr().out
    assert "resuming from" in text and "epoch 2/2" in text and "epoch 1/2" not in text

    spec_file = tmp_path / "arch.yaml"
    spec_file.write_text(ArchSpec.mix(4, 4, activation="relu").to_yaml())
    student = tmp_path / "s.pt"
    args = ("--out", str(student), "--epochs", "1", "--arch", str(spec_file), "--teacher", str(out))
    assert cli(*args) == 0
    text = capsys.readouterr().out
    assert "soft=" in text and "feature=" in text
    model, _ = load_checkpoint(student)
    assert model.spec.summary() == {"relu_softmax": 8, "scale": 8, "relu": 4}


def test_cli_train_reports_bad_inputs(tmp_path, capsys):
    out = str(tmp_path / "m.pt")
    from mpcvit.commands import main

    assert main(["train", "--model", "demo", "--data", str(tmp_path / "none"), "--out", out]) == 2
    assert "unknown dataset" in capsys.readouterr().err
    rc = main(["train", "--model", "demo", "--data", "synthetic", "--out", out])  # 16x16 images
    assert rc == 2 and "expects 1x28x28" in capsys.readouterr().err
    assert cli("--out", out, "--arch", "bogus") == 2
    assert "bogus" in capsys.readouterr().err


def test_shipped_demo_checkpoint_classifies_real_fashion_mnist():
    from pathlib import Path

    import mpcvit.models as models_pkg
    from mpcvit.models.checkpoint import load_checkpoint
    from mpcvit.models.data import load_fashion_mnist

    model, extra = load_checkpoint(Path(models_pkg.__file__).parent / "assets" / "demo.pt")
    assert model.config.name == "demo" and extra["dataset"] == "fashion-mnist"
    assert extra["test_acc"] >= 0.85
    test = limit_bundle(load_fashion_mnist(), 1, 2000).test
    _, acc = evaluate(model, *test.tensors())
    assert acc > 0.8
