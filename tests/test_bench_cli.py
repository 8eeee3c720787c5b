"""Benchmark commands' output contracts (speed is reported, never asserted)."""

from __future__ import annotations

import json

import pytest
from mpcvit.party.cli import main

pytestmark = pytest.mark.slow


def test_bench_transport_json_contract(capsys):
    assert main(["bench", "transport", "--tokens", "5", "--dim", "16", "--heads", "2",
                 "--hidden", "32", "--repeats", "1", "--runs", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("gloo_s", "grpc_s", "ratio", "gloo_bytes", "grpc_bytes", "gloo_rounds",
                "grpc_rounds"):
        assert key in res
    assert res["grpc_rounds"] == res["gloo_rounds"] > 0
    assert res["grpc_bytes"] == res["gloo_bytes"] > 0
    assert res["ratio"] == pytest.approx(res["grpc_s"] / res["gloo_s"])
    assert res["max_abs_diff"] < 0.05  # both transports computed the same block


def test_ceiling_shrink_factor():
    from mpcvit.bench.report import shrink_needed

    # 10 s against 4 s with 3 s shared: shrinking the shared part 3x gives 8/2 = 4x
    assert abs(shrink_needed(10.0, 4.0, 3.0, 4.0) - 3.0) < 1e-9
    assert shrink_needed(10.0, 2.0, 1.0, 4.0) == 1.0  # already 5x
    assert shrink_needed(10.0, 4.0, 1.0, 4.0) is None  # 9/3 = 3x even with it free
