"""Configuration of a party server and of the dealer (YAML, with env/CLI overrides).

One file per process (``deploy/party0.yaml`` ...).  Addresses can be overridden by
environment variables so the same files serve Docker Compose (service host names) and
local runs (127.0.0.1 and free ports): ``MPCVIT_LISTEN``, ``MPCVIT_PEER``,
``MPCVIT_DEALER``, ``MPCVIT_MODEL``, ``MPCVIT_PROVIDER``, ``MPCVIT_PROTOCOL``;
``MPCVIT_TLS_DIR`` turns on
mutual TLS with ``ca.pem`` and ``<role>.pem``/``<role>.key`` from that directory (the
layout ``mpcvit certs`` writes; roles dealer, party0, party1, client; a party also trusts
``client-ca.pem`` there, if present).  ``{ordinal}`` in
a party's addresses becomes its StatefulSet replica ordinal (see ``ordinal.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mpcvit.mpc.config import ProviderSpec, Timeouts, TlsConfig, load_yaml
from mpcvit.mpc.errors import ConfigError

from .ordinal import expand_ordinal

ENV_TLS_DIR = "MPCVIT_TLS_DIR"  # directory with ca.pem and <role>.pem/.key: turns on mTLS

ENV_OVERRIDES = {
    "listen": "MPCVIT_LISTEN",
    "peer": "MPCVIT_PEER",
    "dealer": "MPCVIT_DEALER",
    "model": "MPCVIT_MODEL",
    "provider": "MPCVIT_PROVIDER",
    "protocol": "MPCVIT_PROTOCOL",
}


@dataclass(frozen=True)
class ServiceLimits:
    """What one party accepts, and how it batches queued requests into sessions."""

    max_request_bytes: int = 4 << 20
    max_inputs_per_request: int = 64
    max_pending: int = 256
    max_concurrent_rpcs: int = 64  # beyond this, calls get RESOURCE_EXHAUSTED at once
    max_batch: int = 1  # requests one secure session may carry (more: they share its rounds)
    max_wait: float = 0.0  # seconds the leader waits for a batch to fill
    # Single-image sessions whose correlated randomness the parties fetch from the
    # dealer while idle (offline phase); 0 prepares none.
    offline_sessions: int = 0
    # A session of at most this many images that finds nothing prepared (a busy
    # service) fetches its randomness in a few bulk requests just before its online
    # phase; larger ones, or all with 0, fetch it during the online phase, tuple by
    # tuple.  Measured (docs/benchmarks.md): bulk wins for single images; at 8 it made
    # no difference.
    bulk_prepare_max_batch: int = 0

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ConfigError("limits.max_request_bytes must be at least 1024")
        for name in ("max_inputs_per_request", "max_pending", "max_batch",
                     "max_concurrent_rpcs"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"limits.{name} must be at least 1")
        if self.max_wait < 0:
            raise ConfigError("limits.max_wait must be >= 0")
        if not 0 <= int(self.offline_sessions) <= 64:
            raise ConfigError("limits.offline_sessions must be between 0 and 64")
        if int(self.bulk_prepare_max_batch) < 0:
            raise ConfigError("limits.bulk_prepare_max_batch must be >= 0")


@dataclass(frozen=True)
class ServiceTimeouts:
    """Seconds.  ``pairing``: how long either party holds a half whose twin the other
    party never announced (then DEADLINE_EXCEEDED); ``request``: the longest a paired
    half may wait for its session; ``peer_connect``: one attempt to reach the peer."""

    pairing: float = 10.0
    request: float = 300.0
    peer_connect: float = 5.0

    def __post_init__(self) -> None:
        for name in ("pairing", "request", "peer_connect"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"timeouts.{name} must be positive")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics over HTTP (``GET /metrics``) on ``port``, on the interface of
    the server's ``listen`` address.  Off unless enabled."""

    enabled: bool = False
    port: int = 9090

    @classmethod
    def from_value(cls, value: Any) -> MetricsConfig:
        if not value:
            return cls()
        if not isinstance(value, dict) or set(value) - {"enabled", "port"}:
            raise ConfigError("metrics takes {enabled: bool, port: int}")
        out = cls(enabled=bool(value.get("enabled", True)), port=int(value.get("port", 9090)))
        if not 0 < out.port < 65536:
            raise ConfigError("metrics.port must be 1..65535")
        return out


