"""The client's YAML config (deploy/client.yaml): which parties, model, timeouts, TLS.

``parties: [party0, party1]`` names one pair; ``pairs:`` names many, as a list of
``[party0, party1]`` lists, as ``"a0,a1;b0,b1"``, or as ``dns:P0,P1`` with ``{ordinal}``
in both addresses (:class:`mpcvit.party.pool.PairSource`).  Torch-free, like the rest of
the client SDK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mpcvit.party.images import MAX_PIXELS
from mpcvit.party.pool import PairPool, PairSource

ENV_PARTIES = "MPCVIT_PARTIES"  # "host0:port0,host1:port1" overrides the config
ENV_PAIRS = "MPCVIT_PAIRS"  # "a0,a1;b0,b1" or "dns:P0,P1" overrides the config's pairs
# MPCVIT_TLS_DIR=/certs turns on mutual TLS with ca.pem, client.pem and client.key there.


_KEYS = {"parties", "pairs", "model", "timeout", "top_k", "wait_ready", "connect_timeout",
         "max_pixels", "tls"}


@dataclass(frozen=True)
class ClientConfig:
    """``timeout``: each call's deadline; ``wait_ready``: how long to wait for starting
    parties; ``connect_timeout``: how long an address may refuse or not answer before
    the client gives up on it; ``max_pixels``: the largest picture it decodes.
    ``parties`` is one pair, ``pairs`` many (then ``parties`` is empty)."""

    parties: tuple[str, ...]
    model: str = ""
    timeout: float = 120.0
    top_k: int = 3
    wait_ready: float = 60.0
    connect_timeout: float = 5.0
    max_pixels: int = MAX_PIXELS
    tls: dict[str, str] | None = None
    pairs: PairSource | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: dict[str, str] | None = None) -> ClientConfig:
        env = os.environ if env is None else env
        data = dict(data)
        if env.get(ENV_PARTIES) and env.get(ENV_PAIRS):
            raise ValueError(f"set {ENV_PARTIES} (one pair) or {ENV_PAIRS} (many), not both")
        if env.get(ENV_PARTIES):
            data["parties"] = [a.strip() for a in env[ENV_PARTIES].split(",")]
            data.pop("pairs", None)
        if env.get(ENV_PAIRS):
            data["pairs"] = env[ENV_PAIRS]
            data.pop("parties", None)
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"unknown client config keys: {sorted(unknown)}")
        if env.get("MPCVIT_TLS_DIR") and not data.get("tls"):
            d = Path(env["MPCVIT_TLS_DIR"])
            data["tls"] = {"ca": str(d / "ca.pem"), "cert": str(d / "client.pem"),
                           "key": str(d / "client.key")}
        parties = data.get("parties") or []
        pairs = _pairs(data.get("pairs"))
        if pairs is not None and parties:
            raise ValueError("give 'parties' (one pair) or 'pairs' (many), not both")
        if pairs is None and len(parties) != 2:
            raise ValueError("client config needs 'parties': [party0 address, party1 address] "
                             "or 'pairs': [[party0, party1], ...]")
        try:
            config = cls(parties=tuple(str(a) for a in parties), pairs=pairs,
                         model=str(data.get("model") or ""),
                         timeout=float(data.get("timeout", 120.0)),
                         top_k=int(data.get("top_k", 3)),
                         wait_ready=float(data.get("wait_ready", 60.0)),
                         connect_timeout=float(data.get("connect_timeout", 5.0)),
                         max_pixels=int(data.get("max_pixels", MAX_PIXELS)), tls=data.get("tls"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad client config value: {exc}") from None
        if min(config.timeout, config.connect_timeout, config.max_pixels) <= 0:
            raise ValueError("timeout, connect_timeout and max_pixels must be positive")
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, env: dict[str, str] | None = None) -> ClientConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must be a YAML mapping")
        return cls.from_dict(data, env)

    def with_pairs(self, spec: str | None) -> ClientConfig:
        """This config with ``pairs`` from a ``--pairs`` value (None: unchanged)."""
        if spec is None:
            return self
        return replace(self, parties=(), pairs=_pairs(spec))

    def client(self) -> Any:
        """A :class:`~mpcvit.party.client.PrivateInferenceClient` for ``parties``, or a
        :class:`~mpcvit.party.pool.PairPool` for ``pairs``; both have the same calls."""
        from .client import ClientTls, PrivateInferenceClient

        try:
            tls = ClientTls(**self.tls) if self.tls else None
        except TypeError:
            keys = sorted(self.tls or {})
            raise ValueError(f"tls needs ca (and cert, key), got {keys}") from None
        if self.pairs is not None:
            return PairPool(self.pairs, model=self.model, timeout=self.timeout, tls=tls,
                            max_pixels=self.max_pixels,
                            health_timeout=self.connect_timeout)
        return PrivateInferenceClient(self.parties, model=self.model, timeout=self.timeout,
                                      tls=tls, max_pixels=self.max_pixels)


def _pairs(value: Any) -> PairSource | None:
    """The ``pairs`` value as a PairSource (None when absent); ValueError when malformed."""
    if value is None or value == "" or value == []:
        return None
    if not isinstance(value, (str, list, tuple)):
        raise ValueError("pairs is a list of [party0, party1] lists, 'a0,a1;b0,b1' or "
                         "'dns:P0,P1'")
    try:
        return PairSource.parse(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad pairs: {exc}") from None
