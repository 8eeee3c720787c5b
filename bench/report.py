"""Reproduce the secure-latency tables of docs/benchmarks.md.

``python -m mpcvit.bench.report --section models``: vit_7_4_32 (random weights, batch 1)
on loopback for every attention kind with GeLU and with ReLU, plus stock CrypTen.
``python -m mpcvit.bench.report --section networks``: softmax ViT, MPCViT mixes and
MPCViT+ on loopback, LAN and WAN (emulated links), with the stock-CrypTen baseline.
Prints Markdown tables; every figure comes from a run made by this command.
"""

from __future__ import annotations

import argparse
import sys

from ..mpc.launcher import run_parties
from ..mpc.netem import PRESETS

SPECS_MODELS = [
    ("softmax + gelu", "softmax", 0.0, "gelu"),
    ("relu_softmax + gelu", "relu_softmax", 0.0, "gelu"),
    ("scale + gelu", "scale", 0.0, "gelu"),
    ("MPCViT mix (½ relu_softmax, ½ scale) + gelu", "mix", 0.5, "gelu"),
    ("softmax + relu", "softmax", 0.0, "relu"),
    ("relu_softmax + relu", "relu_softmax", 0.0, "relu"),
    ("scale + relu", "scale", 0.0, "relu"),
    ("MPCViT mix (½ relu_softmax, ½ scale) + relu", "mix", 0.5, "relu"),
]
SPECS_NETWORKS = [
    ("softmax ViT (softmax + gelu)", "softmax", 0.0, "gelu"),
    ("MPCViT μ=0.5 (½ relu_softmax, ½ scale) + gelu", "mix", 0.5, "gelu"),
    ("MPCViT μ=0.25 (¼ relu_softmax, ¾ scale) + gelu", "mix", 0.25, "gelu"),
    ("MPCViT+ μ=0.5 + relu", "mix", 0.5, "relu"),
    ("MPCViT+ μ=0.25 + relu", "mix", 0.25, "relu"),
    ("MPCViT+ μ=0.25 grouped (ReLU-softmax heads in the first 2 layers) + relu", "grouped",
     0.25, "relu"),
]


def build_spec(config, attention: str, mu: float, activation: str):
    from mpcvit.models.spec import ArchSpec

    if attention == "grouped":
        return ArchSpec.grouped(config.depth, config.heads, mu, activation=activation)
    if attention == "mix":
        return ArchSpec.mix(config.depth, config.heads, ("relu_softmax", "scale"),
                            (mu, 1 - mu), activation)
    return ArchSpec.uniform(config.depth, config.heads, attention, activation)


def stock_baseline(config) -> dict:
    from .stock import stock_vit_party

    return run_parties(stock_vit_party, config.to_dict(), backend="gloo", provider="tfp",
                       timeout=3600)[0]


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def section_models(config, log, images: int = 2) -> list[str]:
    from .network import bench_loopback

    stock = stock_baseline(config)
    log(f"stock: {stock}")
    lines = [f"| model ({config.name}, random weights, batch 1, loopback) | online s | "
             "offline s | rounds | MB | speed-up vs stock | vs softmax + gelu |",
             "|---|---|---|---|---|---|---|",
             f"| stock CrypTen: softmax + erf GeLU, gloo, TFP | {stock['online_s']:.2f} | — | "
             f"{stock['rounds']} | {_mb(stock['bytes'])} | 1.00x | — |"]
    base = None
    for name, att, mu, act in SPECS_MODELS:
        row = bench_loopback(config, build_spec(config, att, mu, act), images=images,
                             progress=log)
        base = base or row["online_s"]
        lines.append(f"| {name} | {row['online_s']:.2f} | {row['offline_s']:.2f} | "
                     f"{row['rounds']} | {_mb(row['bytes'])} | "
                     f"{stock['online_s'] / row['online_s']:.2f}x | "
                     f"{base / row['online_s']:.2f}x |")
    return lines


def section_networks(config, networks: list[str], log, images: int = 1,
                     rows: list[int] | None = None) -> list[str]:
    from .network import bench_loopback, bench_network

    specs = [s for i, s in enumerate(SPECS_NETWORKS) if rows is None or i in rows or i == 0]

    stock = stock_baseline(config)
    log(f"stock: {stock}")
    out = []
    results = {}
    for name, att, mu, act in specs:
        spec = build_spec(config, att, mu, act)
        loop = bench_loopback(config, spec, images=images, progress=log)
        results[(name, "loopback")] = {"measured": loop, "predicted_online_s": loop["online_s"]}
        for net in networks:
            if net != "loopback":
                results[(name, net)] = bench_network(config, spec, PRESETS[net], images=images,
                                                     loopback=loop, progress=log)
    for net in networks:
        p = PRESETS[net]
        st = stock["online_s"] + p.mpc_seconds(stock["bytes"], stock["rounds"])
        soft = results[(SPECS_NETWORKS[0][0], net)]["measured"]["online_s"]
        label = "stock CrypTen (softmax + erf GeLU, gloo, TFP)"
        if net != "loopback":
            label += ", predicted from its loopback run"
        out += [f"\n**{p.describe()}**\n",
                "| model | online s/image | offline s/image | rounds | MB | predicted online s "
                "| vs softmax ViT | vs stock CrypTen |", "|---|---|---|---|---|---|---|---|",
                f"| {label} | {st:.2f} | — | {stock['rounds']} | {_mb(stock['bytes'])} | "
                f"{st:.2f} | — | 1.00x |"]
        for name, *_ in specs:
            r = results[(name, net)]
            m = r["measured"]
            out.append(f"| {name} | {m['online_s']:.2f} | {m['offline_s']:.2f} | {m['rounds']} | "
                       f"{_mb(m['bytes'])} | {r['predicted_online_s']:.2f} | "
                       f"{soft / m['online_s']:.2f}x | {st / m['online_s']:.2f}x |")
    return out


def main(argv: list[str] | None = None) -> int:
    from mpcvit.models.configs import CONFIGS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--section", choices=["models", "networks"], required=True)
    p.add_argument("--model", default="vit_7_4_32")
    p.add_argument("--networks", default="loopback,lan,wan")
    p.add_argument("--rows", default=None,
                   help="networks: comma-separated row numbers of SPECS_NETWORKS to run "
                   "(0, the softmax ViT, always runs)")
    p.add_argument("--images", type=int, default=None,
                   help="images per row, median reported (default: 2 for models, 1 for "
                   "networks)")
    args = p.parse_args(argv)
    config = CONFIGS[args.model]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.section == "models":
        lines = section_models(config, log, args.images or 2)
    else:
        rows = None if args.rows is None else [int(r) for r in args.rows.split(",")]
        lines = section_networks(config, args.networks.split(","), log, args.images or 1,
                                 rows)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
