"""Make CrypTen 0.4.1 importable on current torch.

CrypTen 0.4.1 (2022) imports ``torch.onnx._internal.registration`` at module load
time in ``crypten/nn/onnx_converter.py``; torch 2.x removed that module.  Only CrypTen's
ONNX model importer (``crypten.nn.from_pytorch``) uses it, and mpcvit never calls that
importer: our models are written against CrypTen's tensor API.  So before the first
``import crypten`` we register an empty stand-in module under the removed name; the
MPC core (communicator, providers, ``MPCTensor``) is untouched.

Every module of this project imports CrypTen through :func:`import_crypten` (or imports
this module first), never with a bare ``import crypten``.
"""

from __future__ import annotations

import sys
import types

_MISSING = "torch.onnx._internal.registration"


def install() -> None:
    """Register the stand-in for the removed torch.onnx module (idempotent)."""
    if _MISSING in sys.modules:
        return
    try:
        import importlib

        importlib.import_module(_MISSING)
        return
    except ImportError:
        pass
    stub = types.ModuleType(_MISSING)
    stub.__doc__ = "mpcvit stand-in: CrypTen's ONNX importer is unsupported on this torch."
    # onnx_converter only does ``from ... import registry`` and never uses it unless
    # ``from_pytorch`` runs; make such a use fail loudly instead of silently.
    stub.registry = _UnsupportedRegistry()
    sys.modules[_MISSING] = stub


class _UnsupportedRegistry:
    def __getattr__(self, name: str):
        raise RuntimeError(
            "crypten.nn.from_pytorch (ONNX import) is not supported on this torch; "
            "mpcvit builds models on CrypTen's tensor API instead"
        )


def import_crypten():
    """Return the ``crypten`` module, installing the compat shim first."""
    install()
    import crypten

    return crypten


install()
