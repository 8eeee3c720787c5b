"""Emulated networks: parsing, and MPC runs that really cross the shaped link."""

from __future__ import annotations

import subprocess

import mpc_programs as progs
import pytest
import torch
from mpcvit.mpc.errors import ConfigError
from mpcvit.mpc.launcher import run_parties
from mpcvit.mpc.netem import PRESETS, EmulatedNetwork, namespaces_available, parse_network


def test_presets_and_custom_links_parse():
    assert parse_network("wan") is PRESETS["wan"]
    assert PRESETS["lan"].bandwidth_bps == 3e9 and PRESETS["wan"].rtt_s == 0.040
    link = parse_network("1gbit,5ms")
    assert link.bandwidth_bps == 1e9 and link.rtt_s == 0.005
    assert parse_network("100mbit, 0.04s").rtt_s == pytest.approx(0.04)
    assert PRESETS["loopback"].transfer_seconds(1e9, 1000) == 0.0
    assert parse_network("8mbit,10ms").transfer_seconds(1e6, 3) == pytest.approx(1.0 + 0.03)
    for bad in ("fast", "10mbit", "0mbit,5ms", "10mbit,fast"):
        with pytest.raises(ConfigError):
            parse_network(bad)


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.slow
@pytest.mark.parametrize("fallback", [False, True], ids=["namespaces", "loopback-relay"])
def test_mpc_across_an_emulated_link(fallback):
    ok, why = namespaces_available()
    if not fallback:
        assert ok, f"this test needs root and iproute2 ({why}); CI runs as root"
    before = _netns_names()
    with EmulatedNetwork(parse_network("200mbit,4ms"), force_fallback=fallback) as net:
        assert net.use_namespaces is not fallback
        if not fallback:
            assert set(net.ns) <= _netns_names()
        out = run_parties(progs.small_mul, network=net, provider="dealer", timeout=120)
    for r in out:
        assert torch.allclose(r, progs.X * progs.Y, atol=1e-3)
    assert _netns_names() == before  # torn down
