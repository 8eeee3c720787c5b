"""Generate a small role-tagged PKI for mutual TLS.

Two CAs: ``ca.pem`` signs the parties and the dealer, ``client-ca.pem`` signs clients.
Every certificate states its holder's role in a URI SAN (``mpcvit://party/0``,
``mpcvit://dealer``, ``mpcvit://client/NAME``; see :mod:`mpcvit.mpc.roles`), which the
servers check on every call.  Node certificates also name the hosts others dial; client
certificates name no host and are for client authentication only.

The node CA's key is thrown away once the node certificates are signed.  The client CA's
key stays in ``client-ca.key`` so that :func:`issue_client` can add clients later: keep
that file with whoever admits clients, never on a party.

For demos and tests: production deployments bring their own CAs.  Needs the
``cryptography`` package (a server dependency, not one of the client SDK's).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING

from .config import TlsConfig
from .roles import CLIENT, Role

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import (
        CertificateIssuerPrivateKeyTypes,
        PrivateKeyTypes,
    )

CA_FILE, CLIENT_CA_FILE, CLIENT_CA_KEY = "ca.pem", "client-ca.pem", "client-ca.key"


def role_for_node(node: str) -> Role:
    """The role of a file stem: ``dealer``, ``party<N>``, ``client``, ``client-<NAME>``."""
    if node == "dealer":
        return Role.dealer()
    if re.fullmatch(r"party(0|[1-9][0-9]?)", node):
        return Role.party(int(node[5:]))
    if node == "client":
        return Role.client("client")
    if node.startswith("client-"):
        return Role.client(node[len("client-"):])
    raise ValueError(f"node {node!r} has no role: use dealer, party<N>, client or "
                     "client-<name>")


def client_stem(name: str) -> str:
    """File stem of client ``name``'s pair (``client`` itself is ``client.pem``)."""
    return "client" if name == "client" else f"client-{name}"


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem(obj: x509.Certificate | PrivateKeyTypes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_key(path: Path, key: PrivateKeyTypes) -> None:
    path.write_bytes(_pem(key))
    path.chmod(0o600)


def _make_ca(name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue(ca_cert: x509.Certificate, ca_key: CertificateIssuerPrivateKeyTypes, role: Role,
           hosts: list[str], days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf for ``role``: its URI SAN, the ``hosts`` (nodes only) and its key usage."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(role.uri)]
    if role.kind != CLIENT:
        names.append(x509.DNSName(role.server_name))
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    # Nodes dial each other (client auth) and serve (server auth); clients only dial.
    usage = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role.kind != CLIENT:
        usage.append(ExtendedKeyUsageOID.SERVER_AUTH)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"mpcvit {role}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def generate_pki(
    out_dir: str | Path,
    nodes: list[str],
    *,
    hosts: list[str] | None = None,
    ca_name: str = "mpcvit demo CA",
    days: int = 365,
    client_ca: bool = True,
) -> dict[str, TlsConfig]:
    """Write the CA(s) and ``<node>.pem``/``<node>.key`` for each node; return TLS configs.

    Each node's role comes from its name (:func:`role_for_node`).  Node certificates are
    valid for ``hosts`` (default: localhost and 127.0.0.1) and the node's own name, so
    Compose service names work.  With ``client_ca`` (the default) clients get their own
    CA, ``client-ca.pem``, which the parties' configs trust beside ``ca.pem``; without,
    one CA signs everything and only the role URIs tell clients from nodes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roles = {node: role_for_node(node) for node in nodes}
    ca_cert, ca_key = _make_ca(ca_name, days)
    (out / CA_FILE).write_bytes(_pem(ca_cert))
    client_ca_path: Path | None = None
    client_signer = (ca_cert, ca_key)
    if client_ca:
        client_signer = _make_ca(f"{ca_name} (clients)", days)
        client_ca_path = out / CLIENT_CA_FILE
        client_ca_path.write_bytes(_pem(client_signer[0]))
        _write_key(out / CLIENT_CA_KEY, client_signer[1])
    configs = {}
    for node, role in roles.items():
        if role.kind == CLIENT:
            cert, key = _issue(*client_signer, role, [], days)
        else:
            cert, key = _issue(ca_cert, ca_key, role, [*(hosts or ["localhost", "127.0.0.1"]),
                                                       node], days)
        cert_path, key_path = out / f"{node}.pem", out / f"{node}.key"
        cert_path.write_bytes(_pem(cert))
        _write_key(key_path, key)
        party_trusts_clients = role.kind == "party" and client_ca_path is not None
        configs[node] = TlsConfig(
            ca=str(out / CA_FILE), cert=str(cert_path), key=str(key_path),
            client_ca=str(client_ca_path) if party_trusts_clients else None)
    return configs


def issue_client(out_dir: str | Path, name: str, *, days: int = 365) -> TlsConfig:
    """Sign one more client certificate with the client CA that :func:`generate_pki` left
    in ``out_dir``; write ``client-<name>.pem``/``.key`` and return the client's config."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    out = Path(out_dir)
    try:
        ca_cert = x509.load_pem_x509_certificate((out / CLIENT_CA_FILE).read_bytes())
        ca_key = serialization.load_pem_private_key((out / CLIENT_CA_KEY).read_bytes(), None)
    except OSError as exc:
        raise ValueError(f"no client CA in {out} ({exc.strerror}: {exc.filename}); run "
                         "`mpcvit certs` there first") from None
    role = Role.client(name)
    cert, key = _issue(ca_cert, ca_key, role, [], days)
    stem = client_stem(name)
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    if cert_path.exists():
        raise ValueError(f"{cert_path} exists already: client names are unique")
    cert_path.write_bytes(_pem(cert))
    _write_key(key_path, key)
    return TlsConfig(ca=str(out / CA_FILE), cert=str(cert_path), key=str(key_path))
