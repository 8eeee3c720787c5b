"""Client SDK: fixed-point encoding, secret sharing, error mapping, and no torch import."""

from __future__ import annotations

import subprocess
import sys

import grpc
import numpy as np
import pytest
from mpcvit.party import shares
from mpcvit.party.client import (
    ClientError,
    InvalidInput,
    ModelInfo,
    ModelNotFound,
    PartyStats,
    PartyUnavailable,
    Prediction,
    RequestTimeout,
    RequestTooLarge,
    error_from_rpc,
)


def test_client_sdk_never_imports_torch_or_crypten() -> None:
    code = (
        "import sys, mpcvit.party.client, mpcvit.commands.infer; "
        "from mpcvit.party.images import load_images; "
        "from mpcvit.party.client_config import ClientConfig; "
        "load_images(['fashion-mnist:test:0']); "
        "ClientConfig.from_dict({'parties': ['a:1', 'b:2']}).client().close(); "
        "bad = [m for m in ('torch', 'crypten') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_encoding_matches_crypten_within_one_unit() -> None:
    from mpcvit.mpc.compat import import_crypten

    crypten = import_crypten()
    import torch

    x = np.random.default_rng(0).normal(0, 3, size=1000).astype(np.float32)
    ours = shares.encode(x)
    theirs = crypten.encoder.FixedPointEncoder().encode(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(ours - theirs)) <= 1
    decoded = crypten.encoder.FixedPointEncoder().decode(torch.from_numpy(ours)).numpy()
    np.testing.assert_allclose(decoded, shares.decode(ours), atol=1e-6)


def test_round_to_nearest_and_limits() -> None:
    scale = 1 << 16
    assert shares.encode(np.array([1.0, -1.0, 0.5 / scale * 1.01, -2.6 / scale])).tolist() == [
        scale, -scale, 1, -3]
    for bad in (np.nan, np.inf, 2.0**50):
        with pytest.raises(ValueError):
            shares.encode(np.array([bad]))


def test_shares_reconstruct_with_wraparound() -> None:
    x = np.array([[0, 1, -1, 2**62, -(2**62)]], dtype=np.int64)
    s0, s1 = shares.split(x)
    assert s0.dtype == s1.dtype == np.int64
    assert np.array_equal(shares.reconstruct([s0, s1]), x)
    # Each share alone looks random: not equal to the secret, and fresh every time.
    t0, _ = shares.split(x)
    assert not np.array_equal(s0, t0)
    assert not np.array_equal(s1, x)


def test_share_wire_format_roundtrip_and_length_check() -> None:
    s = np.arange(12, dtype=np.int64).reshape(1, 3, 4) - 6
    data = shares.to_bytes(s)
    assert len(data) == 96
    assert np.array_equal(shares.from_bytes(data, (1, 3, 4)), s)
    with pytest.raises(ValueError):
        shares.from_bytes(data[:-1], (1, 3, 4))
    with pytest.raises(ValueError):
        shares.from_bytes(data, (0, 3, 4))


def test_share_bits_are_uniform() -> None:
    # Chi-square on the top byte of many shares of a constant secret.
    s0, _ = shares.split(np.full(20000, 12345, dtype=np.int64))
    top = (s0.view(np.uint64) >> np.uint64(56)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    expected = len(top) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 400  # 255 dof: p(chi2 > 400) < 1e-7


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("code, cls", [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidInput),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, RequestTooLarge),
    (grpc.StatusCode.NOT_FOUND, ModelNotFound),
    (grpc.StatusCode.UNAVAILABLE, PartyUnavailable),
    (grpc.StatusCode.DEADLINE_EXCEEDED, RequestTimeout),
    (grpc.StatusCode.INTERNAL, ClientError),
])
def test_status_mapping(code, cls) -> None:
    err = error_from_rpc(FakeRpcError(code, "why"), party=1)
    assert type(err) is cls and err.party == 1 and err.code == code
    assert "party 1" in str(err) and "why" in str(err)


