"""Plaintext model tests: configs, specs, grouped heads, checkpoints, reference import."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mpcvit.models import ops
from mpcvit.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from mpcvit.models.configs import CONFIGS, ViTConfig, get_config
from mpcvit.models.reference import ReferenceImportError, import_reference
from mpcvit.models.spec import ActivationKind, ArchSpec, AttentionKind, LayerSpec, NormKind
from mpcvit.models.vit import Attention, BatchNorm, ViT, build_model
from mpcvit.mpc.protocols.functions import gelu_poly_plain

TINY = ViTConfig(image_size=8, in_chans=2, patch=2, dim=16, depth=2, heads=4, num_classes=5)


def _scaled(model: ViT, gain: float = 8.0, seed: int = 0) -> ViT:
    """Trained-like weight scales: init std 0.02 leaves attention scores ~1e-3, which
    would hide errors in every non-linearity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "token" not in name:
                p.mul_(gain)
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------- configs


def test_named_configs_have_the_published_shapes():
    v7, v9, demo = CONFIGS["vit_7_4_32"], CONFIGS["vit_9_12_64"], CONFIGS["demo"]
    assert (v7.depth, v7.dim, v7.heads, v7.num_tokens, v7.num_classes) == (7, 256, 4, 65, 10)
    assert (v9.depth, v9.dim, v9.heads, v9.head_dim, v9.num_tokens, v9.num_classes) == (
        9, 192, 12, 16, 257, 200)
    assert (demo.in_chans, demo.image_size, demo.num_tokens) == (1, 28, 50)
    assert v7.mlp_hidden == 512
    assert ViTConfig.from_dict(v7.to_dict()) == v7


def test_config_validation_errors():
    with pytest.raises(ValueError, match="divisible by patch"):
        TINY.replace(image_size=9)
    with pytest.raises(ValueError, match="divisible by heads"):
        TINY.replace(heads=3)
    with pytest.raises(ValueError, match="block"):
        TINY.replace(block="post")
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        ViTConfig.from_dict({**TINY.to_dict(), "bogus": 1})
    with pytest.raises(KeyError, match="known"):
        get_config("vit_nope")


def test_vit_7_4_32_matches_reference_parameter_count():
    # CCT's ViT-Lite 7/4 has ~3.7M parameters; ours adds the qkv bias in prenorm style.
    m = build_model(CONFIGS["vit_7_4_32"].replace(block="cct"))
    n = sum(p.numel() for p in m.parameters())
    assert 3_700_000 < n < 3_730_000


# ----------------------------------------------------------------------------- spec


def test_spec_yaml_round_trip_and_helpers():
    spec = ArchSpec.mix(3, 4, kinds=("relu_softmax", "scale"), activation="relu")
    rs, sc = AttentionKind.RELU_SOFTMAX, AttentionKind.SCALE
    assert spec.layers[0].attention == (rs, rs, sc, sc)
    assert spec.summary() == {"relu_softmax": 6, "scale": 6, "relu": 3}
    text = spec.to_yaml()
    assert "version: 1" in text
    assert ArchSpec.from_yaml(text) == spec
    mixed = ArchSpec((LayerSpec(("scale", "softmax", "quad2", "scale"), "quad"),
                      LayerSpec(("softmax",) * 4, "identity")))
    assert ArchSpec.from_yaml(mixed.to_yaml()) == mixed
    u = ArchSpec.uniform(2, 3, "scale", "gelu")
    assert all(layer.attention == (AttentionKind.SCALE,) * 3 for layer in u.layers)


