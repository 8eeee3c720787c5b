"""Who is calling: the role each certificate states, checked on every RPC.

Every certificate of a deployment names its holder's role in one URI subject alternative
name: ``mpcvit://party/0``, ``mpcvit://party/1``, ``mpcvit://dealer`` or
``mpcvit://client/NAME``.  TLS proves the caller holds a certificate some trusted CA
signed; this module decides what that certificate may do:

* the dealer serves parties, each only as its own rank;
* a party's PeerService accepts only the other party, and the stream's HELLO must claim
  the rank the certificate states;
* a party's InferenceService accepts clients (optionally only named ones).

With a separate client CA (``TlsConfig.client_ca``) the issuer counts too: a party or
dealer role must be signed by a certificate in ``ca``, a client role by one in
``client_ca``, so whoever issues client certificates cannot mint a party.

Without TLS nothing can be checked: :meth:`RoleChecker.check` returns None and anyone who
reaches a port can act as any role (each server logs a warning at start-up).

The parsing and the decision are plain functions over ``cryptography`` objects, testable
without a network; :meth:`RoleChecker.check` is the thin gRPC wrapper.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography import x509

    from .config import TlsConfig

log = logging.getLogger("mpcvit.roles")

SCHEME = "mpcvit://"
PARTY, DEALER, CLIENT = "party", "dealer", "client"
# Node certificates also carry their role as a DNS name under this reserved domain (it never
# resolves): whoever dials a party or the dealer checks that name in the server's
# certificate, so a certificate of another role cannot answer in its place.
ROLE_DOMAIN = "role.mpcvit.invalid"
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CACHE_SIZE = 256


class RoleError(ValueError):
    """A certificate states no usable role, or its role may not make this call."""


@dataclass(frozen=True)
class Role:
    """One identity: ``party`` with a rank, the ``dealer``, or a ``client`` with a name."""

    kind: str
    rank: int | None = None
    name: str | None = None

    @classmethod
    def party(cls, rank: int) -> Role:
        return cls(PARTY, rank=int(rank))

    @classmethod
    def dealer(cls) -> Role:
        return cls(DEALER)

    @classmethod
    def client(cls, name: str) -> Role:
        if not CLIENT_NAME.fullmatch(name):
            raise RoleError(f"bad client name {name!r}: letters, digits, '.', '_' and '-', "
                            "at most 64, starting with a letter or digit")
        return cls(CLIENT, name=name)

    @property
    def uri(self) -> str:
        """The URI SAN that states this role in a certificate."""
        return SCHEME + str(self)

    @property
    def server_name(self) -> str:
        """The DNS SAN that a node of this role serves under (checked by whoever dials it)."""
        if self.kind == CLIENT:
            raise RoleError("clients serve nothing")
        node = f"party{self.rank}" if self.kind == PARTY else self.kind
        return f"{node}.{ROLE_DOMAIN}"

    def __str__(self) -> str:
        if self.kind == PARTY:
            return f"party/{self.rank}"
        if self.kind == CLIENT:
            return f"client/{self.name}"
        return self.kind


def parse_uri(uri: str) -> Role:
    """The role an ``mpcvit://`` URI states (RoleError if it is not one of the forms)."""
    if not uri.startswith(SCHEME):
        raise RoleError(f"{uri!r} is not an {SCHEME} role URI")
    path = uri[len(SCHEME):]
    if path == DEALER:
        return Role.dealer()
    kind, _, rest = path.partition("/")
    if kind == PARTY and re.fullmatch(r"0|[1-9][0-9]{0,2}", rest):
        return Role.party(int(rest))
    if kind == CLIENT and rest:
        return Role.client(rest)
    raise RoleError(f"unknown role URI {uri!r}")


