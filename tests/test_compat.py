"""The CrypTen compatibility shim and its fixes."""

from __future__ import annotations

import subprocess
import sys

import torch
from mpcvit.mpc.compat import import_crypten


def test_crypten_imports_on_this_torch_and_onnx_import_fails_loudly():
    code = (
        "import mpcvit.mpc, sys\n"
        "assert 'torch' not in sys.modules  # installing the shim imports nothing\n"
        "import crypten\n"
        "import torch.onnx._internal.registration as r\n"
        "try:\n"
        "    r.registry.anything\n"
        "except RuntimeError as e:\n"
        "    assert 'not supported' in str(e)\n"
        "else:\n"
        "    raise SystemExit('stand-in registry did not refuse')\n"
        "assert 'onnx' not in sys.modules  # CrypTen's ONNX importer is a stand-in\n"
        "try:\n"
        "    crypten.nn.from_pytorch(None, None)\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e)\n"
        "else:\n"
        "    raise SystemExit('stand-in importer did not refuse')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_is_exact_for_negative_values():
    crypten = import_crypten()
    enc = crypten.encoder.FixedPointEncoder()
    scale = int(enc.scale)
    values = torch.tensor([-8 * scale + 2, -1, -scale, -scale - 1, 0, 1, 7 * scale + 5,
                           -(2**40) + 3], dtype=torch.long)
    want = values.double() / scale
    got = enc.decode(values).double()
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-6), (got, want)  # float32 output
    # -7.99997 used to decode as -8.99997
    assert abs(got[0].item() - (-8 + 2 / scale)) < 1e-6


def test_validation_decorator_is_unwrapped():
    import_crypten()
    from crypten.cryptensor import CrypTensor

    getattr_fn = CrypTensor.__dict__["__getattribute__"]
    assert not hasattr(getattr_fn, "__wrapped__")
    # attribute dispatch still works (CrypTen's own dispatch, minus the validation hook)
    assert getattr_fn.__qualname__ == "CrypTensor.__getattribute__"


def test_config_cache_follows_writes_and_overrides():
    crypten = import_crypten()
    cfg = crypten.cfg
    before = cfg.encoder.precision_bits
    assert cfg.encoder.precision_bits == cfg.config.encoder.precision_bits == 16
    assert cfg["encoder.precision_bits"] == 16
    with cfg.temp_override({"encoder.precision_bits": 12}):
        assert cfg.encoder.precision_bits == 12
        assert crypten.encoder.FixedPointEncoder().scale == 2**12
    assert cfg.encoder.precision_bits == before
    provider = cfg.mpc.provider
    try:
        cfg.mpc.provider = "TTP"  # a write through the cached section view
        assert cfg.mpc.provider == "TTP" and cfg.config.mpc.provider == "TTP"
        cfg.mpc = {"provider": "TFP"}  # a top-level write replaces the whole config
        assert cfg.mpc.provider == "TFP"
    finally:
        cfg.mpc.provider = provider
    assert cfg.mpc.provider == provider


def test_placeholder_mpc_tensor_shares_nothing():
    import_crypten()
    from crypten.mpc import MPCTensor
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.ptype import ptype as Ptype

    # CrypTen's constructor meant this branch (``tensor is []`` never matched): without
    # the fix an empty-list MPCTensor encodes and zero-shares [] through a communicator,
    # which this test process never initialised.
    t = MPCTensor([])
    assert type(t._tensor) is torch.Tensor and t._tensor.numel() == 0
    assert t.ptype is Ptype.arithmetic and not t.requires_grad
    share = torch.tensor([3, -5, 1 << 40])
    s = MPCTensor.from_shares(share, precision=0)
    assert isinstance(s._tensor, ArithmeticSharedTensor) and torch.equal(s.share, share)
    c, sc = s.clone(), s.shallow_copy()
    assert torch.equal(c.share, share) and c.share is not share and sc._tensor is s._tensor
