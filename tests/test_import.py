"""Published MPCViT / MPCViT+ checkpoints: the reference trainer's file formats, token masks
(spec, plaintext and, slow, under MPC with their cost), and `mpcvit import` end to end.

Files are built here from our model code in the reference layout
(``to_reference_state_dict``) and saved the way the reference trainer's timm
``CheckpointSaver`` saves them; the import is checked against an independent
re-implementation of the reference forward (``test_models._reference_forward``).
"""

from __future__ import annotations

import argparse
import collections
import json
import os

import numpy as np
import pytest
import torch
from mpcvit.commands import main
from mpcvit.models import ops
from mpcvit.models.checkpoint import CheckpointError, load_checkpoint
from mpcvit.models.configs import ViTConfig, get_config
from mpcvit.models.reference import (
    ReferenceImportError,
    import_reference,
    load_reference_checkpoint,
    read_reference_file,
    reference_forward,
    to_reference_state_dict,
)
from mpcvit.models.spec import ArchSpec, AttentionKind, LayerSpec
from mpcvit.models.vit import ViT
from test_models import _reference_forward

# CCT ViT-Lite, 17 tokens; the reference's ReLU-softmax eps
CFG = ViTConfig(image_size=16, in_chans=3, patch=4, dim=32, depth=3, heads=4, num_classes=10,
                block="cct", attn_eps=1e-5)
RS, SC = AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE
PLUS = ArchSpec((
    LayerSpec((RS, SC, SC, RS), "gelu", (0, 2, 3, 7, 8, 11, 16)),  # mixed beta
    LayerSpec((SC, SC, RS, SC), "gelu", ()),  # layer-wise linearised: beta all 0
    LayerSpec((RS, RS, SC, SC), "gelu"),  # beta all 1: plain GeLU
))


