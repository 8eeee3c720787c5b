"""Offline phase in the service: idle parties prepare the next session's randomness."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.party.local import LocalCluster

pytestmark = pytest.mark.slow


def _prepared(cluster: LocalCluster, who: int) -> list[tuple[str, int]]:
    """(session, batch size) of every offline_prepared event in a party's log, in order."""
    text = (cluster.workdir / f"party{who}.log").read_text()
    return [(s, int(b)) for s, b in
            re.findall(r"event=offline_prepared session=(\S+) batch=(\d+)", text)]


def _prepared_sessions(cluster: LocalCluster, who: int) -> list[str]:
    return [s for s, _ in _prepared(cluster, who)]


def _wait_prepared(cluster: LocalCluster, count: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(len(_prepared_sessions(cluster, r)) >= count for r in (0, 1)):
            return
        time.sleep(0.2)
    raise AssertionError(f"parties did not prepare {count} session(s):\n{cluster.logs(0)}")


def _demo_cluster(tmp_path, limits: dict):
    """A random demo model (party 0's checkpoint) and a local cluster serving it."""
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.vit import build_model

    model = build_model("demo").eval()
    save_checkpoint(model, tmp_path / "model.pt", extra={"dataset": "fashion-mnist"})
    cluster = LocalCluster(tmp_path / "c", model=str(tmp_path / "model.pt"), log_format="text",
                           party_overrides={"limits": limits})
    return model, cluster


def _assert_plaintext_logits(model, info, ims, predictions) -> None:
    import torch

    x = np.stack([info.preprocess(im.pixels) for im in ims])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = np.stack([p.logits for p in predictions])
    np.testing.assert_allclose(got, want, atol=0.05)


def test_prepared_sessions_serve_requests_correctly(tmp_path):
    from mpcvit.party.images import load_images

    model, cluster = _demo_cluster(tmp_path, {"offline_sessions": 1})
    cluster.start()
    try:
        cluster.wait_ready(180)
        ims = load_images(["fashion-mnist:test:0-2"])
        with PrivateInferenceClient(cluster.party_addresses, timeout=300) as client:
            info = client.model_info()
            # The first request runs online and teaches the parties the tuple trace.
            first = client.infer(ims[0].pixels)
            _wait_prepared(cluster, 1)
            second = client.infer(ims[1].pixels)
            _wait_prepared(cluster, 2)
            third = client.infer(ims[2].pixels)
    finally:
        cluster.stop()
    prepared0, prepared1 = _prepared_sessions(cluster, 0), _prepared_sessions(cluster, 1)
    assert prepared0[:2] == prepared1[:2]  # both parties prepared the same sessions
    assert first.stats[0].session not in prepared0
    assert second.stats[0].session == prepared0[0]  # served by the prepared session
    assert third.stats[0].session == prepared0[1]
    _assert_plaintext_logits(model, info, ims, (first, second, third))


def test_a_busy_service_fetches_a_sessions_randomness_in_bulk(tmp_path):
    """Idle parties prepare single-image sessions only; with bulk_prepare_max_batch 2, a
    batch-2 session that follows another one (whose tuple trace the parties keep) is
    prepared in bulk just before it runs, by each party on its own, and still computes
    the right logits."""
    from mpcvit.party.images import load_images

    model, cluster = _demo_cluster(tmp_path, {"offline_sessions": 1, "max_batch": 2,
                                              "max_wait": 2.0, "bulk_prepare_max_batch": 2})
    cluster.start()
    try:
        cluster.wait_ready(180)
        ims = load_images(["fashion-mnist:test:0-3"])
        with PrivateInferenceClient(cluster.party_addresses, timeout=300) as client:
            info = client.model_info()
            first = client.infer_batch([im.pixels for im in ims[:2]])  # online: the trace
            second = client.infer_batch([im.pixels for im in ims[2:]])
    finally:
        cluster.stop()
    s1, s2 = first[0].stats[0].session, second[0].stats[0].session
    assert all(p.stats[0].batch_size == 2 for p in first + second)
    assert [p.stats[0].session for p in second] == [s2, s2]
    for who in (0, 1):
        prepared = dict(_prepared(cluster, who))
        assert s1 not in prepared
        assert prepared.get(s2) == 2, cluster.logs(who)
    _assert_plaintext_logits(model, info, ims, first + second)
