"""Emulated networks for benchmarks: rate-shaped veth links plus delaying relays.

Layout for two parties (root, iproute2 available)::

    netns <prefix>0                          netns <prefix>1
    party 0  ──▶ relay 127.0.0.1:RELAY ──veth (tbf)──▶ party 1   (10.77.<k>.2)
    (10.77.<k>.1)  party 0 ◀── relay ◀──────veth (tbf)── party 1 dials 127.0.0.1:RELAY
                                                      dealer (in netns 1)

The kernel shapes bandwidth (``tbf`` on both veth ends); the relays (``mpc/relay.py``)
add the round-trip delay by holding bytes, since this kernel has no ``netem``.  Each
direction crosses one relay, so a message and its answer pay one full RTT.  The dealer
sits with party 1, so party 0's dealer traffic crosses the link too.

Addresses exist only inside the namespaces this module creates; everything is torn down
on exit.  Without root (or iproute2) it says so and falls back to relays on loopback
that also rate-limit in user space.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from .errors import ConfigError
from .ports import free_port

log = logging.getLogger("mpcvit.netem")

CLONE_NEWNET = 0x40000000
PARTY_PORT = 50051
DEALER_PORT = 50061
RELAY_PEER_PORT = 50151
RELAY_DEALER_PORT = 50161


@dataclass(frozen=True)
class NetworkProfile:
    """A link: bandwidth in bits/s (None: unlimited) and round-trip time in seconds."""

    name: str
    bandwidth_bps: float | None
    rtt_s: float

    def describe(self) -> str:
        bw = "unlimited" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e6:g} Mbit/s"
        return f"{self.name}: {bw}, RTT {self.rtt_s * 1e3:g} ms"

    def transfer_seconds(self, nbytes: float, rounds: int) -> float:
        """Network time of ``rounds`` round trips moving ``nbytes`` one way."""
        wire = 0.0 if self.bandwidth_bps is None else nbytes * 8 / self.bandwidth_bps
        return wire + rounds * self.rtt_s

    def mpc_seconds(self, party_bytes: float, rounds: float) -> float:
        """Time this link adds to a 2-party CrypTen run, from one party's counters.

        CrypTen counts a party's traffic both ways (an exchange of n elements counts 2n)
        and a round is a simultaneous exchange: each direction of the full-duplex link
        carries half the count, and a round waits one one-way latency (RTT/2).
        """
        return self.transfer_seconds(party_bytes / 2, 0) + rounds * self.rtt_s / 2


# LAN: a 3 Gbit/s data-centre link with 0.8 ms RTT; WAN: 100 Mbit/s with 40 ms RTT
# (the settings MPC papers commonly use for LAN/WAN).
PRESETS = {
    "loopback": NetworkProfile("loopback", None, 0.0),
    "lan": NetworkProfile("lan", 3e9, 0.8e-3),
    "wan": NetworkProfile("wan", 100e6, 40e-3),
}

_BW_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_LINK = re.compile(
    r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:bit|bps)?\s*,\s*(\d+(?:\.\d+)?)\s*(us|ms|s)?"
)


def parse_network(text: str) -> NetworkProfile:
    """A preset name, or ``BW,RTT`` such as ``1gbit,5ms``, ``100Mbps,40ms``, ``2.5gbit,250us``
    (bandwidth in bits per second; RTT in ms when no unit is given)."""
    key = text.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    m = _LINK.fullmatch(key)
    if not m:
        raise ConfigError(
            f"network {text!r}: use one of {sorted(PRESETS)} or BW,RTT like 1gbit,5ms"
        )
    bw = float(m.group(1)) * _BW_UNITS[m.group(2)]
    rtt = float(m.group(3)) * _TIME_UNITS[m.group(4) or "ms"]
    if bw <= 0:
        raise ConfigError("bandwidth must be positive")
    return NetworkProfile(text.strip(), bw, rtt)


def enter_netns(name: str) -> None:
    """Move the calling thread (call it before starting any thread) into netns ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")


def namespaces_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False, "iproute2 (ip, tc) not installed"
    return True, ""


@dataclass(frozen=True)
class PartyView:
    """What one process needs to know to live in the emulated network."""

    netns: str | None
    listen: str
    peers: dict[int, str]
    dealer: str