def _trained_like(model: ViT, seed: int = 0) -> ViT:
    """Trained-like scales (a fresh init leaves every non-linearity near 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name and "token" not in name:
                p.mul_(4.0)
    return model.eval()


def _plus_model(spec: ArchSpec = PLUS, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return _trained_like(ViT(CFG, spec), seed)


def _reference_sd(model: ViT) -> dict[str, torch.Tensor]:
    """The reference layout; beta (1, N, 1) in every layer, as --linear-gelu saves it."""
    sd = to_reference_state_dict(model)
    for i in range(CFG.depth):
        sd.setdefault(f"classifier.blocks.{i}.beta", torch.ones(1, CFG.num_tokens, 1))
    return sd


def _trainer_blob(sd: dict[str, torch.Tensor], ema: dict | None = None) -> dict:
    """What timm's CheckpointSaver writes for the reference trainer: the state dict of a
    DataParallel model, the EMA weights, AdamW's state, the amp scaler, the metric and
    the command line as an argparse.Namespace."""
    param = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([param], lr=5.5e-4, weight_decay=0.06)
    param.grad = torch.randn(4)
    opt.step()
    args = argparse.Namespace(model="vit_lite_test", dataset="cifar10", num_classes=10,
                              img_size=16, mean=[0.4914, 0.4822, 0.4465],
                              std=[0.2470, 0.2435, 0.2616], linear_gelu=True, rs_ratio=0.5,
                              opt_betas=None, lr=5.5e-4, epochs=600, device="cuda:0")
    return {
        "epoch": 599, "arch": "vit_lite_test", "version": 2, "args": args,
        "state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
        "optimizer": opt.state_dict(),
        "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 7},
        "state_dict_ema": collections.OrderedDict((ema or sd).items()),
        "metric": np.float64(93.21),
    }


# ----------------------------------------------------------------------------- formats


def test_trainer_checkpoint_with_args_imports_exactly(tmp_path):
    model = _plus_model()
    sd = _reference_sd(model)
    path = tmp_path / "model_best.pth.tar"
    torch.save(_trainer_blob(sd), path)
    # torch's plain weights-only load refuses the Namespace: the reported failure
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    imported = load_reference_checkpoint(path)
    assert imported.spec == model.spec
    assert imported.config == CFG.replace(name="vit_lite_test")
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(imported(x), model(x))
        # the independent reference forward, in float64: equal to rounding
        sd64 = {k: v.double() for k, v in sd.items()}
        want = _reference_forward(sd64, x.double(), CFG.depth, CFG.heads)
        torch.testing.assert_close(imported.double()(x.double()), want, rtol=0, atol=1e-9)
        # float32, as users run it: rounding only
        err = (import_reference(sd)(x) - _reference_forward(sd, x, CFG.depth, CFG.heads))
        assert err.abs().max() < 1e-6 * (1 + want.abs().max())
        # the library's own cross-check agrees with the test's
        torch.testing.assert_close(reference_forward(sd64, x.double()), want, rtol=0, atol=1e-9)


def test_timm_and_plain_layouts_import_the_same_model(tmp_path):
    model = _plus_model(seed=1)
    sd = _reference_sd(model)
    ema_model = _plus_model(seed=2)
    ema = _reference_sd(ema_model)
    blobs = {
        "plain": collections.OrderedDict(sd),
        "module_prefix": {"module." + k: v for k, v in sd.items()},
        "model_key": {"model": sd, "epoch": 3},
        "state_dict_key": {"state_dict": sd},
        "trainer": _trainer_blob(sd, ema=ema),
    }
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        for name, blob in blobs.items():
            torch.save(blob, tmp_path / f"{name}.pth")
            got = load_reference_checkpoint(tmp_path / f"{name}.pth")
            assert torch.equal(got(x), want), name
        ema_got = load_reference_checkpoint(tmp_path / "trainer.pth", ema=True)
        assert torch.equal(ema_got(x), ema_model(x))
    with pytest.raises(ReferenceImportError, match="state_dict_ema"):
        load_reference_checkpoint(tmp_path / "plain.pth", ema=True)
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "empty.pth")
    with pytest.raises(ReferenceImportError, match="no weights found"):
        load_reference_checkpoint(tmp_path / "empty.pth")


def test_softmax_teacher_without_alphas_imports():
    demo = get_config("demo").replace(block="cct", attn_eps=1e-5)
    torch.manual_seed(5)
    teacher = _trained_like(ViT(demo))  # all-softmax, GeLU: no alphas, no betas
    sd = to_reference_state_dict(teacher)
    assert not any(k.endswith(".alpha") for k in sd)
    got = import_reference(sd)  # the head count of the named config of this shape
    assert got.config.name == "demo" and got.spec == teacher.spec
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(got(x), teacher(x))
        torch.testing.assert_close(reference_forward(sd, x, heads=4), teacher(x), rtol=1e-5,
                                   atol=1e-5)
    odd = to_reference_state_dict(_plus_model(ArchSpec.uniform(3, 4, "softmax")))
    with pytest.raises(ReferenceImportError, match="give the head count"):
        import_reference(odd)
    assert import_reference(odd, heads=4).config.heads == 4


class CustomThing:
    """Any class of the saving program: the reference trainer saves none."""

    def __init__(self) -> None:
        self.value = 3


class RunsCommand:
    """A pickle that runs a shell command when loaded (``__reduce__``)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_globals_are_refused_before_they_run(tmp_path):
    sd = _reference_sd(_plus_model())
    blob = _trainer_blob(sd)
    blob["extra"] = CustomThing()
    torch.save(blob, tmp_path / "custom.pth")
    with pytest.raises(ReferenceImportError, match="refusing to unpickle .*CustomThing"):
        read_reference_file(tmp_path / "custom.pth")
    marker = tmp_path / "ran"
    blob = _trainer_blob(sd)
    blob["args"] = RunsCommand(str(marker))
    torch.save(blob, tmp_path / "evil.pth")
    with pytest.raises(ReferenceImportError, match="refusing to unpickle .*system"):
        read_reference_file(tmp_path / "evil.pth")
    assert not marker.exists()
    # a corrupt file is reported as such, not as a refused global
    (tmp_path / "junk.pth").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ReferenceImportError, match="not a torch checkpoint|cannot read"):
        read_reference_file(tmp_path / "junk.pth")


# ----------------------------------------------------------------------------- token masks


def test_betas_become_token_masks():
    model = _plus_model()
    sd = _reference_sd(model)
    spec = import_reference(sd).spec
    assert spec.layers[0].token_mask == (0, 2, 3, 7, 8, 11, 16)
    assert spec.layers[1].token_mask == ()
    assert spec.layers[2].token_mask is None  # all-ones beta is plain GeLU
    assert [layer.attention for layer in spec.layers] == [
        layer.attention for layer in PLUS.layers]
    # the all-ones beta changes nothing: the same weights without it give equal logits
    plain = dict(sd)
    del plain["classifier.blocks.2.beta"]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(import_reference(plain)(x), model(x))