def side_ports(data: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics`` and ``health_port`` settings shared by party and dealer configs.

    ``health_port`` (0: off) serves only grpc.health.v1, in plaintext, for Kubernetes'
    gRPC probes, which cannot present a client certificate to the mutual-TLS port."""
    health_port = int(data.get("health_port") or 0)
    if not 0 <= health_port < 65536:
        raise ConfigError("health_port must be 0 (off) or 1..65535")
    return {"metrics": MetricsConfig.from_value(data.get("metrics")), "health_port": health_port}


@dataclass(frozen=True)
class PartyConfig:
    rank: int
    listen: str
    peer: str
    provider: ProviderSpec
    timeouts: Timeouts = field(default_factory=Timeouts)
    service_timeouts: ServiceTimeouts = field(default_factory=ServiceTimeouts)
    limits: ServiceLimits = field(default_factory=ServiceLimits)
    tls: TlsConfig | None = None
    model: str = "demo"  # party 0: checkpoint name or path
    model_name: str = ""  # name clients ask for; defaults to the checkpoint's stem
    # party 0: the protocol plan to serve instead of the checkpoint's (a named plan
    # default/lan/wan/fss, a plan file, or block.field=variant items; models/plan.py)
    protocol: str | None = None
    dataset: str | None = "fashion-mnist"  # normalisation and class names
    log_format: str = "json"
    log_level: str = "INFO"
    chunk_bytes: int = 4 << 20
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health_port: int = 0  # see side_ports

    def __post_init__(self) -> None:
        if self.rank not in (0, 1):
            raise ConfigError(f"rank must be 0 or 1, got {self.rank!r}")
        if not self.listen or not self.peer:
            raise ConfigError("listen and peer addresses are required")
        if self.log_format not in ("json", "text"):
            raise ConfigError("log_format must be json or text")
        if self.protocol:
            from mpcvit.models.plan import ModelPlan

            try:
                ModelPlan.parse(self.protocol)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"protocol: {exc}") from None

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).stem

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: dict[str, str] | None = None) -> PartyConfig:
        data = dict(data)
        env = os.environ if env is None else env
        for key, var in ENV_OVERRIDES.items():
            if env.get(var):
                data[key] = env[var]
        data = expand_ordinal(data, env)
        known = {"rank", "listen", "peer", "dealer", "provider", "timeouts", "limits", "tls",
                 "model", "model_name", "dataset", "log_format", "log_level", "chunk_bytes",
                 "metrics", "health_port", "protocol"}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown party config keys: {sorted(unknown)}")
        if "rank" not in data:
            raise ConfigError("party config needs 'rank'")
        tls = _tls(data.get("tls"), env, f"party{int(data['rank'])}")
        raw_timeouts = dict(data.get("timeouts") or {})
        service_keys = {"pairing", "request", "peer_connect"}
        service_timeouts = ServiceTimeouts(
            **{k: float(v) for k, v in raw_timeouts.items() if k in service_keys})
        try:
            timeouts = Timeouts(**{k: float(v) for k, v in raw_timeouts.items()
                                   if k not in service_keys})
            limits = ServiceLimits(**(data.get("limits") or {}))
        except TypeError as exc:
            raise ConfigError(f"bad timeouts/limits: {exc}") from None
        kind = str(data.get("provider") or "dealer")
        provider = ProviderSpec(kind=kind, address=data.get("dealer") if kind == "dealer" else None,
                                tls=tls, timeout=timeouts.dealer,
                                connect_timeout=timeouts.dealer_connect)
        return cls(
            rank=int(data["rank"]), listen=str(data.get("listen", "")),
            peer=str(data.get("peer", "")), provider=provider, timeouts=timeouts,
            service_timeouts=service_timeouts, limits=limits, tls=tls,
            model=str(data.get("model", "demo")), model_name=str(data.get("model_name") or ""),
            protocol=str(data["protocol"]) if data.get("protocol") else None,
            dataset=data.get("dataset", "fashion-mnist"),
            log_format=str(data.get("log_format", "json")),
            log_level=str(data.get("log_level", "INFO")),
            chunk_bytes=int(data.get("chunk_bytes", 4 << 20)), **side_ports(data),
        )

    @classmethod
    def from_yaml(cls, path: str | Path, env: dict[str, str] | None = None) -> PartyConfig:
        return cls.from_dict(load_yaml(path), env)

    def with_overrides(self, **changes: Any) -> PartyConfig:
        """Apply CLI overrides (None means keep)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "dealer" in changes or "provider" in changes:
            kind = changes.pop("provider", self.provider.kind)
            address = changes.pop("dealer", self.provider.address)
            changes["provider"] = ProviderSpec(
                kind=kind, address=address if kind == "dealer" else None, tls=self.tls,
                timeout=self.timeouts.dealer, connect_timeout=self.timeouts.dealer_connect)
        return replace(self, **changes)


@dataclass(frozen=True)
class DealerLimits:
    """How many dealer sessions may be open, and for how long an idle one is kept.

    ``sessions_per_caller`` bounds the sessions one caller (a party's certificate role at
    one address) holds open, so one caller cannot fill the table for the others.  A party
    holds its ``limits.offline_sessions`` prepared sessions plus the running one; a
    restarted party may still hold its previous life's for up to ``idle_ttl``, so keep the
    cap above twice ``offline_sessions`` + 2.  ``idle_ttl`` (seconds) must exceed the
    longest pause between one party's dealer calls inside a session; sessions prepared
    offline may expire sooner than they run: the parties no longer need the dealer then.
    """

    max_sessions: int = 1024
    sessions_per_caller: int = 32
    idle_ttl: float = 60.0

    def __post_init__(self) -> None:
        if int(self.max_sessions) < 1 or int(self.sessions_per_caller) < 1:
            raise ConfigError("limits.max_sessions and limits.sessions_per_caller must be >= 1")
        if not float(self.idle_ttl) > 0:
            raise ConfigError("limits.idle_ttl must be positive (seconds)")

    @classmethod
    def from_value(cls, value: Any) -> DealerLimits:
        if not value:
            return cls()
        if not isinstance(value, dict) or set(value) - {"max_sessions", "sessions_per_caller",
                                                        "idle_ttl"}:
            raise ConfigError("dealer limits take max_sessions, sessions_per_caller, idle_ttl")
        return cls(**value)


@dataclass(frozen=True)
class DealerConfig:
    listen: str
    tls: TlsConfig | None = None
    log_format: str = "json"
    log_level: str = "INFO"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    health_port: int = 0  # see side_ports
    limits: DealerLimits = field(default_factory=DealerLimits)

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: dict[str, str] | None = None) -> DealerConfig:
        data = dict(data)
        env = os.environ if env is None else env
        if env.get("MPCVIT_LISTEN"):
            data["listen"] = env["MPCVIT_LISTEN"]
        unknown = set(data) - {"listen", "tls", "log_format", "log_level", "metrics",
                               "health_port", "limits"}
        if unknown:
            raise ConfigError(f"unknown dealer config keys: {sorted(unknown)}")
        tls = _tls(data.get("tls"), env, "dealer")
        if tls is not None and (tls.client_ca or tls.allowed_clients is not None):
            raise ConfigError("the dealer serves no clients: tls.client_ca and "
                              "tls.allowed_clients belong in a party's config")
        return cls(listen=str(data.get("listen", "0.0.0.0:50050")), tls=tls,
                   log_format=str(data.get("log_format", "json")),
                   log_level=str(data.get("log_level", "INFO")),
                   limits=DealerLimits.from_value(data.get("limits")), **side_ports(data))

    @classmethod
    def from_yaml(cls, path: str | Path, env: dict[str, str] | None = None) -> DealerConfig:
        return cls.from_dict(load_yaml(path), env)