def test_spec_norm_kinds_round_trip_and_stay_backward_compatible():
    bn = ArchSpec.parse("scale+relu+batchnorm", 3, 4)
    assert all(layer.norm is NormKind.BATCHNORM for layer in bn.layers)
    assert bn.final_norm is NormKind.BATCHNORM
    assert bn.layers[0].activation is ActivationKind.RELU
    assert ArchSpec.from_yaml(bn.to_yaml()) == bn
    assert bn.summary() == {"scale": 12, "relu": 3, "batchnorm_layers": 3, "final_batchnorm": 1}
    assert ArchSpec.parse("scale+batchnorm", 3, 4) == ArchSpec.uniform(3, 4, "scale", "gelu",
                                                                        "batchnorm")
    assert ArchSpec.parse("scale+relu_nobias", 3, 4).norms() == (NormKind.LAYERNORM,) * 4
    # per layer, and the final norm on its own
    mixed = ArchSpec((LayerSpec(("scale",) * 4, "gelu", norm="batchnorm"),
                      LayerSpec(("scale",) * 4, "relu")))
    assert mixed.final_norm is NormKind.LAYERNORM
    assert ArchSpec.from_dict(mixed.to_dict()) == mixed
    assert mixed.summary()["batchnorm_layers"] == 1 and "final_batchnorm" not in mixed.summary()
    # layernorm everywhere writes what older readers read: no norm fields at all
    plain = ArchSpec.uniform(2, 4, "scale", "relu")
    assert "norm" not in plain.to_yaml()
    old = {"version": 1, "layers": [{"attention": ["scale"] * 4, "activation": "relu"}] * 2}
    assert ArchSpec.from_dict(old) == plain
    with pytest.raises(ValueError, match="unknown NormKind 'groupnorm'"):
        ArchSpec.from_dict({**old, "final_norm": "groupnorm"})
    with pytest.raises(ValueError, match=r"ATTENTION\[\+ACTIVATION\]\[\+NORM\]"):
        ArchSpec.parse("scale+relu+gelu", 2, 4)


@pytest.mark.parametrize(
    "doc, match",
    [
        ({"layers": []}, "version"),
        ({"version": 2, "layers": [{"attention": ["softmax"], "activation": "gelu"}]},
         "unsupported ArchSpec version"),
        ({"version": 1, "layers": [{"attention": ["softmaxx"], "activation": "gelu"}]},
         "unknown AttentionKind 'softmaxx'"),
        ({"version": 1, "layers": [{"attention": ["softmax"], "activation": "swish"}]},
         "unknown ActivationKind 'swish'"),
        ({"version": 1, "layers": [{"attention": "softmax", "activation": "gelu"}]},
         "list of per-head kinds"),
        ({"version": 1, "layers": [{"attention": [], "activation": "gelu"}]}, "at least one head"),
        ({"version": 1, "layers": []}, "at least one layer"),
        ({"version": 1, "layers": [{"attention": ["scale"]}]}, "exactly"),
    ],
)
def test_spec_validation_errors(doc, match):
    with pytest.raises(ValueError, match=match):
        ArchSpec.from_dict(doc)


def test_spec_must_fit_the_model():
    with pytest.raises(ValueError, match="spec has 3 layers, model has 2"):
        ViT(TINY, ArchSpec.uniform(3, 4))
    with pytest.raises(ValueError, match="layer 1: spec has 2 heads, model has 4"):
        ViT(TINY, ArchSpec((LayerSpec(("scale",) * 4, "gelu"), LayerSpec(("scale",) * 2, "gelu"))))
    with pytest.raises(ValueError, match="fractions"):
        ArchSpec.mix(2, 4, fractions=(0.7, 0.7))


# ----------------------------------------------------------------------------- attention


def _per_head_reference(att: Attention, x: torch.Tensor) -> torch.Tensor:
    """Straightforward per-head definition of each attention kind."""
    b, n, c = x.shape
    qkv = F.linear(x, att.qkv.weight, att.qkv.bias).reshape(b, n, 3, att.heads, att.head_dim)
    outs = []
    for h, kind in enumerate(att.kinds):
        q, k, v = qkv[:, :, 0, h], qkv[:, :, 1, h], qkv[:, :, 2, h]
        a = q @ k.transpose(-2, -1) / math.sqrt(att.head_dim)
        if kind is AttentionKind.SOFTMAX:
            p = torch.softmax(a, -1)
        elif kind is AttentionKind.RELU_SOFTMAX:
            p = torch.relu(a) / (torch.relu(a).sum(-1, keepdim=True) + att.eps)
        elif kind is AttentionKind.SCALE:
            p = a / n
        else:
            p = (a + 5) ** 2 / ((a + 5) ** 2).sum(-1, keepdim=True)
        outs.append(p @ v)
    return F.linear(torch.cat(outs, -1), att.proj.weight, att.proj.bias)