def test_masked_tokens_skip_the_activation(monkeypatch):
    """GeLU sees the selected tokens' rows only; the others get relu(fc2(fc1 x))."""
    model = _plus_model()
    mlp = model.blocks[0].mlp
    seen = []
    gelu = ops.ACTIVATION_FNS["gelu"]
    monkeypatch.setitem(ops.ACTIVATION_FNS, "gelu",
                        lambda h, **kw: seen.append(h.shape) or gelu(h, **kw))
    x = torch.randn(2, CFG.num_tokens, CFG.dim)
    with torch.no_grad():
        y = mlp(x)
        h = mlp.fc1(x)
        full_gelu = mlp.fc2(torch.nn.functional.gelu(h))
        linear = torch.relu(mlp.fc2(h))
    assert seen == [(2, 7, CFG.mlp_hidden)]
    chosen = list(PLUS.layers[0].token_mask)
    rest = [t for t in range(CFG.num_tokens) if t not in chosen]
    torch.testing.assert_close(y[:, chosen], full_gelu[:, chosen], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[:, rest], linear[:, rest], rtol=0, atol=1e-6)


def test_spec_token_mask_serialisation_is_backward_compatible():
    old = {"version": 1, "layers": [{"attention": ["scale", "relu_softmax"],
                                     "activation": "gelu"}]}
    spec = ArchSpec.from_dict(old)
    assert spec.layers[0].token_mask is None
    assert spec.to_dict() == old  # unmasked specs are written exactly as before
    assert ArchSpec.from_yaml(PLUS.to_yaml()) == PLUS
    assert PLUS.to_dict()["layers"][1]["token_mask"] == []
    assert PLUS.summary()["token_masked_layers"] == 2
    bad = [((3, 1), "increasing"), ((1, 1), "increasing"), ((-1,), "non-negative"),
           ("0,1", "list of token indices"), ((True,), "non-negative")]
    for mask, match in bad:
        with pytest.raises(ValueError, match=match):
            LayerSpec(("scale",), "gelu", mask)
    for act in ("identity", "relu_nobias"):
        with pytest.raises(ValueError, match="token mask needs"):
            LayerSpec(("scale",), act, (0,))
    with pytest.raises(ValueError, match="names token 17"):
        ArchSpec((LayerSpec(("scale",) * 4, "gelu", (17,)),) * 3).validate(3, 4, tokens=17)
    with pytest.raises(ValueError, match="names token 17"):
        ViT(CFG, ArchSpec((LayerSpec(("scale",) * 4, "gelu", (17,)),) * 3))


def test_set_spec_switches_token_masks():
    model = _plus_model()
    x = torch.randn(2, 3, 16, 16)
    plain = ArchSpec(tuple(LayerSpec(layer.attention, "gelu") for layer in PLUS.layers))
    with torch.no_grad():
        masked = model(x)
        model.set_spec(plain)
        unmasked = model(x)
        model.set_spec(PLUS)
        assert torch.equal(model(x), masked)
    assert not torch.allclose(masked, unmasked)


# ----------------------------------------------------------------------------- CLI


def _trainer_file(tmp_path, seed: int = 0):
    model = _plus_model(seed=seed)
    path = tmp_path / "mpcvit_plus.pth.tar"
    torch.save(_trainer_blob(_reference_sd(model)), path)
    return model, path


