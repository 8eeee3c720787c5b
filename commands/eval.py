"""``mpcvit eval``: accuracy in plaintext and, with ``--secure``, the 2-party secure run.

The secure run is the real service path: a dealer and both parties start as local
processes (``party.local.LocalCluster``), and this command acts as the client: it
secret-shares each test image, sends one share to each party and reconstructs only the
logits, which it compares with plaintext inference of the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mpcvit.models.vit import ViT

HELP = "evaluate a model in plaintext and (--secure) under 2-party MPC over gRPC"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="checkpoint path, a shipped checkpoint name (demo), or a config "
                             "name (random weights, for cost measurements)")
    parser.add_argument("--arch", help="architecture spec YAML, or a uniform spec such as "
                                       "'relu_softmax+relu' (config names only)")
    parser.add_argument("--data", required=True, help="dataset (fashion-mnist, cifar10:PATH, ...)")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate the first N test images (default: all; --secure: 20)")
    parser.add_argument("--secure", action="store_true",
                        help="also run the images through the 2-party secure service: starts "
                             "its own dealer and two parties on 127.0.0.1 for the run")
    parser.add_argument("--provider", choices=["dealer", "tfp"], default="dealer",
                        help="correlated randomness for --secure (tfp is insecure)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")


def resolve_model(name: str, arch: str | None) -> tuple[ViT, Path | None, str]:
    """(model, checkpoint path or None, description)."""
    from mpcvit.models.checkpoint import load_checkpoint, shipped_checkpoint
    from mpcvit.models.configs import CONFIGS
    from mpcvit.models.spec import ArchSpec
    from mpcvit.models.vit import ViT

    shipped = shipped_checkpoint(name)
    path = Path(name)
    if path.is_file() or (not path.suffix and "/" not in name and shipped.is_file()):
        ckpt = path if path.is_file() else shipped
        model, _ = load_checkpoint(ckpt)
        if arch:
            raise ValueError("--arch applies to config names; a checkpoint carries its spec")
        return model, ckpt, f"checkpoint {ckpt}"
    if name in CONFIGS:
        config = CONFIGS[name]
        spec = ArchSpec.parse(arch, config.depth, config.heads) if arch else None
        return ViT(config, spec).eval(), None, f"config {name} with random weights"
    raise FileNotFoundError(f"{name}: no such checkpoint, shipped model or config name")


def plaintext_logits(model: ViT, images: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            out.append(model(torch.from_numpy(images[i : i + batch])).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_classes))


def secure_run(model: ViT, ckpt: Path | None, images: np.ndarray, provider: str,
               progress: Callable[[str], object] = print) -> dict:
    """Classify ``images`` through the 2-party service; per-image logits and costs."""
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.party.client import PrivateInferenceClient
    from mpcvit.party.local import LocalCluster

    with tempfile.TemporaryDirectory(prefix="mpcvit-eval-") as tmp:
        if ckpt is None:  # random weights: hand party 0 a checkpoint of them
            ckpt = Path(tmp) / "model.pt"
            save_checkpoint(model, ckpt)
        cluster = LocalCluster(Path(tmp) / "cluster", model=str(ckpt), provider=provider)
        started = "a dealer, " if provider == "dealer" else ""
        progress(f"starting its own {started}party 0 and party 1 as local processes "
                 f"(party 0 {cluster.address(0)}, party 1 {cluster.address(1)}"
                 + (f", dealer {cluster.address('dealer')}" if started else "")
                 + f"; logs in {cluster.workdir}); they stop when this run ends, and no "
                 "running server is used")
        cluster.start()
        try:
            cluster.wait_ready(600)
            logits, seconds, rounds, nbytes = [], [], [], []
            with PrivateInferenceClient(cluster.party_addresses, timeout=900) as client:
                for i, x in enumerate(images):
                    p = client.infer(x, preprocessed=True)
                    logits.append(p.logits)
                    seconds.append(p.seconds)
                    party0 = next(s for s in p.stats if s.party == 0)
                    rounds.append(party0.rounds)
                    nbytes.append(party0.bytes_sent)
                    progress(f"  image {i + 1}/{len(images)}: {p.seconds:.2f} s, "
                             f"{party0.rounds} rounds, {party0.bytes_sent / 1e6:.1f} MB")
        finally:
            cluster.stop()
    return {"logits": np.stack(logits), "seconds": seconds, "rounds": rounds, "bytes": nbytes}


def run(args: argparse.Namespace) -> int:
    from mpcvit.models.checkpoint import CheckpointError
    from mpcvit.models.data import DatasetError, load_dataset

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        model, ckpt, what = resolve_model(args.model, args.arch)
        bundle = load_dataset(args.data)
    except (OSError, ValueError, DatasetError, CheckpointError) as exc:
        print(f"mpcvit eval: {exc}", file=sys.stderr)
        return 2
    cfg = model.config
    if tuple(bundle.image_shape) != (cfg.in_chans, cfg.image_size, cfg.image_size):
        print(f"mpcvit eval: dataset images {bundle.image_shape} do not fit the model input "
              f"{(cfg.in_chans, cfg.image_size, cfg.image_size)}", file=sys.stderr)
        return 2
    limit = args.limit if args.limit is not None else (20 if args.secure else None)
    images = bundle.test.images[:limit]
    labels = bundle.test.labels[:limit]
    say(f"model: {what}; data: {bundle.name}, {len(labels)} test images")
    plain = plaintext_logits(model, images)
    result: dict = {"accuracy": float((plain.argmax(1) == labels).mean()), "images": len(labels)}
    say(f"plaintext accuracy: {result['accuracy']:.2%}")
    if args.secure:
        say(f"secure 2-party run over gRPC (provider {args.provider}):")
        tic = time.perf_counter()
        sec = secure_run(model, ckpt, images, args.provider, progress=say)
        pred = sec["logits"].argmax(1)
        result.update({
            "secure_accuracy": float((pred == labels).mean()),
            "agreement": float((pred == plain.argmax(1)).mean()),
            "max_abs_err": float(np.abs(sec["logits"] - plain).max()),
            "seconds": float(np.mean(sec["seconds"])),
            "rounds": float(np.mean(sec["rounds"])),
            "bytes": float(np.mean(sec["bytes"])),
            "total_seconds": time.perf_counter() - tic,
        })
        say(f"secure accuracy: {result['secure_accuracy']:.2%}; agreement with plaintext: "
            f"{result['agreement']:.2%}; max |logit error|: {result['max_abs_err']:.4f}")
        say(f"per image (party 0's counts): {result['seconds']:.2f} s, "
            f"{result['rounds']:.0f} rounds, {result['bytes'] / 1e6:.1f} MB")
    if args.json:
        print(json.dumps(result))
    return 0