@pytest.mark.parametrize(
    "kinds",
    [
        ("scale", "softmax", "scale", "relu_softmax"),  # needs a permutation
        ("softmax", "softmax", "quad2", "quad2"),
        ("relu_softmax",) * 4,
        ("quad2", "scale", "softmax", "relu_softmax"),
    ],
)
@pytest.mark.parametrize("tokens, dim", [(9, 16), (5, 64)])  # head dim below / above N
def test_grouped_heads_equal_per_head_definition(kinds, tokens, dim):
    torch.manual_seed(1)
    att = Attention(dim, 4, tuple(AttentionKind(k) for k in kinds), eps=1e-9)
    with torch.no_grad():
        att.qkv.weight.mul_(20)
    x = torch.randn(2, tokens, dim)
    got = att(x)
    want = _per_head_reference(att, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_grouped_heads_run_one_op_per_kind(monkeypatch):
    calls = []
    orig = ops.ATTENTION_FNS["softmax"]
    monkeypatch.setitem(ops.ATTENTION_FNS, "softmax",
                        lambda a, eps, protocol=None: calls.append(a.shape) or orig(a, eps=eps))
    att = Attention(16, 4, tuple(AttentionKind(k) for k in
                                 ("softmax", "scale", "softmax", "softmax")))
    att(torch.randn(1, 7, 16))
    assert calls == [torch.Size([1, 3, 7, 7])]


# ----------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("block", ["prenorm", "cct"])
def test_patch_embed_equals_conv_and_output_shape(block):
    torch.manual_seed(0)
    m = build_model(TINY.replace(block=block))
    x = torch.randn(3, 2, 8, 8)
    conv = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=2)
    torch.testing.assert_close(m.patch_embed(x), conv.flatten(2).transpose(1, 2))
    assert m(x).shape == (3, 5)


def test_classifier_normalises_only_the_class_token_equivalently():
    torch.manual_seed(0)
    m = _scaled(build_model(TINY))
    x = torch.randn(2, 2, 8, 8)
    t = m.patch_embed(x)
    h = torch.cat([m.cls_token.expand(2, -1, -1), t], 1) + m.pos_embed
    for blk in m.blocks:
        h = blk(h)
    full = F.linear(F.layer_norm(h, (16,), m.norm.weight, m.norm.bias, 1e-5)[:, 0],
                    m.head.weight, m.head.bias)
    torch.testing.assert_close(m(x), full)


def test_set_spec_changes_kinds_not_weights():
    torch.manual_seed(0)
    m = _scaled(build_model(TINY))
    x = torch.randn(1, 2, 8, 8)
    before = m(x)
    m.set_spec(ArchSpec.uniform(2, 4, "scale", "relu"))
    after = m(x)
    assert not torch.allclose(before, after)
    assert m.blocks[1].attn.kinds == (AttentionKind.SCALE,) * 4
    assert m.blocks[0].mlp.activation is ActivationKind.RELU


def test_relu_nobias_layers_have_no_fc1_or_norm2_bias():
    spec = ArchSpec((LayerSpec(("scale",) * 4, "relu_nobias"), LayerSpec(("scale",) * 4, "relu")))
    m = _scaled(build_model(TINY, spec))
    assert m.blocks[0].mlp.fc1.bias is None and m.blocks[0].norm2.bias is None
    assert m.blocks[1].mlp.fc1.bias is not None and m.blocks[1].norm2.bias is not None
    x = torch.randn(2, 2, 8, 8)
    h = m.class_token(x)  # runs the blocks
    assert torch.isfinite(h).all()
    # the MLP is relu(fc1(norm2 t)) with neither bias, then fc2
    blk = m.blocks[0]
    t = torch.randn(1, 5, 16)
    hidden = F.relu(blk.mlp.fc1(blk.norm2(t)))
    want = blk.mlp.fc2(hidden)
    torch.testing.assert_close(blk.mlp(t, norm=blk.norm2), want)
    # switching a layer to or from the bias-free kind would change the parameters
    with pytest.raises(ValueError, match="changes the MLP's parameters"):
        m.set_spec(ArchSpec.uniform(2, 4, "scale", "relu"))
    m.set_spec(ArchSpec((LayerSpec(("softmax",) * 4, "relu_nobias"),
                         LayerSpec(("scale",) * 4, "gelu"))))
    assert m.blocks[1].mlp.activation is ActivationKind.GELU