def test_import_cli_then_eval(tmp_path, capsys):
    model, ref = _trainer_file(tmp_path)
    out = tmp_path / "model.pt"
    assert main(["import", "--reference", str(ref), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-5 * (1 + report["max_abs_logit"])
    assert "self-check" in captured.err and "MPCViT+ token masks" in captured.err
    loaded, extra = load_checkpoint(out)
    assert loaded.spec == PLUS and loaded.config.attn_eps == 1e-5
    assert extra["normalization"]["mean"] == [0.4914, 0.4822, 0.4465]
    assert extra["dataset"] == "cifar10"
    assert extra["imported_from"]["args"]["linear_gelu"] is True
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert main(["eval", "--model", str(out), "--data", "synthetic:size=16,channels=3",
                 "--limit", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 8
    # --attn-eps overrides the reference's eps (and says the difference is that choice)
    assert main(["import", "--reference", str(ref), "--out", str(out),
                 "--attn-eps", "0.00390625"]) == 0
    assert "instead of the reference's" in capsys.readouterr().out
    assert load_checkpoint(out)[0].config.attn_eps == 2.0**-8


def test_eval_on_a_reference_file_says_how_to_import_it(tmp_path, capsys):
    _, ref = _trainer_file(tmp_path)
    assert main(["eval", "--model", str(ref), "--data", "synthetic:size=16,channels=3",
                 "--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert f"run `mpcvit import --reference {ref} --out model.pt`" in err
    # a plain reference state dict too (it loads, but has no format tag)
    plain = tmp_path / "plain.pth"
    torch.save(_reference_sd(_plus_model()), plain)
    with pytest.raises(CheckpointError, match="looks like a reference MPCViT checkpoint"):
        load_checkpoint(plain)


def test_import_cli_refuses_a_foreign_pickle(tmp_path, capsys):
    blob = _trainer_blob(_reference_sd(_plus_model()))
    blob["args"] = RunsCommand(str(tmp_path / "ran"))
    torch.save(blob, tmp_path / "evil.pth")
    assert main(["import", "--reference", str(tmp_path / "evil.pth"),
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "refusing to unpickle" in capsys.readouterr().err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "m.pt").exists()


# ----------------------------------------------------------------------------- secure (slow)


def _secure_party(cfg_d: dict, spec_d: dict, sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Party program: the imported model under MPC on a batch; party 1 builds only the
    public structure and never receives the weights' plaintext."""
    from mpcvit.models.secure import SecureViT, reveal_float
    from mpcvit.mpc.compat import import_crypten

    crypten = import_crypten()
    rank = crypten.communicator.get().get_rank()
    cfg, spec = ViTConfig.from_dict(cfg_d), ArchSpec.from_dict(spec_d)
    model = import_reference(sd) if rank == 0 else None
    secure = SecureViT.from_model(model, cfg, spec)
    data = x if rank == 1 else torch.zeros_like(x)
    return reveal_float(secure(crypten.cryptensor(data, src=1)))


@pytest.mark.slow
def test_imported_mpcvit_plus_runs_securely_in_batches():
    from mpcvit.mpc.launcher import run_parties

    model = _plus_model(seed=3)
    sd = _reference_sd(model)
    x = torch.randn(4, 3, 16, 16)
    public = import_reference(sd).config  # what party 0 publishes to party 1
    res = run_parties(_secure_party, public.to_dict(), PLUS.to_dict(), sd, x, provider="dealer")
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(res[0], res[1])
    err = (res[0] - want).abs().max().item()
    assert err <= 2e-3 + 2e-3 * want.abs().max().item(), err
    assert torch.equal(res[0].argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_token_masks_cost_less_than_gelu_on_every_token():
    """CrypTen's counts (deterministic): a mixed mask sends fewer bytes than GeLU on every
    token (it pays one ReLU's rounds after fc2); a layer-wise linearised model saves
    rounds and bytes."""
    from mpcvit.models.profiler import measure_secure_model

    model = _plus_model(seed=4)
    state = model.state_dict()
    x = torch.randn(2, 3, 16, 16)
    heads = [layer.attention for layer in PLUS.layers]
    full = ArchSpec(tuple(LayerSpec(h, "gelu") for h in heads))
    half = ArchSpec(tuple(LayerSpec(h, "gelu", tuple(range(0, CFG.num_tokens, 2)))
                          for h in heads))
    linear = ArchSpec(tuple(LayerSpec(h, "gelu", ()) for h in heads))
    runs = {name: measure_secure_model(CFG, spec, x, state, provider="dealer")
            for name, spec in (("full", full), ("half", half), ("linear", linear),
                               ("plus", PLUS))}
    for name, spec in (("half", half), ("linear", linear), ("plus", PLUS)):
        model.set_spec(spec)
        with torch.no_grad():
            assert torch.equal(runs[name].logits.argmax(-1), model(x).argmax(-1)), name
    assert runs["half"].bytes < runs["full"].bytes
    assert runs["plus"].bytes < runs["full"].bytes
    assert runs["linear"].bytes < runs["half"].bytes
    assert runs["linear"].rounds < runs["full"].rounds


@pytest.mark.slow
def test_trained_mpcvit_plus_agrees_securely_on_real_images(tmp_path, capsys):
    """A demo-shaped MPCViT+ trained briefly on Fashion-MNIST, saved as the reference
    trainer saves it, imported, then served by the real 2-party service (dealer, gRPC)."""
    from mpcvit.bench.published import train_demo_plus

    _, ref = train_demo_plus(tmp_path, epochs=2, train_limit=3000, batch_size=64,
                             warmup_epochs=0.3, augment=False)
    out = tmp_path / "plus.pt"
    assert main(["import", "--reference", str(ref), "--out", str(out)]) == 0
    model, extra = load_checkpoint(out)
    assert extra["dataset"] == "fashion-mnist"
    assert sum(layer.token_mask is not None for layer in model.spec.layers) == 4
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", "fashion-mnist", "--limit", "500",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] > 0.4
    assert main(["eval", "--model", str(out), "--data", "fashion-mnist", "--secure",
                 "--limit", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["images"] == 6 and res["agreement"] == 1.0
    assert res["max_abs_err"] < 0.05
