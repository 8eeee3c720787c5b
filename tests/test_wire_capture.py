"""What crosses the wire and what the logs keep, during a real private inference.

Dealer + party 0 + party 1 as real processes, WITHOUT TLS so that a loopback capture sees
every payload.  The capture must hold the shares the client sent and received (so it did
see the traffic) and none of the image's encodings (raw pixels, normalised floats, fixed
point) nor the logits'.  The processes' logs must hold no tensor values either.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from mpcvit.party import shares
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.party.local import LocalCluster
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.slow

CAPTURE_LIMIT_S = 300  # tcpdump stops by itself after this, whatever happens to the test


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("plain"), model="random:demo:0",
                     party_overrides={"timeouts": {"pairing": 2, "request": 60}})
    c.start()
    try:
        c.wait_ready(180)
        yield c
    finally:
        c.stop()


def windows(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into consecutive pieces of ``size`` bytes (the last partial one dropped)."""
    return [data[i:i + size] for i in range(0, len(data) - size + 1, size)]


def private_request(cluster, image: np.ndarray) -> dict[str, bytes]:
    """One inference built from the SDK's own encoding and sharing, sent to both parties
    at once; returns every byte string a leak could show up as, and the shares."""
    with PrivateInferenceClient(cluster.party_addresses) as client:
        info = client.model_info()
    x = info.preprocess(image)
    encoded = shares.encode(x, info.precision_bits)
    halves = shares.split(encoded)
    replies: list = [None, None]

    def call(party: int) -> None:
        with grpc.insecure_channel(cluster.address(party)) as ch:
            replies[party] = inference_pb2_grpc.InferenceServiceStub(ch).Infer(
                inference_pb2.InferRequest(inputs=[inference_pb2.InputShare(
                    request_id="capture-0", shape=list(x.shape),
                    share=shares.to_bytes(halves[party]))]), timeout=120)

    threads = [threading.Thread(target=call, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(r is not None for r in replies), "a party did not answer"
    out = [r.outputs[0] for r in replies]
    logits_fixed = shares.reconstruct([shares.from_bytes(o.share, tuple(o.shape)) for o in out])
    logits = shares.decode(logits_fixed, out[0].precision_bits)
    return {
        "pixels": image.astype(np.uint8).tobytes(),
        "image_f64": x.astype("<f8").tobytes(),
        "image_f32": x.astype("<f4").tobytes(),
        "image_fixed": shares.to_bytes(encoded),
        "logits_fixed": shares.to_bytes(logits_fixed),
        "logits_f64": logits.astype("<f8").tobytes(),
        "logits_f32": logits.astype("<f4").tobytes(),
        "share0": shares.to_bytes(halves[0]),
        "share1": shares.to_bytes(halves[1]),
        "out0": out[0].share,
        "out1": out[1].share,
        "logits": logits,  # type: ignore[dict-item]
    }


class Capture:
    """``tcpdump -i lo`` on the cluster's ports, written to a pcap file, bounded in time."""

    def __init__(self, path, ports: list[int]) -> None:
        tcpdump = shutil.which("tcpdump")
        if tcpdump is None:
            pytest.skip("tcpdump is not installed (`make tcpdump` installs it; root + apt)")
        self.path = path
        cmd = ["timeout", str(CAPTURE_LIMIT_S), tcpdump, "-i", "lo", "-n", "-U", "-s", "0",
               "-B", "65536", "-w", str(path)]
        if os.geteuid() == 0:
            cmd += ["-Z", "root"]  # keep the right to write into the test's directory
        cmd.append(" or ".join(f"tcp port {p}" for p in ports))
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.listening.wait(30) or self.proc.poll() is not None:
            self.stop()
            pytest.skip("tcpdump cannot capture on lo here (needs CAP_NET_RAW): "
                        + " | ".join(self.lines[-3:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.strip())
            if "listening on" in line:
                self.listening.set()
        self.listening.set()  # exited: stop waiting

    def wait_for(self, needles: list[bytes], timeout: float) -> None:
        """Let tcpdump catch up (it writes behind the traffic) until the file holds every
        needle, or ``timeout`` seconds pass, or it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            data = self.path.read_bytes() if self.path.exists() else b""
            if all(n in data for n in needles):
                return
            time.sleep(0.5)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return " | ".join(self.lines[-3:])


def test_a_loopback_capture_holds_shares_but_no_image_or_logits_encoding(cluster,
                                                                         tmp_path) -> None:
    image = np.random.default_rng(7).integers(0, 256, (28, 28), dtype=np.uint8)
    ports = [cluster.ports["dealer"], cluster.ports[0], cluster.ports[1]]
    capture = Capture(tmp_path / "lo.pcap", ports)
    try:
        sent = private_request(cluster, image)
        capture.wait_for([sent["out0"], sent["out1"]], timeout=120)
    finally:
        summary = capture.stop()
    data = (tmp_path / "lo.pcap").read_bytes()
    # The capture saw the traffic: the client's input shares (cut into 64-byte pieces, in
    # case a packet boundary splits one) and both output shares are in it.
    for name in ("share0", "share1"):
        pieces = windows(sent[name], 64)
        found = sum(p in data for p in pieces)
        assert found >= 0.9 * len(pieces), f"{name}: {found}/{len(pieces)} ({summary})"
    assert sent["out0"] in data and sent["out1"] in data, summary
    # No encoding of the image or the logits, not even 8 values of it in a row.
    for name, size in (("pixels", 32), ("image_f64", 64), ("image_f32", 32),
                       ("image_fixed", 64), ("logits_fixed", 16), ("logits_f64", 16),
                       ("logits_f32", 16)):
        leaked = [i for i, p in enumerate(windows(sent[name], size)) if p in data]
        assert not leaked, f"{name} crossed the wire (pieces {leaked[:5]})"


def test_logs_hold_no_tensor_values(cluster) -> None:
    image = np.random.default_rng(11).integers(0, 256, (28, 28), dtype=np.uint8)
    sent = private_request(cluster, image)
    text = "\n".join(cluster.logs(who, tail=100_000) for who in ("dealer", 0, 1))
    assert "event=session_done" in text and "event=infer_done" in text
    # Shares and ring elements are uniform int64s (about 19 digits).
    assert not re.search(r"\d{15,}", text)
    for v in sent["logits"]:
        assert not re.search(rf"(?<![\d.]){re.escape(f'{v:.4f}')}(?!\d)", text), v
    for name in ("share0", "share1", "out0", "out1", "image_fixed"):
        for piece in windows(sent[name], 8)[:32]:
            assert piece.hex() not in text, name


def test_every_server_warns_that_roles_are_unchecked_without_tls(cluster) -> None:
    for who in ("dealer", 0, 1):
        lines = [ln for ln in cluster.logs(who, tail=100_000).splitlines()
                 if "event=no_tls" in ln]
        assert lines and '"level": "WARNING"' in lines[0], (who, lines)
        assert "anyone who can reach this port can act as any party" in lines[0]
