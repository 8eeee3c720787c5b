"""``mpcvit infer --config deploy/client.yaml IMAGE...``: classify images privately.

IMAGE is a file (.npy uint8, .pgm/.ppm, .png/.jpg with Pillow) or
``fashion-mnist:test:INDEX`` (also ``fashion-mnist:test:START-END``) to pick real
Fashion-MNIST test images, whose true labels are then printed too.  Torch-free: only the
client SDK, numpy, grpcio, protobuf and PyYAML.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELP = "classify images privately with the two party servers (client)"

ENV_PARTIES = "MPCVIT_PARTIES"  # "host0:port0,host1:port1" overrides the config
# MPCVIT_TLS_DIR=/certs turns on mutual TLS with ca.pem, client.pem and client.key there.


@dataclass(frozen=True)
class ClientConfig:
    parties: tuple[str, str]
    model: str = ""
    timeout: float = 120.0
    top_k: int = 3
    wait_ready: float = 60.0
    tls: dict[str, str] | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], env: dict[str, str] | None = None) -> ClientConfig:
        env = os.environ if env is None else env
        data = dict(data)
        if env.get(ENV_PARTIES):
            data["parties"] = [a.strip() for a in env[ENV_PARTIES].split(",")]
        unknown = set(data) - {"parties", "model", "timeout", "top_k", "wait_ready", "tls"}
        if unknown:
            raise ValueError(f"unknown client config keys: {sorted(unknown)}")
        if env.get("MPCVIT_TLS_DIR") and not data.get("tls"):
            d = Path(env["MPCVIT_TLS_DIR"])
            data["tls"] = {"ca": str(d / "ca.pem"), "cert": str(d / "client.pem"),
                           "key": str(d / "client.key")}
        parties = data.get("parties") or []
        if len(parties) != 2:
            raise ValueError("client config needs 'parties': [party0 address, party1 address]")
        return cls(parties=(str(parties[0]), str(parties[1])), model=str(data.get("model") or ""),
                   timeout=float(data.get("timeout", 120.0)), top_k=int(data.get("top_k", 3)),
                   wait_ready=float(data.get("wait_ready", 60.0)), tls=data.get("tls"))

    @classmethod
    def from_yaml(cls, path: str | Path, env: dict[str, str] | None = None) -> ClientConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must be a YAML mapping")
        return cls.from_dict(data, env)

    def client(self):
        from .client import ClientTls, PrivateInferenceClient

        tls = ClientTls(**self.tls) if self.tls else None
        return PrivateInferenceClient(self.parties, model=self.model, timeout=self.timeout,
                                      tls=tls)


@dataclass(frozen=True)
class LabelledImage:
    name: str
    pixels: np.ndarray  # uint8, HW or HWC
    label: int | None = None


def load_images(specs: list[str]) -> list[LabelledImage]:
    """Resolve IMAGE arguments (files or fashion-mnist:SPLIT:INDEX[-END]) to uint8 arrays."""
    from . import images as readers

    out: list[LabelledImage] = []
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for spec in specs:
        if spec.startswith("fashion-mnist:"):
            parts = spec.split(":")
            if len(parts) != 3 or parts[1] not in ("test", "train"):
                raise ValueError(f"expected fashion-mnist:test:INDEX, got {spec!r}")
            if parts[1] not in splits:
                splits[parts[1]] = readers.fashion_mnist_split(parts[1])
            images, labels = splits[parts[1]]
            lo, _, hi = parts[2].partition("-")
            try:
                start, stop = int(lo), int(hi or lo) + 1
            except ValueError:
                raise ValueError(f"bad index in {spec!r}") from None
            if not 0 <= start < stop <= len(images):
                raise ValueError(f"index out of range 0..{len(images) - 1}: {spec!r}")
            for i in range(start, stop):
                out.append(LabelledImage(f"fashion-mnist:{parts[1]}:{i}", images[i],
                                         int(labels[i])))
        else:
            out.append(LabelledImage(spec, readers.read_image(spec)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="client YAML (deploy/client.yaml)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image file or fashion-mnist:test:INDEX[-END]")
    parser.add_argument("--top-k", type=int, help="classes to print per image")
    parser.add_argument("--batch", action="store_true",
                        help="send all images in one request instead of one by one")


def wait_until_ready(client, seconds: float) -> Any:
    """Poll ModelInfo until both parties are ready (their start-up session is done)."""
    from .client import ClientError, PartyUnavailable, RequestTimeout

    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.model_info(refresh=True)
        except (PartyUnavailable, RequestTimeout) as exc:
            if time.monotonic() >= deadline:
                raise ClientError(f"parties not ready after {seconds:g} s: {exc}") from None
            time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from .client import ClientError

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