def test_fold_norms_keeps_bias_free_layers_bias_free():
    from mpcvit.models.secure import fold_norms

    spec = ArchSpec.uniform(2, 4, "scale", "relu_nobias")
    m = _scaled(build_model(TINY, spec))
    with torch.no_grad():
        for blk in m.blocks:
            blk.norm2.weight.uniform_(0.5, 1.5)
    folded = fold_norms(m)
    assert folded.blocks[0].mlp.fc1.bias is None and folded.blocks[0].norm2.weight is None
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(folded(x), m(x), rtol=1e-4, atol=1e-5)


def test_merge_linear_mlps_computes_the_same_function():
    from mpcvit.models.secure import prepare_for_mpc

    spec = ArchSpec((LayerSpec(("scale",) * 4, "identity"), LayerSpec(("softmax",) * 4, "gelu")))
    for block in ("prenorm", "cct"):
        m = _scaled(build_model(TINY.replace(block=block), spec))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.uniform_(0.5, 1.5)
        prepared = prepare_for_mpc(m)
        mlp = prepared.blocks[0].mlp
        assert mlp.fc1.weight.shape == (TINY.dim, TINY.dim)  # one dim x dim layer
        assert isinstance(mlp.fc2, torch.nn.Identity)
        assert prepared.blocks[1].mlp.fc1.weight.shape == (TINY.mlp_hidden, TINY.dim)
        assert m.blocks[0].mlp.fc1.weight.shape == (TINY.mlp_hidden, TINY.dim)  # a copy
        x = torch.randn(2, 2, 8, 8)
        torch.testing.assert_close(prepared(x), m(x), rtol=1e-4, atol=1e-4)


def test_demo_config_forward_and_backward():
    m = build_model("demo", ArchSpec.mix(4, 4))
    x = torch.randn(2, 1, 28, 28)
    loss = m(x).logsumexp(-1).sum()
    loss.backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None
    assert torch.isfinite(m.blocks[0].attn.qkv.weight.grad).all()


# ----------------------------------------------------------------------------- ops


def test_secure_gelu_polynomial_is_accurate_in_exact_arithmetic():
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    err = (gelu_poly_plain(x) - F.gelu(x)).abs()
    assert err.max() < 3e-4


def test_quad_and_quad2_definitions():
    x = torch.tensor([-2.0, 0.0, 2.0])
    torch.testing.assert_close(ops.quad(x), 0.125 * x**2 + 0.25 * x + 0.5)
    a = torch.tensor([[1.0, -1.0, 3.0]])
    r = (a + 5) ** 2
    torch.testing.assert_close(ops.quad2(a, eps=0.0), r / r.sum(-1, keepdim=True))


