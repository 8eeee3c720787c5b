"""Make CrypTen 0.4.1 importable on current torch.

CrypTen 0.4.1 (2022) imports ``torch.onnx._internal.registration`` at module load
time in ``crypten/nn/onnx_converter.py``; torch 2.x removed that module.  Only CrypTen's
ONNX model importer (``crypten.nn.from_pytorch``) uses it, and mpcvit never calls that
importer: our models are written against CrypTen's tensor API.

:func:`install` appends a finder to the END of ``sys.meta_path``: it is asked only after
every normal finder failed, and then supplies an empty stand-in module under the removed
name.  On a torch that still has the module nothing changes, and installing the finder
imports nothing (so the torch-free client can import ``mpcvit.mpc``'s package safely).
It also puts a finder FIRST that answers for ``crypten.nn.onnx_converter`` alone, with
importers that refuse with a clear error: the real module imports onnx and torch.onnx,
about a third of a party's start-up time (which a restarted party's recovery waits for),
for an importer that cannot work on this torch.
The MPC core (communicator, providers, ``MPCTensor``) is untouched.

``mpcvit.mpc``'s package ``__init__`` installs it, so any ``mpcvit.mpc.*`` import comes
first; code outside the package imports CrypTen through :func:`import_crypten`.

Once CrypTen is imported, :func:`patch_crypten` applies four fixes (idempotent, each
tested in tests/test_compat.py):

* ``FixedPointEncoder.decode`` divides negative values by ``scale - 1`` with torch's
  floor division (written for the old truncating ``floor_divide``), so a value just
  above a negative integer (-7.99997) decodes one too low (-8.99997).  We decode as
  ``floor(v / scale) + (v mod scale) / scale``, exact for every value.
* ``CrypTensor.__getattribute__`` is wrapped by CrypTen's validation-mode decorator, which
  reads ``cfg.debug.validation_mode`` through omegaconf on EVERY attribute access (about
  half of a party's CPU time on the demo model).  mpcvit never turns validation mode on,
  so when it is off we unwrap the decorator; turning it on afterwards has no effect.
* Every ``cfg.section.key`` read (the fixed-point encoder's precision, the provider, ...)
  walks omegaconf's resolver: thousands of reads per secure forward, about 15% of a
  party's CPU time on ``vit_7_4_32``.  ``CrypTenConfig`` lookups now go through a cache
  of per-section views (:class:`_CachedSection`).  It stays exact because CrypTen
  replaces its config object on every top-level write and ``temp_override`` (the cache
  is keyed by that object), and writes through a view (``cfg.mpc.provider = ...``) reach
  the real node and drop the cached value.  Writing into ``cfg.config`` directly would
  bypass the cache; neither CrypTen nor mpcvit does.
* ``MPCTensor.from_shares``, ``clone`` and ``shallow_copy`` start from a placeholder
  ``MPCTensor([])`` and then replace its ``_tensor``.  The constructor means to skip the
  sharing for that placeholder, but tests ``tensor is []``, which is never true, so every
  placeholder encodes an empty tensor and draws a pseudo-random zero sharing: ~0.07 ms
  each, hundreds of times per secure forward.  An empty-list ``MPCTensor`` now takes the
  branch CrypTen intended (an empty ``_tensor``, nothing drawn; both parties skip the
  draws alike, so their shared generators stay in step).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # imports nothing at run time: the torch-free client imports this module
    import torch
    from crypten.config.config import CrypTenConfig
    from crypten.encoder import FixedPointEncoder
    from crypten.mpc import MPCTensor
    from omegaconf import Container

_MISSING = "torch.onnx._internal.registration"


class _UnsupportedRegistry:
    def __getattr__(self, name: str) -> NoReturn:
        raise RuntimeError(
            "crypten.nn.from_pytorch (ONNX import) is not supported on this torch; "
            "mpcvit builds models on CrypTen's tensor API instead"
        )


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "mpcvit stand-in: CrypTen's ONNX importer is unsupported here."
        # onnx_converter only does ``from ... import registry``; using it fails loudly.
        module.registry = _UnsupportedRegistry()


class _StandInFinder(importlib.abc.MetaPathFinder):
    """Last-resort finder for the one module torch removed."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MISSING:
            return None
        return importlib.machinery.ModuleSpec(fullname, _StandInLoader())


_CONVERTER = "crypten.nn.onnx_converter"


