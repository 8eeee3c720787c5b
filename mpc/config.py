"""Runtime configuration: addresses, timeouts, TLS, provider (loaded from YAML)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    import grpc

PROVIDERS = ("dealer", "tfp")

# gRPC channel options: retry a refused connection every quarter second (gRPC's default
# backoff grows to minutes), so a restarted peer or dealer is found again at once.
RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
]


@dataclass(frozen=True)
class TlsConfig:
    """PEM files for mutual TLS: the CA that signs parties and dealer, and this node's pair.

    ``client_ca`` (a party's server only): the CA that signs client certificates, when
    clients have their own; the party's port then trusts both, and the role checks
    (:mod:`mpcvit.mpc.roles`) demand that each role was signed by its own CA.
    ``allowed_clients``: the client names a party serves (None: any client of the CA).
    Whoever dials a party or the dealer checks the role name that node's certificate
    carries (``Role.server_name``, e.g. ``party1.role.mpcvit.invalid``), not the address
    dialled: a certificate of another role cannot answer.  ``server_name`` replaces that
    name, for certificates made without role names (the check is then the host name's).
    """

    ca: str
    cert: str
    key: str
    server_name: str | None = None
    client_ca: str | None = None
    allowed_clients: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        names = self.allowed_clients
        if names is None:
            return
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError("tls.allowed_clients must be a list of client names")
        object.__setattr__(self, "allowed_clients", tuple(names))

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for what in ("ca", "cert", "key"):
            out.append(_read_pem(getattr(self, what), f"tls.{what}"))
        return out[0], out[1], out[2]

    def read_client_ca(self) -> bytes | None:
        return None if self.client_ca is None else _read_pem(self.client_ca, "tls.client_ca")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Require a client certificate signed by ``ca`` (or ``client_ca``, if set)."""
        import grpc

        ca, cert, key = self.read()
        client_ca = self.read_client_ca()
        if client_ca is not None:
            ca = ca.rstrip(b"\n") + b"\n" + client_ca
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        import grpc

        ca, cert, key = self.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def channel_options(self, expected: Any = None) -> list[tuple[str, Any]]:
        """Channel options that make the TLS handshake check the server's role
        (``expected``, a :class:`~mpcvit.mpc.roles.Role`) or ``server_name``."""
        name = self.server_name or (expected.server_name if expected is not None else None)
        return [("grpc.ssl_target_name_override", name)] if name else []


@dataclass(frozen=True)
class Timeouts:
    """Seconds.  ``recv`` bounds every wait for a peer's message inside a protocol;
    ``dealer`` each call to the dealer; ``dealer_connect`` reaching the dealer at all
    (a dealer that is down fails a session within this, not within ``dealer``)."""

    connect: float = 30.0
    recv: float = 120.0
    dealer: float = 60.0
    dealer_connect: float = 5.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"timeouts.{f.name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class ProviderSpec:
    """Where correlated randomness comes from.

    ``dealer``: a DealerService at ``address`` (secure if the dealer does not collude).
    ``tfp``: CrypTen's trusted-first-party provider: party 0 generates every tuple and so
    can learn everything.  INSECURE: for tests and development only.
    ``timeout`` bounds each dealer call, ``connect_timeout`` reaching the dealer.
    """

    kind: str = "dealer"
    address: str | None = None
    tls: TlsConfig | None = None
    timeout: float = 60.0
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.kind not in PROVIDERS:
            raise ConfigError(f"provider must be one of {PROVIDERS}, got {self.kind!r}")
        if self.kind == "dealer" and not self.address:
            raise ConfigError("provider 'dealer' needs the dealer's address")


@dataclass(frozen=True)
class LaunchConfig:
    """A local multi-party launch (``mpc.launcher.run_parties``), read from YAML.

    ``ports``/``dealer_port`` of 0 (the default) pick free ports; ``tls.parties`` holds
    one key pair per party (all signed by the same CA) and ``tls.dealer`` the dealer's.
    """

    world_size: int = 2
    provider: str = "tfp"
    host: str = "127.0.0.1"
    ports: tuple[int, ...] = ()
    dealer_port: int = 0
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: tuple[TlsConfig, ...] | None = None
    dealer_tls: TlsConfig | None = None
    chunk_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.world_size < 2:
            raise ConfigError("world_size must be at least 2")
        if self.provider not in PROVIDERS:
            raise ConfigError(f"provider must be one of {PROVIDERS}, got {self.provider!r}")
        if self.ports and len(self.ports) != self.world_size:
            raise ConfigError("ports needs one port per party")
        if self.tls is not None and len(self.tls) != self.world_size:
            raise ConfigError("tls.parties needs one key pair per party")
        if self.chunk_bytes < 1024:
            raise ConfigError("chunk_bytes must be at least 1024")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaunchConfig:
        data = dict(data)
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown launch config keys: {sorted(unknown)}")
        timeouts = Timeouts(**_mapping(data.pop("timeouts", None) or {}, "timeouts"))
        tls = _mapping(data.pop("tls", None) or {}, "tls")
        parties = tls.get("parties")
        party_tls = None
        if parties is not None:
            if not isinstance(parties, list):
                raise ConfigError("tls.parties must be a list")
            party_tls = tuple(_tls(p, f"tls.parties[{i}]") for i, p in enumerate(parties))
        ports = tuple(int(p) for p in data.pop("ports", None) or ())
        return cls(timeouts=timeouts, tls=party_tls, dealer_tls=_tls(tls.get("dealer"),
                   "tls.dealer"), ports=ports, **data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> LaunchConfig:
        return cls.from_dict(load_yaml(path))


def _read_pem(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {path}: {exc.strerror}") from exc


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with a clear error for a missing or malformed file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a YAML mapping")
    return data


def _mapping(value: Any, name: str) -> Any:
    if isinstance(value, (dict, str)):
        return value
    raise ConfigError(f"{name} must be a mapping")


def _tls(value: Any, name: str) -> TlsConfig | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not {"ca", "cert", "key"} <= set(value):
        raise ConfigError(f"{name} needs ca, cert and key paths")
    return TlsConfig(**value)
