"""``mpcvit infer --config deploy/client.yaml IMAGE...``: classify images privately.

IMAGE is a file (.npy uint8, .pgm/.ppm, .png/.jpg with Pillow) or
``fashion-mnist:test:INDEX`` (also ``fashion-mnist:test:START-END``) to pick real
Fashion-MNIST test images, whose true labels are then printed too.  Torch-free: only the
client SDK, numpy, grpcio, protobuf and PyYAML.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

HELP = "classify images privately with the two party servers (client)"

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="client YAML (deploy/client.yaml)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image file or fashion-mnist:test:INDEX[-END]")
    parser.add_argument("--top-k", type=int, help="classes to print per image")
    parser.add_argument("--batch", action="store_true",
                        help="send all images in one request instead of one by one")


def wait_until_ready(client, seconds: float) -> Any:
    """Poll ModelInfo until both parties are ready (their start-up session is done)."""
    from mpcvit.party.client import ClientError, PartyUnavailable, RequestTimeout

    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.model_info(refresh=True)
        except (PartyUnavailable, RequestTimeout) as exc:
            if time.monotonic() >= deadline:
                raise ClientError(f"parties not ready after {seconds:g} s: {exc}") from None
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from mpcvit.party.client import ClientError
    from mpcvit.party.client_config import ClientConfig
    from mpcvit.party.images import load_images

    try:
        config = ClientConfig.from_yaml(args.config)
        images = load_images(args.images)
    except (ValueError, OSError) as exc:
        print(f"mpcvit infer: {exc}", file=sys.stderr)
        return 2
    top_k = args.top_k or config.top_k
    correct = known = 0
    try:
        with config.client() as client:
            info = wait_until_ready(client, config.wait_ready)
            print(f"model {info.name}: input {info.input_shape}, {info.num_classes} classes, "
                  f"{info.precision_bits}-bit fixed point")
            if args.batch:
                predictions = client.infer_batch([im.pixels for im in images])
            else:
                predictions = [client.infer(im.pixels) for im in images]
    except ClientError as exc:
        print(f"mpcvit infer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    for im, p in zip(images, predictions, strict=True):
        tops = ", ".join(f"{name} {prob:.3f}" for _, name, prob in p.top_k(top_k))
        truth = ""
        if im.label is not None:
            known += 1
            correct += int(p.label == im.label)
            truth = f" true={info.class_names[im.label]}"
        print(f"{im.name}:{truth} predicted={info.class_names[p.label]} | top{top_k}: {tops} | "
              f"{p.seconds:.2f} s, {p.megabytes:.1f} MB, {p.rounds} rounds")
    if known:
        print(f"accuracy {correct}/{known}")
    return 0