def test_preprocess_and_topk() -> None:
    info = ModelInfo("m", (1, 2, 2), 3, ("a", "b", "c"), 16, (0.5,), (0.5,), 1000, 1, ("m",))
    x = info.preprocess(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    assert x.shape == (1, 2, 2) and x.dtype == np.float32
    assert x.ravel().tolist() == [-1.0, 1.0, 1.0, -1.0]
    assert info.preprocess(np.zeros((3, 3), np.uint8)).shape == (1, 2, 2)  # resized
    with pytest.raises(InvalidInput):  # raised locally: not a picture
        info.preprocess(np.zeros((3, 3, 3, 3), np.uint8))
    stats = PartyStats(0, 1.0, 0.0, 5, 2_000_000, 1, "s")
    stats1 = PartyStats(1, 1.0, 0.0, 5, 2_100_000, 1, "s")
    p = Prediction("r", np.array([0.0, 2.0, 1.0]), info.class_names, (stats, stats1), 1.0)
    top = p.top_k(2)
    assert [t[1] for t in top] == ["b", "c"] and p.label == 1
    assert abs(sum(p.probabilities()) - 1) < 1e-12
    assert p.megabytes == 2.0 and p.rounds == 5  # party 0's count, not the sum


def test_image_files_and_fashion_mnist_specs(tmp_path) -> None:
    from mpcvit.party.images import load_images, read_image

    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    (tmp_path / "a.pgm").write_bytes(b"P5\n# comment\n28 28\n255\n" + img.tobytes())
    np.save(tmp_path / "a.npy", img)
    assert np.array_equal(read_image(tmp_path / "a.pgm"), img)
    assert np.array_equal(read_image(tmp_path / "a.npy"), img)
    with pytest.raises(ValueError):
        read_image(tmp_path / "a.txt")
    ims = load_images(["fashion-mnist:test:0-2", str(tmp_path / "a.pgm")])
    assert [im.label for im in ims] == [9, 2, 1, None]  # Ankle boot, Pullover, Trouser
    assert ims[0].pixels.shape == (28, 28) and ims[0].pixels.dtype == np.uint8
    for bad in ("fashion-mnist:test:10000", "fashion-mnist:val:1", "fashion-mnist:test:x"):
        with pytest.raises(ValueError):
            load_images([bad])


# --------------------------------------------------------------------------- a newcomer's errors

HIDE = """
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ModuleNotFoundError("No module named " + repr(name), name=name)
sys.meta_path.insert(0, Hide())
from mpcvit.commands import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("module, argv", [
    ("torch", ["demo"]),
    ("torch", ["eval", "--model", "demo", "--data", "fashion-mnist"]),
    ("grpc_health", ["party", "--config", "deploy/party0.yaml"]),
    ("grpc_health", ["dealer", "--config", "deploy/dealer.yaml"]),
])
def test_missing_server_extra_is_one_line_not_a_traceback(module, argv) -> None:
    from mpcvit.commands import EXIT_MISSING_EXTRA

    proc = subprocess.run([sys.executable, "-c", HIDE.format(module=module, argv=argv)],
                          capture_output=True, text=True)
    assert proc.returncode == EXIT_MISSING_EXTRA, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"'{module}'" in lines[0] and "pip install 'mpcvit[server]'" in lines[0]


def test_infer_never_needs_the_server_extra() -> None:
    proc = subprocess.run([sys.executable, "-c", HIDE.format(
        module="torch", argv=["infer", "--config", "/nonexistent.yaml", "x.png"])],
        capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot read /nonexistent.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def _free_port() -> int:
    from mpcvit.party.local import free_port

    return free_port()


def test_wrong_port_is_reported_within_the_connect_timeout() -> None:
    from mpcvit.party.client import PartyUnreachable, PrivateInferenceClient

    dead = f"127.0.0.1:{_free_port()}"
    with PrivateInferenceClient([dead, dead]) as client:
        # wait_ready would wait 600 s for a starting party; nothing listens here, so the
        # client's 2 s connect timeout ends it with the refusal.
        with pytest.raises(PartyUnreachable) as err:
            client.wait_ready(600, connect_timeout=2)
    message = str(err.value)
    assert f"party 0 at {dead}" in message and "within 2 s" in message
    assert "Connection refused" in message


@pytest.fixture
def foreign_grpc_server():
    """A real gRPC server that is not an mpcvit party: health checking and reflection."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    reflection.enable_server_reflection(["grpc.health.v1.Health",
                                         reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_a_server_that_is_not_a_party_is_named(foreign_grpc_server) -> None:
    from mpcvit.party.client import NotAParty, PrivateInferenceClient

    with PrivateInferenceClient([foreign_grpc_server, foreign_grpc_server]) as client:
        with pytest.raises(NotAParty) as err:
            client.wait_ready(600, connect_timeout=2)
    message = str(err.value)
    assert f"party 0 at {foreign_grpc_server} is not an mpcvit party" in message
    assert "UNIMPLEMENTED" in message and "grpc.health.v1.Health" in message


def test_infer_cli_exit_codes_for_unreachable_parties_and_bad_config(tmp_path) -> None:
    from mpcvit.commands.infer import EXIT_PARTIES, EXIT_USAGE

    dead = f"127.0.0.1:{_free_port()}"
    config = tmp_path / "client.yaml"
    config.write_text(f"parties: [{dead}, {dead}]\nconnect_timeout: 1\nwait_ready: 600\n")
    cli = [sys.executable, "-m", "mpcvit.commands", "infer", "--config"]
    proc = subprocess.run([*cli, str(config), "fashion-mnist:test:0"], capture_output=True,
                          text=True)
    assert proc.returncode == EXIT_PARTIES, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert dead in proc.stderr and "Connection refused" in proc.stderr
    config.write_text("parties: [a:1]\n")
    proc = subprocess.run([*cli, str(config), "x.png"], capture_output=True, text=True)
    assert proc.returncode == EXIT_USAGE and "Traceback" not in proc.stderr
    assert "parties" in proc.stderr
    help_text = subprocess.run([*cli[:-1], "--help"], capture_output=True, text=True).stdout
    assert "exit codes:" in help_text and "some images failed" in help_text


def test_model_info_reports_both_image_limits() -> None:
    from mpcvit.proto.generated import inference_pb2

    msg = inference_pb2.ModelInfo(name="m", input_shape=[1, 28, 28], num_classes=10,
                                  max_request_bytes=4096, max_inputs_per_request=64,
                                  max_session_batch=8)
    info = ModelInfo.from_proto(msg)
    assert (info.max_inputs_per_request, info.max_session_batch) == (64, 8)


def test_local_deploy_configs_run_on_one_machine_without_overrides() -> None:
    from pathlib import Path

    from mpcvit.party.client_config import ClientConfig
    from mpcvit.party.config import DealerConfig, PartyConfig

    local = Path(__file__).resolve().parent.parent / "deploy" / "local"
    dealer = DealerConfig.from_yaml(local / "dealer.yaml")
    p0, p1 = (PartyConfig.from_yaml(local / f"party{r}.yaml") for r in (0, 1))
    client = ClientConfig.from_yaml(local / "client.yaml", env={})
    assert (p0.rank, p1.rank) == (0, 1)
    assert p0.peer == p1.listen and p1.peer == p0.listen
    assert p0.provider.address == p1.provider.address == dealer.listen
    assert client.parties == (p0.listen, p1.listen)
    addresses = [dealer.listen, p0.listen, p1.listen]
    assert all(a.startswith("127.0.0.1:") for a in addresses) and len(set(addresses)) == 3


def test_readme_commands_parse_as_written() -> None:
    """Every `mpcvit ...` line of the README's command table has its required arguments."""
    import re
    from pathlib import Path

    from mpcvit.commands import build_parser

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    values = {"CONFIG": "demo", "DATA": "fashion-mnist", "CKPT": "demo", "SPEC": "a.yaml",
              "IMAGE...": "a.png", "M": "0.5", "S": "1", "N": "4", "DIR": "certs",
              "lan\\|wan\\|BW,RTT": "lan"}
    lines = re.findall(r"^\| `(mpcvit [^`]*)`", readme, flags=re.M)
    assert len(lines) >= 10
    for line in lines:
        line = re.sub(r"\[[^\]]*\]", "", line)  # optional parts
        line = re.sub(r"\((\S+ \S+) \\\| [^)]*\)", r"\1", line)  # first of (a | b)
        words = [values.get(w, w) for w in line.split()[1:]]
        build_parser(words[0]).parse_args(words)  # exits (fails the test) if one is missing
