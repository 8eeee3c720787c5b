"""Roles without a network: parsing each role from a certificate, the issuer rules of the
two CAs, the decision for each service, the dealer's per-caller caps and idle expiry, and
the configs that carry them.  Certificates are made here (``mpcvit.mpc.certs`` or
``cryptography`` directly); gRPC's auth context is a plain dict of the same shape."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mpcvit.mpc.certs import generate_pki, issue_client, role_for_node
from mpcvit.mpc.compat import import_crypten
from mpcvit.mpc.errors import ConfigError
from mpcvit.mpc.roles import (
    Allowed,
    Role,
    RoleChecker,
    RoleError,
    Trust,
    authorize,
    parse_uri,
    role_of_certificate,
    role_of_pem,
)

NODES = ["dealer", "party0", "party1", "client"]


def cert_of(path: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    configs = generate_pki(out, NODES)
    configs["client-alice"] = issue_client(out, "alice")
    return out, configs


def leaf(sans: list[x509.GeneralName], signer=None, key=None) -> x509.Certificate:
    """A certificate of ``key`` (default: a fresh one) with exactly these SANs, signed by
    ``signer`` (cert, key) or by itself."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(signer[0].subject if signer else name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=1)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer[1] if signer else key, hashes.SHA256())


def uri(text: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(text)


# -- parsing ----------------------------------------------------------------------------
def test_every_generated_certificate_states_its_role(pki) -> None:
    _, configs = pki
    want = {"dealer": Role.dealer(), "party0": Role.party(0), "party1": Role.party(1),
            "client": Role.client("client"), "client-alice": Role.client("alice")}
    for node, role in want.items():
        assert role_of_pem(Path(configs[node].cert).read_bytes()) == role, node
    assert str(Role.party(1)) == "party/1" and Role.party(1).uri == "mpcvit://party/1"
    assert Role.client("alice").uri == "mpcvit://client/alice"
    assert role_for_node("client-bob") == Role.client("bob")
    with pytest.raises(ValueError, match="no role"):
        role_for_node("gateway")


def test_node_certificates_name_hosts_and_client_certificates_do_not(pki) -> None:
    _, configs = pki
    dns = cert_of(configs["party0"].cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "localhost" in dns and "party0" in dns
    san = cert_of(configs["client"].cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    eku = cert_of(configs["client"].cert).extensions.get_extension_for_class(
        x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client cannot serve TLS


@pytest.mark.parametrize("text", ["mpcvit://party/0", "mpcvit://party/1", "mpcvit://dealer",
                                  "mpcvit://client/alice", "mpcvit://client/a.b-c_d"])
def test_parse_uri_round_trips(text: str) -> None:
    assert parse_uri(text).uri == text


@pytest.mark.parametrize("text", ["mpcvit://party/", "mpcvit://party/x", "mpcvit://party/01",
                                  "mpcvit://client/", "mpcvit://client/a/b",
                                  "mpcvit://client/-x", "mpcvit://dealer/0", "mpcvit://root",
                                  "https://party/0", "spiffe://mpcvit/party/0"])
def test_parse_uri_refuses_anything_else(text: str) -> None:
    with pytest.raises(RoleError):
        parse_uri(text)


def test_a_certificate_without_exactly_one_role_uri_has_no_role() -> None:
    with pytest.raises(RoleError, match="no mpcvit:// role"):
        role_of_certificate(leaf([]))
    with pytest.raises(RoleError, match="no mpcvit:// role"):
        role_of_certificate(leaf([x509.DNSName("party0"), uri("spiffe://x/party/0")]))
    with pytest.raises(RoleError, match="2 mpcvit:// role URIs"):
        role_of_certificate(leaf([uri("mpcvit://client/a"), uri("mpcvit://party/0")]))
    # Other URIs beside the role are fine.
    assert role_of_certificate(leaf([uri("spiffe://x/y"), uri("mpcvit://dealer")])) == \
        Role.dealer()


# -- deciding ---------------------------------------------------------------------------
def test_allowed_admits_only_its_roles() -> None:
    party0, party1, dealer = Role.party(0), Role.party(1), Role.dealer()
    alice, mallory = Role.client("alice"), Role.client("mallory")
    assert Allowed.parties().admits(party0) and Allowed.parties().admits(party1)
    assert Allowed.parties(0).admits(party0) and not Allowed.parties(0).admits(party1)
    for who in (dealer, alice):
        assert not Allowed.parties().admits(who)
    assert Allowed.clients().admits(alice) and Allowed.clients().admits(mallory)
    assert not Allowed.clients().admits(party0) and not Allowed.clients().admits(dealer)
    assert Allowed.clients(["alice"]).admits(alice)
    assert not Allowed.clients(["alice"]).admits(mallory)
    assert not Allowed.clients([]).admits(alice)
    assert str(Allowed.parties(1)) == "party/1" and str(Allowed.clients()) == "client/*"
    assert str(Allowed.clients(["bob", "alice"])) == "client/alice or client/bob"


def test_refusals_name_the_expected_role_and_the_role_seen(pki) -> None:
    out, configs = pki
    trust = Trust.from_pem((out / "ca.pem").read_bytes(), (out / "client-ca.pem").read_bytes())
    client = cert_of(configs["client"].cert)
    with pytest.raises(RoleError, match="expected party/0, the caller's certificate is "
                                        "client/client"):
        authorize(client, Allowed.parties(0), trust)
    with pytest.raises(RoleError, match="expected client/alice, the caller's certificate is "
                                        "client/client"):
        authorize(client, Allowed.clients(["alice"]), trust)
    assert authorize(client, Allowed.clients(), trust) == Role.client("client")
    assert authorize(cert_of(configs["party1"].cert), Allowed.parties(1), trust) == \
        Role.party(1)


def test_each_role_must_come_from_its_own_ca(pki) -> None:
    """Whoever holds the client CA's key cannot mint a party or the dealer, and a client
    role from the parties' CA is refused while clients have their own CA."""
    out, _ = pki
    node_ca = cert_of(str(out / "ca.pem"))
    client_ca = cert_of(str(out / "client-ca.pem"))
    client_ca_key = serialization.load_pem_private_key((out / "client-ca.key").read_bytes(),
                                                       None)
    trust = Trust((node_ca,), (client_ca,))
    forged = leaf([uri("mpcvit://party/0")], signer=(client_ca, client_ca_key))
    with pytest.raises(RoleError, match="party certificate must be signed by the CA of "
                                        "parties and dealer"):
        authorize(forged, Allowed.parties(0), trust)
    own_key = ec.generate_private_key(ec.SECP256R1())
    self_signed_ca = leaf([], None)
    stray = leaf([uri("mpcvit://client/eve")], signer=(self_signed_ca, own_key))
    with pytest.raises(RoleError, match="client certificate must be signed by the client CA"):
        authorize(stray, Allowed.clients(), trust)
    # With one CA for everything only the URI decides.
    assert authorize(forged, Allowed.parties(0), Trust((node_ca,), None)) == Role.party(0)


def test_checker_reads_the_auth_context(pki) -> None:
    _, configs = pki
    checker = RoleChecker.from_tls(configs["party0"])
    pem = Path(configs["party1"].cert).read_bytes()
    ctx = {"transport_security_type": [b"ssl"], "x509_pem_cert": [pem]}
    for _ in range(2):  # the second answer comes from the cache
        assert checker.role_of(ctx, Allowed.parties(1)) == Role.party(1)
        with pytest.raises(RoleError, match="expected client/\\*, the caller's certificate "
                                            "is party/1"):
            checker.role_of(ctx, Allowed.clients())
    with pytest.raises(RoleError, match="no client certificate"):
        checker.role_of({"transport_security_type": [b"ssl"]}, Allowed.parties())
    roleless = leaf([x509.DNSName("party1")]).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(RoleError, match="^certificate states no mpcvit:// role URI; "
                                        "expected party/1$"):
        checker.role_of({"x509_pem_cert": [roleless]}, Allowed.parties(1))
    with pytest.raises(RoleError, match="unreadable peer certificate"):
        checker.role_of({"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                           b"-----END CERTIFICATE-----\n"]}, Allowed.parties())
    # Without TLS there is nothing to check: no role, and no refusal.
    assert RoleChecker(None).role_of({}, Allowed.clients()) is None
    assert not RoleChecker(None).enabled and checker.enabled


# -- the dealer's table -------------------------------------------------------------------
@pytest.fixture
def dealer_state():
    import_crypten()
    from mpcvit.mpc.dealer import DealerState

    clock = [0.0]
    state = DealerState(max_sessions=100, sessions_per_caller=3, idle_ttl=30.0,
                        clock=lambda: clock[0])
    return state, clock


def test_dealer_caps_open_sessions_per_caller_only(dealer_state) -> None:
    from mpcvit.mpc.dealer import CallerLimit

    state, _ = dealer_state
    for i in range(3):
        state.open(f"s{i}", 1, 2, caller="party/1@h1")
    with pytest.raises(CallerLimit, match="party/1@h1 holds 3 open dealer sessions"):
        state.open("s3", 1, 2, caller="party/1@h1")
    # Another caller, even of the same sessions, is unaffected.
    for i in range(3):
        state.open(f"s{i}", 0, 2, caller="party/0@h0")
    assert state.held_by("party/1@h1") == 3 and state.held_by("party/0@h0") == 3
    state.close("s0", 1, caller="party/1@h1")
    state.open("s3", 1, 2, caller="party/1@h1")  # room again after a close
    # A close by someone else does not free the holder's rank.
    state.close("s1", 1, caller="party/1@elsewhere")
    assert state.held_by("party/1@h1") == 3


def test_dealer_expires_idle_sessions_and_never_reopens_an_id(dealer_state) -> None:
    from mpcvit.mpc.dealer import SessionRetired

    state, clock = dealer_state
    for i in range(3):
        state.open(f"s{i}", 1, 2, caller="party/1@h1")
    assert state.open_sessions == 3
    clock[0] = 31.0  # idle longer than idle_ttl
    assert state.open_sessions == 0 and state.held_by("party/1@h1") == 0
    state.open("fresh", 1, 2, caller="party/1@h1")
    # Fresh seeds under an expired id would silently break the party that drew from the
    # old ones: the id is refused instead.
    with pytest.raises(SessionRetired, match="expired"):
        state.open("s0", 0, 2, caller="party/0@h0")
    state.open("fresh", 0, 2, caller="party/0@h0")
    state.close("fresh", 0, caller="party/0@h0")
    state.close("fresh", 1, caller="party/1@h1")
    with pytest.raises(SessionRetired, match="closed"):
        state.open("fresh", 0, 2, caller="party/0@h0")


def test_dealer_gives_corrections_only_to_the_holder_of_rank_0(dealer_state) -> None:
    from mpcvit.proto.generated import dealer_pb2

    state, _ = dealer_state
    state.open("s", 0, 2, caller="party/0@h0")
    state.open("s", 1, 2, caller="party/1@h1")
    req = dealer_pb2.CorrectionRequest(session="s", kind="square", size0=[2], seq=0)
    with pytest.raises(PermissionError, match="rank 0"):
        state.correction(req, caller="party/1@h1")
    assert tuple(state.correction(req, caller="party/0@h0").shape) == (2,)


def test_party_usage_fits_the_default_cap() -> None:
    """A party holds its prepared sessions + the running one, and a restarted party its
    previous life's until they expire: the defaults leave room for the most a party
    config allows (offline_sessions up to 64 needs a raised cap, documented)."""
    from mpcvit.party.config import DealerLimits, ServiceLimits

    shipped = ServiceLimits(offline_sessions=1)  # deploy/party*.yaml
    assert 2 * (shipped.offline_sessions + 1) < DealerLimits().sessions_per_caller
    assert DealerLimits().idle_ttl <= 60


# -- configs ------------------------------------------------------------------------------
def test_party_tls_config_carries_the_client_ca_and_allow_list(pki, tmp_path) -> None:
    from mpcvit.party.config import PartyConfig

    out, _ = pki
    base = {"rank": 0, "listen": "127.0.0.1:1", "peer": "127.0.0.1:2", "dealer": "x:1"}
    # From the TLS directory: client-ca.pem is picked up; the YAML adds the allow-list.
    cfg = PartyConfig.from_dict({**base, "tls": {"allowed_clients": ["alice", "bob"]}},
                                env={"MPCVIT_TLS_DIR": str(out)})
    assert cfg.tls.cert == str(out / "party0.pem")
    assert cfg.tls.client_ca == str(out / "client-ca.pem")
    assert cfg.tls.allowed_clients == ("alice", "bob")
    files = {"ca": "a", "cert": "b", "key": "c"}
    assert PartyConfig.from_dict({**base, "tls": files}, env={}).tls.allowed_clients is None
    for bad in ({"allowed_clients": ["a"]}, {"ca": "a"}, {**files, "bogus": 1},
                {**files, "allowed_clients": "alice"}):
        with pytest.raises(ConfigError):
            PartyConfig.from_dict({**base, "tls": bad}, env={})


def test_dealer_config_limits(tmp_path) -> None:
    from mpcvit.party.config import DealerConfig

    cfg = DealerConfig.from_dict({"limits": {"sessions_per_caller": 8, "idle_ttl": 20}}, env={})
    assert (cfg.limits.sessions_per_caller, cfg.limits.idle_ttl) == (8, 20)
    for bad in ({"limits": {"idle_ttl": 0}}, {"limits": {"bogus": 1}},
                {"tls": {"ca": "a", "cert": "b", "key": "c", "allowed_clients": ["x"]}}):
        with pytest.raises(ConfigError):
            DealerConfig.from_dict(bad, env={})


def test_certs_command_issues_more_clients_from_the_client_ca(tmp_path) -> None:
    from mpcvit.commands import main

    assert main(["certs", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {
        "ca.pem", "client-ca.pem", "client-ca.key", "dealer.pem", "dealer.key", "party0.pem",
        "party0.key", "party1.pem", "party1.key", "client.pem", "client.key"}
    assert not (tmp_path / "ca.key").exists()  # nobody can mint nodes later
    assert main(["certs", "--out", str(tmp_path), "--client", "alice"]) == 0
    alice = cert_of(str(tmp_path / "client-alice.pem"))
    assert role_of_certificate(alice) == Role.client("alice")
    alice.verify_directly_issued_by(cert_of(str(tmp_path / "client-ca.pem")))
    assert main(["certs", "--out", str(tmp_path), "--client", "alice"]) == 2  # unique names
    assert main(["certs", "--out", str(tmp_path), "--client", "bad name"]) == 2
    assert main(["certs", "--out", str(tmp_path / "none"), "--client", "x"]) == 2


# -- the two CAs over real gRPC (in this process) -----------------------------------------
def _pem_files(tmp_path: Path, cert: x509.Certificate, key) -> tuple[str, str]:
    cert_path, key_path = tmp_path / "forged.pem", tmp_path / "forged.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_the_client_ca_cannot_mint_a_party_and_clients_cannot_reach_the_dealer(
        pki, tmp_path) -> None:
    import dataclasses
    from concurrent import futures

    import grpc
    from mpcvit.mpc.transport import PeerTransport
    from mpcvit.proto.generated import dealer_pb2, dealer_pb2_grpc, peer_pb2, peer_pb2_grpc

    out, configs = pki
    client_ca = cert_of(str(out / "client-ca.pem"))
    client_ca_key = serialization.load_pem_private_key((out / "client-ca.key").read_bytes(),
                                                       None)
    key = ec.generate_private_key(ec.SECP256R1())
    forged = leaf([uri("mpcvit://party/1")], signer=(client_ca, client_ca_key), key=key)
    cert_path, key_path = _pem_files(tmp_path, forged, key)
    as_forged = dataclasses.replace(configs["client"], cert=cert_path, key=key_path)

    transport = PeerTransport(0, 2, tls=configs["party0"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    transport.add_to_server(server)
    port = server.add_secure_port("127.0.0.1:0", configs["party0"].server_credentials())
    server.start()
    try:
        with grpc.secure_channel(f"localhost:{port}", as_forged.channel_credentials()) as ch:
            hello = peer_pb2.PeerFrame(kind=peer_pb2.PeerFrame.Kind.HELLO, src=1,
                                       cluster="mpcvit", incarnation="forged")
            with pytest.raises(grpc.RpcError) as info:
                peer_pb2_grpc.PeerServiceStub(ch).Stream(iter([hello]), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "party certificate must be signed by the CA of parties and dealer" in \
            info.value.details()
    finally:
        server.stop(0)

    import_crypten()
    from mpcvit.mpc.dealer import serve_dealer

    dealer, port = serve_dealer("127.0.0.1:0", configs["dealer"])
    try:
        # The dealer trusts only the parties' CA: a client certificate fails the handshake.
        client = configs["client"]
        with grpc.secure_channel(f"localhost:{port}", client.channel_credentials()) as ch:
            with pytest.raises(grpc.RpcError) as info:
                dealer_pb2_grpc.DealerServiceStub(ch).OpenSession(
                    dealer_pb2.OpenSessionRequest(session="s", rank=1, world_size=2),
                    timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with grpc.secure_channel(f"localhost:{port}",
                                 configs["party1"].channel_credentials()) as ch:
            reply = dealer_pb2_grpc.DealerServiceStub(ch).OpenSession(
                dealer_pb2.OpenSessionRequest(session="s", rank=1, world_size=2), timeout=10)
        assert len(reply.seed) == 8
    finally:
        dealer.stop(0)


def test_a_hello_must_claim_the_rank_the_certificate_states(tmp_path) -> None:
    """With three parties, party 1's certificate may stream to party 0, but not as 2."""
    from concurrent import futures

    import grpc
    from mpcvit.mpc.transport import PeerTransport
    from mpcvit.proto.generated import peer_pb2, peer_pb2_grpc

    configs = generate_pki(tmp_path, ["party0", "party1", "party2"])
    transport = PeerTransport(0, 3, tls=configs["party0"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    transport.add_to_server(server)
    port = server.add_secure_port("127.0.0.1:0", configs["party0"].server_credentials())
    server.start()
    try:
        with grpc.secure_channel(f"localhost:{port}",
                                 configs["party1"].channel_credentials()) as ch:
            hello = peer_pb2.PeerFrame(kind=peer_pb2.PeerFrame.Kind.HELLO, src=2,
                                       cluster="mpcvit", incarnation="liar")
            with pytest.raises(grpc.RpcError) as info:
                peer_pb2_grpc.PeerServiceStub(ch).Stream(iter([hello]), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "HELLO claims party/2, the caller's certificate is party/1" in \
            info.value.details()
    finally:
        server.stop(0)


def test_node_certificates_carry_their_role_name(pki) -> None:
    out, _ = pki
    for node, role in (("party0", Role.party(0)), ("party1", Role.party(1)),
                       ("dealer", Role.dealer())):
        san = cert_of(str(out / f"{node}.pem")).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert role.server_name in san.get_values_for_type(x509.DNSName), node
    client = cert_of(str(out / "client.pem")).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert not client.get_values_for_type(x509.DNSName)  # a client serves nothing


def test_a_server_of_another_role_cannot_answer_for_the_dealer_or_a_party(pki) -> None:
    """Party 1's certificate, valid for the same host names, serving where party 0 expects
    the dealer (it would learn party 0's seeds) or where a client expects party 0 (it would
    get both shares of the image): the handshake fails, since the dialler checks the role
    name.  The real dealer at the same kind of address is accepted."""
    from mpcvit.mpc.config import ProviderSpec
    from mpcvit.mpc.dealer import DealerProvider, serve_dealer
    from mpcvit.mpc.errors import DealerError
    from mpcvit.party.client import ClientTls, PartyUnavailable, PrivateInferenceClient

    _, configs = pki
    import_crypten()
    for serving, accepted in (("party1", False), ("dealer", True)):
        server, port = serve_dealer("127.0.0.1:0", configs[serving])
        provider = DealerProvider()
        spec = ProviderSpec(kind="dealer", address=f"localhost:{port}",
                            tls=configs["party0"], timeout=10.0)
        try:
            if accepted:
                provider.begin("handshake-ok", 0, 2, spec)
                provider.end()
            else:
                with pytest.raises(DealerError):
                    provider.begin("impostor", 0, 2, spec)
        finally:
            server.stop(0)
    impostor, port = serve_dealer("127.0.0.1:0", configs["party1"])
    # "party 1" is a socket that never answers, so the only failure the client can meet
    # first is the handshake with the impostor posing as party 0.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        c = configs["client"]
        with PrivateInferenceClient([f"localhost:{port}", f"localhost:{silent.getsockname()[1]}"],
                                    timeout=10, tls=ClientTls(c.ca, c.cert, c.key)) as client:
            with pytest.raises(PartyUnavailable) as info:
                client.model_info()
        assert info.value.party == 0  # refused at the handshake with "party 0"
    finally:
        impostor.stop(0)
        silent.close()