def role_of_certificate(cert: x509.Certificate) -> Role:
    """The one role the certificate's ``mpcvit://`` URI SAN states.

    Other URIs (a SPIFFE id, say) are ignored; none, or two ``mpcvit://`` URIs, is refused:
    a certificate must not be able to choose its role per call."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
                if u.startswith(SCHEME)]
    except x509.ExtensionNotFound:
        uris = []
    if len(uris) != 1:
        raise RoleError("certificate states no mpcvit:// role URI" if not uris else
                        f"certificate states {len(uris)} mpcvit:// role URIs: {sorted(uris)}")
    return parse_uri(uris[0])


def role_of_pem(pem: bytes) -> Role:
    from cryptography import x509

    return role_of_certificate(x509.load_pem_x509_certificate(pem))


@dataclass(frozen=True)
class Allowed:
    """Which roles may make a call: some kinds, optionally only some ranks or names."""

    kinds: frozenset[str]
    ranks: frozenset[int] | None = None  # parties: None means any rank
    names: frozenset[str] | None = None  # clients: None means any client of the CA

    @classmethod
    def parties(cls, *ranks: int) -> Allowed:
        return cls(frozenset({PARTY}), ranks=frozenset(ranks) if ranks else None)

    @classmethod
    def clients(cls, names: tuple[str, ...] | list[str] | None = None) -> Allowed:
        return cls(frozenset({CLIENT}), names=None if names is None else frozenset(names))

    def admits(self, role: Role) -> bool:
        if role.kind not in self.kinds:
            return False
        if role.kind == PARTY and self.ranks is not None:
            return role.rank in self.ranks
        if role.kind == CLIENT and self.names is not None:
            return role.name in self.names
        return True

    def __str__(self) -> str:
        out = []
        for kind in sorted(self.kinds):
            if kind == PARTY and self.ranks is not None:
                out += [f"party/{r}" for r in sorted(self.ranks)]
            elif kind == CLIENT and self.names is not None:
                out += [f"client/{n}" for n in sorted(self.names)] or ["no client"]
            else:
                out.append(kind if kind == DEALER else f"{kind}/*")
        return " or ".join(out)


@dataclass(frozen=True)
class Trust:
    """Which CA certificates may vouch for which kind of role.

    ``clients`` None: one CA for everything (the TLS handshake already checked the chain,
    so only the role URI decides).  Otherwise node roles must be signed directly by a
    certificate in ``nodes`` and client roles by one in ``clients``.
    """

    nodes: tuple[x509.Certificate, ...] = ()
    clients: tuple[x509.Certificate, ...] | None = None

    @classmethod
    def from_pem(cls, nodes: bytes, clients: bytes | None = None) -> Trust:
        from cryptography import x509

        return cls(tuple(x509.load_pem_x509_certificates(nodes)),
                   None if clients is None else tuple(x509.load_pem_x509_certificates(clients)))

    def check_issuer(self, cert: x509.Certificate, role: Role) -> None:
        if self.clients is None:
            return
        issuers, which = ((self.clients, "the client CA") if role.kind == CLIENT
                          else (self.nodes, "the CA of parties and dealer"))
        for ca in issuers:
            try:
                cert.verify_directly_issued_by(ca)
                return
            except Exception:  # noqa: BLE001 - wrong issuer, signature or algorithm
                continue
        raise RoleError(f"a {role.kind} certificate must be signed by {which}")


def authorize(cert: x509.Certificate, allowed: Allowed, trust: Trust) -> Role:
    """The caller's role if ``allowed`` admits it; RoleError (naming both) if not."""
    try:
        role = role_of_certificate(cert)
    except RoleError as exc:
        raise RoleError(f"{exc}; expected {allowed}") from None
    trust.check_issuer(cert, role)
    return _admit(role, allowed)


def _admit(role: Role, allowed: Allowed) -> Role:
    if not allowed.admits(role):
        raise RoleError(f"expected {allowed}, the caller's certificate is {role}")
    return role


class RoleChecker:
    """Checks the caller of each RPC against the roles allowed to make it.

    Built once per server from its TLS config (None: plaintext, nothing to check).
    Certificates are parsed and their issuer verified once, then cached by their bytes.
    """

    def __init__(self, trust: Trust | None) -> None:
        self.trust = trust
        self._cache: OrderedDict[bytes, Role | RoleError] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def from_tls(cls, tls: TlsConfig | None) -> RoleChecker:
        if tls is None:
            return cls(None)
        ca, _, _ = tls.read()
        return cls(Trust.from_pem(ca, tls.read_client_ca()))

    @property
    def enabled(self) -> bool:
        return self.trust is not None

    def _role_of_pem(self, pem: bytes) -> Role | RoleError:
        """The role (or the reason there is none) of one peer certificate, cached."""
        from cryptography import x509

        with self._lock:
            hit = self._cache.get(pem)
            if hit is not None:
                self._cache.move_to_end(pem)
                return hit
        try:
            cert = x509.load_pem_x509_certificate(pem)
            role: Role | RoleError = role_of_certificate(cert)
            self.trust.check_issuer(cert, role)
        except RoleError as exc:  # (a ValueError too: caught first)
            role = exc
        except ValueError as exc:
            role = RoleError(f"unreadable peer certificate: {exc}")
        with self._lock:
            self._cache[pem] = role
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return role

    def role_of(self, auth_context: dict[str, list[bytes]], allowed: Allowed) -> Role | None:
        """The caller's role from a gRPC auth context (None without TLS)."""
        if self.trust is None:
            return None
        pems = auth_context.get("x509_pem_cert") or []
        if not pems:
            raise RoleError(f"no client certificate; expected {allowed}")
        role = self._role_of_pem(pems[0])
        if isinstance(role, RoleError):
            raise RoleError(f"{role}; expected {allowed}")
        return _admit(role, allowed)

    def check(self, context: Any, allowed: Allowed) -> Role | None:
        """The caller's role, or abort the RPC with PERMISSION_DENIED (None without TLS)."""
        try:
            return self.role_of(context.auth_context(), allowed)
        except RoleError as exc:
            import grpc

            log.warning("event=permission_denied peer=%s reason=%s", context.peer(), exc)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {exc}")
            raise  # not reached: abort raises


def warn_unchecked(logger: Any, server: str) -> None:
    """The start-up warning of a server without TLS: roles mean nothing there."""
    logger.warning("event=no_tls server=%s: TLS is off, so callers' roles cannot be checked: "
                   "anyone who can reach this port can act as any party, the dealer or a "
                   "client. Use mutual TLS (tls: or MPCVIT_TLS_DIR) outside a test.", server)
