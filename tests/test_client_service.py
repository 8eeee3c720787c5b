"""The client against real servers: pictures of every kind classified end to end, a bad
file among good ones, the dealer's port given as a party, and the reported limits.

One cluster (dealer + party 0 + party 1, each its own process, real gRPC and CrypTen)
serves the shipped demo checkpoint, so a converted picture can be checked to get the
same class as the Fashion-MNIST image it was made from.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from mpcvit.commands.infer import EXIT_PARTIES, EXIT_SOME_FAILED
from mpcvit.party.client import InvalidInput, NotAParty, PrivateInferenceClient
from mpcvit.party.images import load_images
from mpcvit.party.local import LocalCluster

pytestmark = pytest.mark.slow
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"), model="demo")
    c.start()
    try:
        c.wait_ready(240)
        yield c
    finally:
        c.stop()


def photo_of(pixels: np.ndarray) -> np.ndarray:
    """A Fashion-MNIST image as a product photo: negated, in colour, 150 px, on white."""
    big = np.asarray(Image.fromarray(255 - pixels).resize((150, 150), Image.BICUBIC))
    out = np.full((200, 300, 3), 255, np.uint8)
    out[25:175, 75:225] = np.stack([big, big, big], -1)
    return out


def test_pictures_of_every_kind_get_the_class_of_their_original(cluster, tmp_path) -> None:
    originals = load_images(["fashion-mnist:test:0-2"])  # ankle boot, pullover, trouser
    with PrivateInferenceClient(cluster.party_addresses, timeout=300) as client:
        client.wait_ready(120, connect_timeout=10)
        for im in originals:
            expected = client.infer(im.pixels).label
            assert expected == im.label
            jpeg = io.BytesIO()
            Image.fromarray(photo_of(im.pixels)).save(jpeg, "JPEG", quality=90)
            (tmp_path / "photo.jpg").write_bytes(jpeg.getvalue())
            rgba = np.concatenate([np.stack([im.pixels] * 3, -1),
                                   np.full((28, 28, 1), 255, np.uint8)], -1)
            grey56 = np.repeat(np.repeat(im.pixels, 2, 0), 2, 1)
            for source in (tmp_path / "photo.jpg", jpeg.getvalue(), photo_of(im.pixels),
                           rgba, grey56, grey56 / 255.0):
                assert client.infer(source).label == expected, type(source)
        with pytest.raises(InvalidInput, match="not a picture"):
            client.infer(b"hello")


def test_a_bad_file_among_good_ones_is_reported_and_the_rest_classified(cluster,
                                                                        tmp_path) -> None:
    good = tmp_path / "boot.png"
    Image.fromarray(photo_of(load_images(["fashion-mnist:test:0"])[0].pixels)).save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    config = cluster.client_config(timeout=300, connect_timeout=10)
    proc = subprocess.run(
        [sys.executable, "-m", "mpcvit.commands", "infer", "--config", str(config),
         str(good), str(bad), "fashion-mnist:test:1", str(tmp_path / "missing.png")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == EXIT_SOME_FAILED, proc.stderr
    assert "Traceback" not in proc.stderr
    out = proc.stdout.splitlines()
    assert any(line.startswith(f"{good}: predicted=Ankle boot") for line in out), out
    assert any(line.startswith("fashion-mnist:test:1: true=Pullover") for line in out), out
    assert f"{bad}: not a picture" in proc.stderr
    assert "missing.png: No such file" in proc.stderr
    assert "2 of 4 image(s) failed" in proc.stderr


def test_the_dealers_port_given_as_a_party(cluster, tmp_path) -> None:
    dealer = cluster.address("dealer")
    with PrivateInferenceClient([cluster.address(0), dealer]) as client:
        with pytest.raises(NotAParty) as err:
            client.wait_ready(600, connect_timeout=10)
    message = str(err.value)
    assert f"party 1 at {dealer} is not an mpcvit party" in message
    assert "mpcvit.v1.DealerService" in message and "dealer's port" in message
    config = tmp_path / "client.yaml"
    config.write_text(f"parties: [{cluster.address(0)}, {dealer}]\n")
    proc = subprocess.run([sys.executable, "-m", "mpcvit.commands", "infer", "--config",
                           str(config), "fashion-mnist:test:0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_PARTIES and "Traceback" not in proc.stderr
    assert "not an mpcvit party" in proc.stderr


def test_model_info_reports_the_configured_limits(cluster) -> None:
    with PrivateInferenceClient(cluster.party_addresses) as client:
        info = client.model_info()
    # deploy/party*.yaml: 64 images per request, 1 image per secure session.
    assert (info.max_inputs_per_request, info.max_session_batch) == (64, 1)


def test_waiting_for_a_starting_party_says_so(tmp_path) -> None:
    """Party 1 alone never gets the weights: the client reports it as starting, then gives
    up after wait_ready with that reason (never a silent wait)."""
    import time

    from mpcvit.party.client import PartyUnavailable
    from mpcvit.party.local import health_status

    lonely = LocalCluster(tmp_path, model="demo")
    lonely._spawn(1)
    try:
        deadline = time.monotonic() + 300
        while health_status(lonely.address(1)) != "NOT_SERVING":
            assert time.monotonic() < deadline and lonely.procs[1].poll() is None, \
                lonely.logs(1)
            time.sleep(0.5)
        lines: list[str] = []
        address = lonely.address(1)
        with PrivateInferenceClient([address, address]) as client:
            with pytest.raises(PartyUnavailable) as err:
                client.wait_ready(2, connect_timeout=10, progress=lines.append)
    finally:
        lonely.stop()
    assert lines and lines[0].startswith(f"waiting for party 0 at {address}: starting (")
    assert "not received the model" in lines[0]
    assert "parties not ready after 2 s" in str(err.value)


def test_the_shipped_demo_agrees_with_its_plaintext_model_on_200_test_images(cluster) -> None:
    """The held-out check of the shipped checkpoint: 200 real test images classified under
    MPC get the plaintext model's class. Only a near tie (top-2 plaintext logits closer
    than the secure run's fixed-point error can reach) may go either way."""
    import torch
    from mpcvit.models.checkpoint import load_checkpoint, resolve_checkpoint

    images = load_images(["fashion-mnist:test:0-199"])
    with PrivateInferenceClient(cluster.party_addresses, timeout=600) as client:
        client.wait_ready(120, connect_timeout=10)
        info = client.model_info()
        secure = client.infer_batch([im.pixels for im in images])
    model, _ = load_checkpoint(resolve_checkpoint("demo"))
    x = torch.from_numpy(np.stack([info.preprocess(im.pixels) for im in images]))
    with torch.no_grad():
        plain = model(x).numpy()
    secure_logits = np.stack([p.logits for p in secure])
    assert secure_logits.shape == plain.shape == (200, 10)
    error = np.abs(secure_logits - plain).max()
    assert error < 0.05, error
    top2 = np.sort(plain, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * error
    agree = secure_logits.argmax(1) == plain.argmax(1)
    assert agree[decided].all(), np.flatnonzero(decided & ~agree)
    assert decided.sum() >= 195