def listen_host(listen: str) -> str:
    """The interface part of a ``host:port`` listen address (``[::]:1`` -> ``::``)."""
    return listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"


TLS_FILES = ("ca", "cert", "key")
TLS_KEYS = {*TLS_FILES, "server_name", "client_ca", "allowed_clients"}


def _tls(value: Any, env: dict[str, str] | os._Environ, role: str) -> TlsConfig | None:
    """The ``tls:`` mapping; without its three files, those of ``$MPCVIT_TLS_DIR``
    (so a file may set only ``allowed_clients`` and take the files from the directory)."""
    from_dir = tls_from_dir(env, role)
    if not value:
        return from_dir
    if not isinstance(value, dict) or set(value) - TLS_KEYS:
        raise ConfigError(f"tls takes {sorted(TLS_KEYS)}")
    files = set(TLS_FILES) & set(value)
    if files and files != set(TLS_FILES):
        raise ConfigError("tls needs ca, cert and key paths together")
    if files:
        return TlsConfig(**value)
    if from_dir is None:
        raise ConfigError("tls without ca, cert and key needs MPCVIT_TLS_DIR")
    return replace(from_dir, **value)


def tls_from_dir(env: dict[str, str] | os._Environ, role: str) -> TlsConfig | None:
    """mTLS files of ``role`` from ``$MPCVIT_TLS_DIR`` (None when the variable is unset).

    A party also trusts ``client-ca.pem`` there, if present (clients with their own CA)."""
    directory = env.get(ENV_TLS_DIR)
    if not directory:
        return None
    d = Path(directory)
    client_ca = d / "client-ca.pem"
    return TlsConfig(ca=str(d / "ca.pem"), cert=str(d / f"{role}.pem"), key=str(d / f"{role}.key"),
                     client_ca=str(client_ca) if role.startswith("party") and client_ca.is_file()
                     else None)