# ----------------------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    spec = ArchSpec((LayerSpec(("scale", "softmax", "relu_softmax", "scale"), "relu"),
                     LayerSpec(("quad2",) * 4, "quad")))
    m = _scaled(build_model(TINY, spec))
    path = tmp_path / "m.pt"
    save_checkpoint(m, path, extra={"accuracy": 0.9})
    m2, extra = load_checkpoint(path)
    assert extra == {"accuracy": 0.9}
    assert m2.config == m.config and m2.spec == m.spec
    x = torch.randn(2, 2, 8, 8)
    torch.testing.assert_close(m2(x), m(x))
    assert load_model(str(path)).spec == spec
    assert load_model("demo").config == CONFIGS["demo"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="not an mpcvit checkpoint"):
        load_checkpoint(other)
    m = build_model(TINY)
    good = tmp_path / "good.pt"
    save_checkpoint(m, good)
    blob = torch.load(good, weights_only=True)
    blob["format_version"] = 99
    torch.save(blob, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v99.pt")
    blob["format_version"] = 1
    blob["config"] = {**blob["config"], "dim": 32}
    torch.save(blob, tmp_path / "wrong.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "wrong.pt")


# ----------------------------------------------------------------------------- reference


def _reference_state_dict(depth=2, dim=16, heads=4, hidden=32, patch=2, side=3, chans=3,
                          classes=7, alphas=None, seed=0):
    """A state dict in the reference ViTLite layout, with trained-like scales."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "tokenizer.conv_layers.0.0.weight": r(dim, chans, patch, patch),
        "tokenizer.conv_layers.0.0.bias": r(dim, s=0.1),
        "classifier.class_emb": r(1, 1, dim),
        "classifier.positional_emb": r(1, side * side + 1, dim, s=0.2),
        "classifier.norm.weight": 1 + r(dim, s=0.1),
        "classifier.norm.bias": r(dim, s=0.1),
        "classifier.fc.weight": r(classes, dim),
        "classifier.fc.bias": r(classes, s=0.1),
    }
    for i in range(depth):
        p = f"classifier.blocks.{i}."
        a = alphas[i] if alphas else [1.0, 0.0] * (heads // 2)
        sd.update({
            p + "pre_norm.weight": 1 + r(dim, s=0.1), p + "pre_norm.bias": r(dim, s=0.1),
            p + "self_attn.qkv.weight": r(3 * dim, dim, s=0.5),
            p + "self_attn.proj.weight": r(dim, dim), p + "self_attn.proj.bias": r(dim, s=0.1),
            p + "self_attn.alpha": torch.tensor(a).reshape(1, heads, 1, 1),
            p + "linear1.weight": r(hidden, dim), p + "linear1.bias": r(hidden, s=0.1),
            p + "norm1.weight": 1 + r(dim, s=0.1), p + "norm1.bias": r(dim, s=0.1),
            p + "linear2.weight": r(dim, hidden), p + "linear2.bias": r(dim, s=0.1),
        })
    return sd


def _reference_forward(sd, x, depth, heads, eps=1e-5):
    """Independent re-implementation of the published reference forward pass."""
    t = F.conv2d(x, sd["tokenizer.conv_layers.0.0.weight"], sd["tokenizer.conv_layers.0.0.bias"],
                 stride=sd["tokenizer.conv_layers.0.0.weight"].shape[-1])
    t = t.flatten(2).transpose(-2, -1)
    b, _, dim = t.shape
    h = torch.cat([sd["classifier.class_emb"].expand(b, -1, -1), t], 1)
    h = h + sd["classifier.positional_emb"]
    for i in range(depth):
        p = f"classifier.blocks.{i}."
        y = F.layer_norm(h, (dim,), sd[p + "pre_norm.weight"], sd[p + "pre_norm.bias"])
        n = y.shape[1]
        qkv = (y @ sd[p + "self_attn.qkv.weight"].t()).reshape(b, n, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5
        rs = torch.relu(a) / (torch.relu(a).sum(-1, keepdim=True) + eps)
        alpha = sd[p + "self_attn.alpha"]
        att = alpha * rs + (1 - alpha) * (a / n)
        o = (att @ v).transpose(1, 2).reshape(b, n, dim)
        h = h + F.linear(o, sd[p + "self_attn.proj.weight"], sd[p + "self_attn.proj.bias"])
        h = F.layer_norm(h, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        m = F.linear(h, sd[p + "linear1.weight"], sd[p + "linear1.bias"])
        # MPCViT+ (--linear-gelu): beta (1, N, 1) picks GeLU or identity per token, and
        # the identity tokens take a ReLU after linear2; no beta is plain GeLU
        beta = sd.get(p + "beta", torch.ones(1, n, 1, dtype=m.dtype))
        m = F.linear(beta * F.gelu(m) + (1 - beta) * m, sd[p + "linear2.weight"],
                     sd[p + "linear2.bias"])
        h = h + (1 - beta) * F.relu(m) + beta * m
    h = F.layer_norm(h, (dim,), sd["classifier.norm.weight"], sd["classifier.norm.bias"])
    return F.linear(h[:, 0], sd["classifier.fc.weight"], sd["classifier.fc.bias"])


def test_reference_import_reproduces_logits():
    alphas = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    sd = _reference_state_dict(depth=3, alphas=alphas)
    model = import_reference({"state_dict": {"module." + k: v for k, v in sd.items()}},
                             attn_eps=1e-5)
    cfg = model.config
    assert (cfg.depth, cfg.heads, cfg.dim, cfg.patch, cfg.image_size, cfg.in_chans,
            cfg.num_classes, cfg.mlp_hidden, cfg.block) == (3, 4, 16, 2, 6, 3, 7, 32, "cct")
    assert model.spec.layers[1].attention == (AttentionKind.SCALE,) * 2 + (
        AttentionKind.RELU_SOFTMAX,) * 2
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        # float32 rounding alone (operation order differs) on these trained-like scales
        torch.testing.assert_close(model(x), _reference_forward(sd, x, 3, 4), rtol=1e-5,
                                   atol=2e-5)
        # in float64 the two computations agree to rounding: the import is exact
        sd64 = {k: v.double() for k, v in sd.items()}
        got = model.double()(x.double())
        torch.testing.assert_close(got, _reference_forward(sd64, x.double(), 3, 4), rtol=0,
                                   atol=1e-9)
        model.float()
    # The reference's own eps is the default; attn_eps=None keeps our fixed-point-safe
    # 2**-8, with logits still close on trained-like scales.
    assert import_reference(sd).config.attn_eps == 1e-5
    ours = import_reference(sd, attn_eps=None)
    assert ours.config.attn_eps == 2.0**-8
    assert (ours(x) - model(x)).abs().max() < 0.05


def test_reference_import_errors():
    sd = _reference_state_dict(alphas=[[0.3, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 0.0]])
    with pytest.raises(ReferenceImportError, match="not binary"):
        import_reference(sd)
    m = import_reference(sd, alpha_threshold=0.5)
    assert m.spec.layers[0].attention[0] is AttentionKind.SCALE
    sd = _reference_state_dict()
    del sd["classifier.blocks.1.linear2.bias"]
    with pytest.raises(ReferenceImportError, match="lacks 'classifier.blocks.1.linear2.bias'"):
        import_reference(sd)
    sd = _reference_state_dict()
    sd["classifier.blocks.0.beta"] = torch.ones(1, 12, 1)
    with pytest.raises(ReferenceImportError, match="beta has shape"):
        import_reference(sd)
    sd["classifier.blocks.0.beta"] = torch.full((1, 10, 1), 0.7)
    with pytest.raises(ReferenceImportError, match="beta .* not binary"):
        import_reference(sd)
    assert import_reference(sd, beta_threshold=0.5).spec.layers[0].token_mask is None
    sd = _reference_state_dict()
    sd["classifier.extra.weight"] = torch.ones(1)
    with pytest.raises(ReferenceImportError, match="unexpected"):
        import_reference(sd)


def test_folding_layernorm_affine_keeps_the_function():
    from mpcvit.models.secure import fold_norms

    for block in ("prenorm", "cct"):
        cfg = get_config("demo").replace(block=block)
        torch.manual_seed(0)
        model = ViT(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn(p.shape))
        folded = fold_norms(model)
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
        assert folded.norm.weight is None and model.norm.weight is not None
        first = folded.blocks[0]
        if block == "prenorm":
            assert first.norm1.weight is None and first.norm2.weight is None
        else:  # norm1 also feeds the residual: it keeps its affine part
            assert first.pre_norm.weight is None and first.norm1.weight is not None


def _with_running_stats(model: ViT, seed: int = 0) -> ViT:
    """Trained-like BatchNorm statistics and affine parts (a fresh norm's are 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchNorm):
                m.running_mean.normal_(0.0, 2.0, generator=g)
                m.running_var.uniform_(0.05, 30.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3, generator=g)
    return model


@pytest.mark.parametrize("activation", ["relu", "relu_nobias", "identity", "gelu"])
def test_folding_batchnorm_removes_it_and_keeps_the_function(activation):
    from mpcvit.models.secure import fold_norms, prepare_for_mpc

    spec = ArchSpec.uniform(TINY.depth, TINY.heads, "scale", activation, "batchnorm")
    model = _with_running_stats(_scaled(build_model(TINY, spec))).eval()
    assert isinstance(model.blocks[0].norm1, BatchNorm) and isinstance(model.norm, BatchNorm)
    # relu_nobias: no shift in the norm before the bias-free fc1
    assert (model.blocks[0].norm2.bias is None) == (activation == "relu_nobias")
    x = torch.randn(3, 2, 8, 8)
    for prepared in (fold_norms(model), prepare_for_mpc(model)):
        with torch.no_grad():
            torch.testing.assert_close(prepared(x), model(x), rtol=1e-5, atol=1e-5)
        # no norm is left to run under MPC; every folded layer carries a bias
        assert prepared.norm is None and prepared.head.bias is not None
        for blk in prepared.blocks:
            assert blk.norm1 is None and blk.norm2 is None
            assert blk.attn.qkv.bias is not None and blk.mlp.fc1.bias is not None
    assert isinstance(model.norm, BatchNorm)  # the model itself is untouched


def test_batchnorm_fold_into_a_linear_layer_is_exact():
    from mpcvit.models.secure import fold_batchnorm
    from mpcvit.models.vit import Linear

    holder = torch.nn.Module()
    holder.norm = BatchNorm(16, eps=1e-5)
    _with_running_stats(holder).eval()
    linear = Linear(16, 24)
    x = torch.randn(2, 5, 16) * 4 + 1
    with torch.no_grad():
        want = linear(holder.norm(x))
        fold_batchnorm(holder, "norm", linear)
        got = linear(x)
    assert holder.norm is None
    assert (got - want).abs().max().item() <= 1e-5


def test_batchnorm_training_step_updates_running_stats_and_eval_uses_them(tmp_path):
    spec = ArchSpec.parse("scale+relu+batchnorm", TINY.depth, TINY.heads)
    model = build_model(TINY, spec)
    norm = model.blocks[0].norm1
    before = norm.running_mean.clone(), norm.running_var.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 2, 8, 8) * 3 + 1, torch.randint(0, TINY.num_classes, (8,))
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert norm.weight.grad is not None and model.norm.weight.grad is not None
    assert not torch.equal(norm.running_mean, before[0])
    assert not torch.equal(norm.running_var, before[1])
    assert int(norm.num_batches_tracked) == 1
    # eval mode: the running statistics, so an image's logits do not depend on its batch
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:1], model(x[:1]))
        stats = norm.running_mean.clone()
        model(x)
    assert torch.equal(norm.running_mean, stats)
    # the checkpoint keeps the spec's norms and their running statistics
    save_checkpoint(model, tmp_path / "bn.pt")
    loaded, _ = load_checkpoint(tmp_path / "bn.pt")
    assert loaded.spec == spec and torch.equal(loaded.blocks[0].norm1.running_mean, stats)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_batchnorm_refusals():
    spec = ArchSpec.uniform(TINY.depth, TINY.heads, "scale", "relu", "batchnorm")
    with pytest.raises(ValueError, match="CCT block's norms are LayerNorms"):
        ViT(TINY.replace(block="cct"), spec)
    # a CCT model may still fold a final BatchNorm into its head
    cct = ArchSpec.uniform(TINY.depth, TINY.heads, "scale", "relu").with_norm("layernorm")
    ViT(TINY.replace(block="cct"), ArchSpec(cct.layers, final_norm="batchnorm"))
    model = build_model(TINY, spec)
    with pytest.raises(ValueError, match="norm batchnorm -> layernorm changes the parameters"):
        model.set_spec(ArchSpec(spec.with_norm("layernorm").layers, final_norm="batchnorm"))
    with pytest.raises(ValueError, match="final norm batchnorm -> layernorm"):
        model.set_spec(ArchSpec(spec.layers))
    model.set_spec(ArchSpec.uniform(TINY.depth, TINY.heads, "softmax", "gelu", "batchnorm"))
    # secret shares never meet an unfolded BatchNorm: it has no secure form
    with pytest.raises(TypeError, match="folded"):
        model.norm(torch.zeros(2, TINY.dim).numpy())


def test_grouped_spec_packs_accurate_heads_into_the_first_layers():
    spec = ArchSpec.grouped(7, 4, 0.25, activation="relu")
    counts = [sum(k is AttentionKind.RELU_SOFTMAX for k in layer.attention)
              for layer in spec.layers]
    assert counts == [4, 3, 0, 0, 0, 0, 0]  # round(0.25 * 28) = 7 heads
    assert all(layer.activation is ActivationKind.RELU for layer in spec.layers)
    assert ArchSpec.grouped(4, 4, 0.0) == ArchSpec.uniform(4, 4, "scale", "gelu")
    with pytest.raises(ValueError):
        ArchSpec.grouped(4, 4, 1.5)
