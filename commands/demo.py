"""``mpcvit demo`` (``make demo``): the two-party private inference demo without Docker.

Starts the dealer and both party servers as separate local processes (real gRPC between
them), then acts as a client: classifies real Fashion-MNIST test images privately and
prints, per image, the true and predicted labels and what the secure run cost; then the
accuracy and the agreement with plaintext inference of the same checkpoint.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mpcvit.party.client import ModelInfo

HELP = "run dealer + two parties locally and classify Fashion-MNIST test images privately"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", type=int, default=20, help="test images to classify")
    parser.add_argument("--start", type=int, default=0, help="first test image index")
    parser.add_argument("--model", default="demo",
                        help="checkpoint name (models/assets/NAME.pt) or path")
    parser.add_argument("--provider", choices=("dealer", "tfp"), default="dealer",
                        help="correlated randomness: the dealer (default) or INSECURE tfp")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where configs and server logs go (default: a temp dir)")
    parser.add_argument("--train-epochs", type=int, default=2,
                        help="epochs if the demo checkpoint must be trained first")


def ensure_checkpoint(name: str, epochs: int) -> Path:
    """The demo checkpoint; trained here (about two minutes on 2 cores) if it is missing."""
    from mpcvit.models.checkpoint import resolve_checkpoint, shipped_checkpoint

    try:
        return resolve_checkpoint(name)
    except FileNotFoundError:
        if "/" in name or Path(name).suffix:
            raise
    out = shipped_checkpoint(name)
    print(f"demo checkpoint {out} missing: training it now "
          f"({epochs} epochs on 20000 images, progress below)", flush=True)
    cmd = [sys.executable, "-m", "mpcvit.commands", "train", "--model", "demo",
           "--arch", "scale+relu_nobias", "--data", "fashion-mnist", "--out", str(out),
           "--epochs", str(epochs), "--limit", "20000", "--test-limit", "2000", "--warmup", "0.5",
           "--threads", "2"]
    subprocess.run(cmd, check=True)
    return out


def plaintext_predictions(checkpoint: Path, info: ModelInfo, pixels: np.ndarray) -> np.ndarray:
    import torch
    from mpcvit.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    x = np.stack([info.preprocess(p) for p in pixels])
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy().argmax(axis=1)


def run(args: argparse.Namespace) -> int:
    from mpcvit.party.client import ClientError, PrivateInferenceClient
    from mpcvit.party.images import load_images
    from mpcvit.party.local import LocalCluster

    try:
        checkpoint = ensure_checkpoint(args.model, args.train_epochs)
        images = load_images([f"fashion-mnist:test:{args.start}-{args.start + args.images - 1}"])
    except (OSError, ValueError, subprocess.CalledProcessError) as exc:
        print(f"mpcvit demo: {exc}", file=sys.stderr)
        return 1
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mpcvit-demo-"))
    cluster = LocalCluster(workdir, model=str(checkpoint), provider=args.provider)
    print(f"starting dealer, party 0 and party 1 (configs and logs in {workdir})", flush=True)
    started = time.perf_counter()
    cluster.start()
    try:
        cluster.wait_ready(300)
        print(f"parties ready: weights secret-shared in {time.perf_counter() - started:.1f} s "
              f"(party 0 {cluster.address(0)}, party 1 {cluster.address(1)}, "
              f"dealer {cluster.address('dealer')}, provider {args.provider})", flush=True)
        with PrivateInferenceClient(cluster.party_addresses, timeout=300) as client:
            info = client.model_info()
            names = info.class_names
            print(f"{'image':>6}  {'true':<12} {'predicted':<12} {'ok':<3} {'seconds':>7} "
                  f"{'MB':>7} {'rounds':>6}")
            predicted, secs, mbs = [], [], []
            for im in images:
                p = client.infer(im.pixels)
                predicted.append(p.label)
                secs.append(p.seconds)
                mbs.append(p.megabytes)
                mark = "yes" if p.label == im.label else "no"
                print(f"{im.name.rsplit(':', 1)[-1]:>6}  {names[im.label]:<12} "
                      f"{names[p.label]:<12} {mark:<3} {p.seconds:7.2f} {p.megabytes:7.1f} "
                      f"{p.rounds:6d}", flush=True)
    except (ClientError, TimeoutError, RuntimeError) as exc:
        print(f"mpcvit demo: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        codes = cluster.stop()
    labels = np.array([im.label for im in images])
    secure = np.array(predicted)
    plain = plaintext_predictions(checkpoint, info, np.stack([im.pixels for im in images]))
    n = len(images)
    print(f"private accuracy   {int((secure == labels).sum())}/{n} "
          f"({(secure == labels).mean():.1%})")
    print(f"plaintext accuracy {int((plain == labels).sum())}/{n} ({(plain == labels).mean():.1%})")
    print(f"agreement with plaintext inference {int((secure == plain).sum())}/{n}")
    print(f"per image: {np.mean(secs):.2f} s, {np.mean(mbs):.1f} MB between the parties "
          f"(mean over {n})")
    print("servers stopped:", ", ".join(f"{k}={v}" for k, v in codes.items()))
    return 0