class EmulatedNetwork:
    """Two parties and a dealer across an emulated link (see module docstring)."""

    def __init__(self, profile: NetworkProfile, *, force_fallback: bool = False) -> None:
        self.profile = profile
        ok, why = namespaces_available()
        self.use_namespaces = ok and not force_fallback
        self.fallback_reason = "forced" if force_fallback else why
        tag = uuid.uuid4().hex[:6]
        self.ns = [f"mpcvit-{tag}-0", f"mpcvit-{tag}-1"]
        self._veth = [f"mv{tag}a", f"mv{tag}b"]
        subnet = 64 + int(tag, 16) % 128
        self.ips = [f"10.77.{subnet}.1", f"10.77.{subnet}.2"]
        self._relays: list[subprocess.Popen] = []
        self._ports: dict[str, int] = {}

    # -- views for the processes -----------------------------------------------------
    def party(self, rank: int) -> PartyView:
        if self.use_namespaces:
            peer = 1 - rank
            dealer = (f"127.0.0.1:{DEALER_PORT}" if rank == 1
                      else f"127.0.0.1:{RELAY_DEALER_PORT}")
            return PartyView(self.ns[rank], f"0.0.0.0:{PARTY_PORT}",
                             {peer: f"127.0.0.1:{RELAY_PEER_PORT}"}, dealer)
        p = self._ports
        peer = 1 - rank
        dealer = f"127.0.0.1:{p['dealer']}" if rank == 1 else f"127.0.0.1:{p['relay_dealer']}"
        return PartyView(None, f"127.0.0.1:{p[f'party{rank}']}",
                         {peer: f"127.0.0.1:{p[f'relay_to{peer}']}"}, dealer)

    def dealer(self) -> PartyView:
        if self.use_namespaces:
            return PartyView(self.ns[1], f"0.0.0.0:{DEALER_PORT}", {}, "")
        return PartyView(None, f"127.0.0.1:{self._ports['dealer']}", {}, "")

    # -- set-up and tear-down ----------------------------------------------------------
    def __enter__(self) -> EmulatedNetwork:
        try:
            if self.use_namespaces:
                self._create_namespaces()
            else:
                log.warning("network namespaces unavailable (%s): relays on loopback, "
                            "user-space rate limiting", self.fallback_reason)
                self._ports = {k: free_port() for k in
                               ("party0", "party1", "dealer", "relay_to0", "relay_to1",
                                "relay_dealer")}
            self._start_relays()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, *cmd: str) -> None:
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")

    def _create_namespaces(self) -> None:
        a, b = self._veth
        for ns in self.ns:
            self._run("ip", "netns", "add", ns)
            self._run("ip", "-n", ns, "link", "set", "lo", "up")
        self._run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        for ns, dev, ip in zip(self.ns, self._veth, self.ips, strict=True):
            self._run("ip", "link", "set", dev, "netns", ns)
            self._run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            self._run("ip", "-n", ns, "link", "set", dev, "up")
            bw = self.profile.bandwidth_bps
            if bw is not None:
                # burst: at least one MTU and ~1 ms of traffic; queue up to 50 ms
                burst = max(15000, int(bw / 8 / 1000))
                self._run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                          "root", "tbf", "rate", f"{int(bw)}bit", "burst", str(burst),
                          "latency", "50ms")

    def _relay(self, ns: str | None, listen: str, target: str, user_rate: bool) -> None:
        cmd = [sys.executable, "-m", "mpcvit.mpc.relay", "--listen", listen,
               "--target", target, "--rtt-ms", str(self.profile.rtt_s * 1e3)]
        if user_rate and self.profile.bandwidth_bps:
            cmd += ["--rate-mbit", str(self.profile.bandwidth_bps / 1e6)]
        if ns is not None:
            cmd = ["ip", "netns", "exec", ns, *cmd]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._relays.append(proc)
        line = proc.stdout.readline()
        if "listening" not in line:
            proc.kill()
            raise RuntimeError(f"relay did not start: {proc.stderr.read()[-500:]}")

    def _start_relays(self) -> None:
        if self.use_namespaces:
            ns0, ns1 = self.ns
            ip0, ip1 = self.ips
            self._relay(ns0, f"127.0.0.1:{RELAY_PEER_PORT}", f"{ip1}:{PARTY_PORT}", False)
            self._relay(ns1, f"127.0.0.1:{RELAY_PEER_PORT}", f"{ip0}:{PARTY_PORT}", False)
            self._relay(ns0, f"127.0.0.1:{RELAY_DEALER_PORT}", f"{ip1}:{DEALER_PORT}", False)
            return
        p = self._ports
        for rank in (0, 1):
            self._relay(None, f"127.0.0.1:{p[f'relay_to{rank}']}",
                        f"127.0.0.1:{p[f'party{rank}']}", True)
        self._relay(None, f"127.0.0.1:{p['relay_dealer']}", f"127.0.0.1:{p['dealer']}", True)

    def close(self) -> None:
        for proc in self._relays:
            proc.terminate()
        for proc in self._relays:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._relays = []
        if self.use_namespaces:
            for ns in self.ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            time.sleep(0.05)