def _unsupported_importer(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise RuntimeError("CrypTen's ONNX/TensorFlow model importers are not available in "
                       "mpcvit: models are built on CrypTen's tensor API instead")


class _ConverterLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__doc__ = "mpcvit stand-in for CrypTen's ONNX importer (unsupported here)."
        module.from_onnx = module.from_pytorch = module.from_tensorflow = (
            _unsupported_importer)
        module.TF_AND_TF2ONNX = False


class _ConverterFinder(importlib.abc.MetaPathFinder):
    """First-asked finder for CrypTen's ONNX importer only: loading the real one imports
    onnx and torch.onnx (about a third of a party's start-up time) for an importer that
    cannot work on this torch anyway."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _CONVERTER:
            return None
        return importlib.machinery.ModuleSpec(fullname, _ConverterLoader())


def install() -> None:
    """Register the stand-in finders (idempotent; imports nothing)."""
    if not any(isinstance(f, _StandInFinder) for f in sys.meta_path):
        sys.meta_path.append(_StandInFinder())
    if not any(isinstance(f, _ConverterFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ConverterFinder())


def _exact_decode(self: FixedPointEncoder, tensor: torch.Tensor | None) -> torch.Tensor | None:
    """CrypTen's FixedPointEncoder.decode without the negative-value off-by-one."""
    if tensor is None or self._scale <= 1:
        return _ORIGINAL_DECODE[0](self, tensor)
    whole = tensor.div(self._scale, rounding_mode="floor")
    frac = tensor - whole * self._scale  # in [0, scale)
    return (whole.float() + frac.float() / self._scale).data


_ORIGINAL_DECODE: list = []


class _CachedSection:
    """View of one top-level section of CrypTen's config that remembers leaf values."""

    __slots__ = ("_node", "_leaves")

    def __init__(self, node: Container) -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_leaves", {})

    def __getattr__(self, key: str) -> Any:
        leaves = object.__getattribute__(self, "_leaves")
        if key in leaves:
            return leaves[key]
        value = getattr(object.__getattribute__(self, "_node"), key)
        if not _is_container(value):
            leaves[key] = value
        return value

    def __setattr__(self, key: str, value: object) -> None:
        setattr(object.__getattribute__(self, "_node"), key, value)
        object.__getattribute__(self, "_leaves").pop(key, None)

    def __repr__(self) -> str:
        return repr(object.__getattribute__(self, "_node"))


def _is_container(value: object) -> bool:
    from omegaconf import Container

    return isinstance(value, Container)


def _cached_config_getattribute(self: CrypTenConfig, name: str) -> Any:
    """``CrypTenConfig.__getattribute__`` reading through per-section caches."""
    try:
        return object.__getattribute__(self, name)
    except AttributeError:
        pass
    config = object.__getattribute__(self, "config")
    cache = self.__dict__.get("_mpcvit_sections")
    if cache is None or cache[0] is not config:
        cache = (config, {})
        object.__setattr__(self, "_mpcvit_sections", cache)
    head, _, rest = name.partition(".")
    section = cache[1].get(head)
    if section is None:
        value = getattr(config, head)
        if not _is_container(value):
            return value
        section = cache[1][head] = _CachedSection(value)
    result = section
    for key in rest.split(".") if rest else ():
        result = getattr(result, key)
    return result


# CrypTen's original MPCTensor.__init__, CrypTensor.__init__, Ptype.arithmetic and
# torch.tensor, set by patch_crypten (the placeholder path runs hundreds of times a forward).
_MPC_INIT_PARTS: list = []


def _mpc_init(self: MPCTensor, tensor: object, *args: Any, **kwargs: Any) -> None:
    """``MPCTensor.__init__`` with CrypTen's intended empty-placeholder branch."""
    if type(tensor) is list and not tensor and not args and set(kwargs) <= {"ptype"}:
        _, crypt_init, arithmetic, empty = _MPC_INIT_PARTS
        crypt_init(self, requires_grad=False)
        self._tensor = empty([])
        self.ptype = kwargs.get("ptype", arithmetic)
        return
    _MPC_INIT_PARTS[0](self, tensor, *args, **kwargs)


def patch_crypten(crypten: types.ModuleType) -> None:
    """Apply the fixes described in the module docstring (idempotent)."""
    from crypten.config import cfg
    from crypten.cryptensor import CrypTensor
    from crypten.encoder import FixedPointEncoder

    if FixedPointEncoder.decode is not _exact_decode:
        _ORIGINAL_DECODE[:] = [FixedPointEncoder.decode]
        FixedPointEncoder.decode = _exact_decode
    config_cls = type(cfg)
    if config_cls.__dict__["__getattribute__"] is not _cached_config_getattribute:
        config_cls.__getattribute__ = _cached_config_getattribute
    from crypten.mpc import MPCTensor
    from crypten.mpc.ptype import ptype as Ptype

    if MPCTensor.__dict__["__init__"] is not _mpc_init:
        import torch

        _MPC_INIT_PARTS[:] = [MPCTensor.__dict__["__init__"], CrypTensor.__init__,
                              Ptype.arithmetic, torch.tensor]
        MPCTensor.__init__ = _mpc_init
    getattr_fn = CrypTensor.__dict__["__getattribute__"]
    if not cfg.debug.validation_mode and hasattr(getattr_fn, "__wrapped__"):
        CrypTensor.__getattribute__ = getattr_fn.__wrapped__


_PATCHED: list = []  # the patched crypten module, once patch_crypten has run


def import_crypten() -> types.ModuleType:
    """Return the ``crypten`` module, installing the compat shim and the fixes first
    (once: the secure ops call this hundreds of times per forward)."""
    if _PATCHED:
        return _PATCHED[0]
    install()
    import crypten

    patch_crypten(crypten)
    _PATCHED[:] = [crypten]
    return crypten


install()
