"""The client's YAML config (deploy/client.yaml): which parties, model, timeouts, TLS.

Torch-free, like the rest of the client SDK.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpcvit.party.images import MAX_PIXELS

ENV_PARTIES = "MPCVIT_PARTIES"  # "host0:port0,host1:port1" overrides the config
# MPCVIT_TLS_DIR=/certs turns on mutual TLS with ca.pem, client.pem and client.key there.


_KEYS = {"parties", "model", "timeout", "top_k", "wait_ready", "connect_timeout",
         "max_pixels", "tls"}


@dataclass(frozen=True)
class ClientConfig:
    """``timeout``: each call's deadline; ``wait_ready``: how long to wait for starting
    parties; ``connect_timeout``: how long an address may refuse or not answer before
    the client gives up on it; ``max_pixels``: the largest picture it decodes."""

    parties: tuple[str, str]
    model: str = ""
    timeout: float = 120.0
    top_k: int = 3
    wait_ready: float = 60.0
    connect_timeout: float = 5.0
    max_pixels: int = MAX_PIXELS
    tls: dict[str, str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: dict[str, str] | None = None) -> ClientConfig:
        env = os.environ if env is None else env
        data = dict(data)
        if env.get(ENV_PARTIES):
            data["parties"] = [a.strip() for a in env[ENV_PARTIES].split(",")]
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"unknown client config keys: {sorted(unknown)}")
        if env.get("MPCVIT_TLS_DIR") and not data.get("tls"):
            d = Path(env["MPCVIT_TLS_DIR"])
            data["tls"] = {"ca": str(d / "ca.pem"), "cert": str(d / "client.pem"),
                           "key": str(d / "client.key")}
        parties = data.get("parties") or []
        if len(parties) != 2:
            raise ValueError("client config needs 'parties': [party0 address, party1 address]")
        try:
            config = cls(parties=(str(parties[0]), str(parties[1])),
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

    def client(self) -> Any:
        """A connected :class:`~mpcvit.party.client.PrivateInferenceClient`."""
        from .client import ClientTls, PrivateInferenceClient

        try:
            tls = ClientTls(**self.tls) if self.tls else None
        except TypeError:
            keys = sorted(self.tls or {})
            raise ValueError(f"tls needs ca (and cert, key), got {keys}") from None
        return PrivateInferenceClient(self.parties, model=self.model, timeout=self.timeout,
                                      tls=tls, max_pixels=self.max_pixels)
