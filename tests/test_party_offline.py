"""Offline phase in the service: idle parties prepare the next session's randomness."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from mpcvit.party.client import PrivateInferenceClient
from mpcvit.party.local import LocalCluster

pytestmark = pytest.mark.slow


def _prepared_sessions(cluster: LocalCluster, who: int) -> list[str]:
    text = (cluster.workdir / f"party{who}.log").read_text()
    return re.findall(r"event=offline_prepared session=(\S+)", text)


def _wait_prepared(cluster: LocalCluster, count: int, limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if all(len(_prepared_sessions(cluster, r)) >= count for r in (0, 1)):
            return
        time.sleep(0.2)
    raise AssertionError(f"parties did not prepare {count} session(s):\n{cluster.logs(0)}")


def test_prepared_sessions_serve_requests_correctly(tmp_path):
    import torch
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.vit import build_model
    from mpcvit.party.infer import load_images

    model = build_model("demo").eval()
    save_checkpoint(model, tmp_path / "model.pt", extra={"dataset": "fashion-mnist"})
    cluster = LocalCluster(tmp_path / "c", model=str(tmp_path / "model.pt"), log_format="text",
                           party_overrides={"limits": {"offline_sessions": 1}})
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
    x = np.stack([info.preprocess(im.pixels) for im in ims])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = np.stack([p.logits for p in (first, second, third)])
    np.testing.assert_allclose(got, want, atol=0.05)
