"""A whole secure ViT over an emulated LAN/WAN link (``mpcvit bench network``).

Dealer and both parties run inside the namespaces of :class:`EmulatedNetwork` (rate
shaped by the kernel, delayed by relays), so the figures include real waiting on the
wire.  The dealer sits with party 1; with the offline phase on, party 0 fetches each
image's correlated randomness before the image arrives, and the online time excludes it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..mpc.launcher import run_parties
from ..mpc.netem import EmulatedNetwork, NetworkProfile

if TYPE_CHECKING:
    from ..models.configs import ViTConfig
    from ..models.plan import ModelPlan
    from ..models.spec import ArchSpec
    from ..mpc.protocols.plan import ProtocolPlan


def network_party(config_dict: dict, spec_dict: dict, state_dict: dict | None,
                  images: torch.Tensor, offline: bool,
                  protocol_dict: dict | None = None) -> list[dict[str, Any]]:
    """Party program: warm-up forward (records the tuple trace), then each image, with
    its correlated randomness prepared offline first when ``offline``."""
    from mpcvit.models.profiler import build_secure, prepare_offline, record_trace, timed_forward
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    secure = build_secure(config_dict, spec_dict, state_dict, protocol_dict)
    trace = record_trace(provider, lambda: timed_forward(secure, images[:1]))
    rows = []
    for i in range(len(images)):
        offline_s = prepare_offline(provider, trace) if offline else 0.0
        row = timed_forward(secure, images[i : i + 1])
        row.pop("logits")
        row["offline_s"] = offline_s
        rows.append(row)
    return rows


def _summary(parties: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Party 0's figures (rounds and bytes as it counts them, median seconds), plus the
    dealer material party 1 received (``offline_bytes_p1``: its FSS keys)."""
    rows = parties[0]
    online = statistics.median(r["compute_s"] for r in rows)
    offline = statistics.median(r["offline_s"] for r in rows)
    out = {"online_s": online, "offline_s": offline, "total_s": online + offline,
           "rounds": rows[0]["rounds"], "bytes": rows[0]["bytes"],
           "dealer_requests": statistics.median(r["dealer_requests"] for r in rows),
           "offline_bytes": statistics.median(r["offline_bytes"] for r in rows)}
    if len(parties) > 1:
        out["offline_bytes_p1"] = statistics.median(r["offline_bytes"] for r in parties[1])
    return out


def _images(config: ViTConfig, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, config.in_chans, config.image_size, config.image_size, generator=g)


def bench_loopback(config: ViTConfig, spec: ArchSpec, *, images: int = 2, offline: bool = True,
                   state_dict: dict | None = None,
                   protocol: ModelPlan | ProtocolPlan | None = None,
                   progress: Callable[[str], object] = print) -> dict[str, float]:
    """The same program with no emulated link: the compute baseline (``protocol``: a
    ``ModelPlan`` or ``ProtocolPlan``, None for the default)."""
    progress("loopback run (compute baseline)...")
    plan = None if protocol is None else protocol.to_dict()
    loop = _summary(run_parties(network_party, config.to_dict(), spec.to_dict(), state_dict,
                                _images(config, images), offline, plan, provider="dealer",
                                timeout=3600))
    progress(f"  {loop['online_s']:.2f} s online per image, {loop['rounds']} rounds, "
             f"{loop['bytes'] / 1e6:.1f} MB (party 0's count), "
             f"{loop['offline_bytes'] / 1e6:.1f} MB dealer material")
    return loop


def bench_network(config: ViTConfig, spec: ArchSpec, profile: NetworkProfile, *,
                  images: int = 2, offline: bool = True, state_dict: dict | None = None,
                  protocol: ModelPlan | ProtocolPlan | None = None,
                  loopback: dict[str, float] | None = None,
                  progress: Callable[[str], object] = print) -> dict[str, Any]:
    """Measure over the emulated link; predict the link from the loopback run."""
    x = _images(config, images)
    plan = None if protocol is None else protocol.to_dict()
    args = (config.to_dict(), spec.to_dict(), state_dict, x)
    loop = loopback or bench_loopback(config, spec, images=images, offline=offline,
                                      state_dict=state_dict, protocol=protocol,
                                      progress=progress)
    with EmulatedNetwork(profile) as net:
        where = "namespaces + tbf + relays" if net.use_namespaces else (
            f"loopback relays ({net.fallback_reason})")
        progress(f"emulated {profile.describe()} via {where}...")
        emu = _summary(run_parties(network_party, *args, offline, plan, provider="dealer",
                                   network=net, timeout=7200, recv_timeout=600))
    predicted = loop["online_s"] + profile.mpc_seconds(loop["bytes"], loop["rounds"])
    progress(f"  {emu['online_s']:.2f} s online per image (+{emu['offline_s']:.2f} s offline); "
             f"predicted online {predicted:.2f} s")
    return {"network": profile.name, "emulation": where, "loopback": loop, "measured": emu,
            "predicted_online_s": predicted,
            "prediction_error": (predicted - emu["online_s"]) / emu["online_s"]}
