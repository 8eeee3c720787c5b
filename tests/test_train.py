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
    cpu_has_native_bf16,
    distillation_loss,
    evaluate,
    feature_module,
    load_state,
    make_optimizer,
    resolve_device,
    resolve_precision,
    save_state,
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
        assert torch.equal(a, b), name  # bit for bit: same batches, same optimizer moments
    again = train(resumed, data, cfg, state_path=state, resume=True, progress=None)
    assert again.start_epoch == 3 and len(again.history) == 3  # nothing left to do
    other = build_model(TINY.replace(dim=32), ArchSpec.uniform(1, 2))
    with pytest.raises(ValueError, match="cannot resume"):
        train(other, data, cfg, state_path=state, resume=True, progress=None)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resumed_run_equals_unbroken_run_exactly(tmp_path, precision):
    """Model, optimizer moments, schedule, random streams and epoch all come back: two
    sittings of 2 + 2 epochs give the very weights, Adam state and history of one run of 4."""
    data = limit_bundle(load_synthetic(), 192, 64)
    cfg = replace(FAST, epochs=4, precision=precision)
    unbroken = tiny_model()
    full = train(unbroken, data, cfg, state_path=tmp_path / "a.state", progress=None)

    state = tmp_path / "b.state"

    def stop_after_second(stats: EpochStats) -> None:
        if stats.epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(tiny_model(), data, cfg, state_path=state, progress=stop_after_second)
    resumed = tiny_model(seed=7)
    second = train(resumed, data, cfg, state_path=state, resume=True, progress=None)
    assert second.start_epoch == 2
    for (name, a), b in zip(unbroken.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        assert torch.equal(a, b), name
    a_opt, b_opt = load_state(tmp_path / "a.state"), load_state(state)
    assert a_opt["scheduler"] == b_opt["scheduler"] and a_opt["epoch"] == b_opt["epoch"] == 4
    for pa, pb in zip(a_opt["optimizer"]["state"].values(), b_opt["optimizer"]["state"].values(),
                      strict=True):  # fmt: skip
        assert all(torch.equal(pa[k], pb[k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    same = ("epoch", "loss", "train_acc", "test_loss", "test_acc", "lr")
    for h1, h2 in zip(full.history, second.history, strict=True):
        assert all(getattr(h1, k) == getattr(h2, k) for k in same)


def test_resume_refuses_changed_recipe_but_allows_more_epochs(tmp_path):
    data = limit_bundle(load_synthetic(), 128, 32)
    state = tmp_path / "run.state"
    cfg = replace(FAST, epochs=1)
    train(tiny_model(), data, cfg, state_path=state, progress=None)
    with pytest.raises(ValueError, match="batch_size=32 \\(now 64\\)"):
        train(tiny_model(), data, replace(cfg, batch_size=64), state_path=state, resume=True,
              progress=None)  # fmt: skip
    more = train(tiny_model(), data, replace(cfg, epochs=2, precision="fp32"), state_path=state,
                 resume=True, progress=None)  # fmt: skip
    assert more.start_epoch == 1 and [h.epoch for h in more.history] == [1, 2]


def test_state_files_without_progress_timing_still_resume(tmp_path):
    """History entries written before ``elapsed``/``eta`` existed load with zeros."""
    data = limit_bundle(load_synthetic(), 128, 32)
    state = tmp_path / "run.state"
    train(tiny_model(), data, replace(FAST, epochs=1), state_path=state, progress=None)
    st = load_state(state)
    for h in st["history"]:
        del h["elapsed"], h["eta"]
    save_state(state, st)
    result = train(tiny_model(), data, replace(FAST, epochs=2), state_path=state, resume=True,
                   progress=None)  # fmt: skip
    assert result.history[0].elapsed == 0.0 and result.history[1].elapsed > 0.0


def test_progress_line_has_elapsed_and_eta():
    data = limit_bundle(load_synthetic(), 128, 32)
    seen: list[EpochStats] = []
    train(tiny_model(), data, replace(FAST, epochs=2), progress=seen.append)
    assert 0 < seen[0].elapsed < seen[1].elapsed
    assert seen[0].eta > 0 and seen[1].eta == 0.0
    assert "elapsed=0:00:" in seen[1].line() and "eta=0:00:00" in seen[1].line()
    assert EpochStats(1, 9, 0, 0, 0, 0, 1.0, 1e-3, elapsed=3725, eta=59.6).line().endswith(
        "elapsed=1:02:05 eta=0:01:00")


# ----------------------------------------------------------------------------- speed options


def test_device_flag_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unsupported device"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            resolve_device("cuda")
        with pytest.raises(ValueError, match="no CUDA GPU is available"):
            train(tiny_model(), load_synthetic(), replace(FAST, device="cuda"), progress=None)


def test_cpu_path_trains_and_leaves_model_on_cpu():
    data = limit_bundle(load_synthetic(), 256, 64)
    model = tiny_model()
    result = train(model, data, replace(FAST, device="cpu", precision="fp32"), progress=None)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert result.final.test_acc > 0.5


def test_native_bf16_detection_reads_cpu_flags(tmp_path):
    zen4 = tmp_path / "zen4"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512vl\n")
    old = tmp_path / "old"
    old.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_has_native_bf16(zen4) and not cpu_has_native_bf16(old)
    assert not cpu_has_native_bf16(tmp_path / "missing")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_precision_sets_matmul_dtype_and_trains(precision):
    """bf16 autocast really runs the layers in bf16 (the weights stay fp32), the loss is
    finite and falls, and the model learns like the fp32 one."""
    data = load_synthetic()
    model = tiny_model()
    dtypes: set[torch.dtype] = set()
    hook = model.head.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    result = train(model, data, replace(FAST, precision=precision), progress=None)
    hook.remove()
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert want in dtypes  # training forwards
    assert torch.float32 in dtypes  # evaluation is always fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = [s.loss for s in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.final.test_acc > 0.6


def test_fused_optimizer_matches_loop_optimizer():
    """The fused AdamW kernel takes the same steps as the per-tensor loop."""
    data = limit_bundle(load_synthetic(), 128, 32)
    a, b = tiny_model(), tiny_model()
    cfg = replace(FAST, epochs=1, precision="fp32")
    opt, _ = make_optimizer(a, cfg, 4)
    assert opt.defaults["fused"] is True
    train(a, data, cfg, progress=None)
    train(b, data, replace(cfg, fused_optimizer=False), progress=None)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_forward_trains_like_eager():
    data = limit_bundle(load_synthetic(), 256, 64)
    cfg = replace(FAST, epochs=2, precision="fp32")
    eager, compiled = tiny_model(), tiny_model()
    r1 = train(eager, data, cfg, progress=None)
    r2 = train(compiled, data, replace(cfg, compile=True), progress=None)
    assert abs(r1.final.loss - r2.final.loss) < 1e-3
    for (name, pa), pb in zip(eager.state_dict().items(), compiled.state_dict().values(),
                              strict=True):  # fmt: skip
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)


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


def test_cli_train_device_flag(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert cli("--out", str(out), "--epochs", "1", "--device", "cpu", "--precision", "fp32") == 0
    assert "cpu fp32" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli("--out", str(out), "--device", "cuda") == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "no CUDA GPU" in err and "Traceback" not in err


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
    assert extra["test_acc"] >= 0.905
    # all 10,000 test images: the figure models/assets/README.md states, recomputed
    _, acc = evaluate(model, *load_fashion_mnist().test.tensors())
    assert acc == pytest.approx(extra["test_acc"], abs=1e-4) and acc >= 0.905


def test_shipped_teacher_is_the_softmax_vit_the_readme_states():
    from mpcvit.models.checkpoint import load_checkpoint, resolve_checkpoint
    from mpcvit.models.data import load_fashion_mnist

    model, extra = load_checkpoint(resolve_checkpoint("teacher"))
    assert model.config.name == "demo" and extra["dataset"] == "fashion-mnist"
    assert model.spec.summary() == {"softmax": 16, "gelu": 4}
    _, acc = evaluate(model, *load_fashion_mnist().test.tensors())
    assert acc == pytest.approx(extra["test_acc"], abs=1e-4) and acc >= 0.895
