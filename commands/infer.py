"""``mpcvit infer --config deploy/client.yaml IMAGE...``: classify images privately.

``--pairs "a0:p,a1:p;b0:p,b1:p"`` (or ``dns:P0,P1`` with ``{ordinal}``) spreads the
images over several party pairs, each to a serving pair with the fewest of this
client's requests in flight (:mod:`mpcvit.party.pool`).

IMAGE is a picture file (PNG, JPEG, WebP, BMP, GIF, TIFF with Pillow, the ``image``
extra; PGM/PPM and NPY without it) of any size and colour, or
``fashion-mnist:test:INDEX`` (also ``fashion-mnist:test:START-END``) to pick real
Fashion-MNIST test images, whose true labels are then printed too.  Each result, or each
image's error, is printed as it comes; one bad image does not stop the others.
Torch-free: only the client SDK, numpy, grpcio, protobuf and PyYAML (and Pillow).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

HELP = "classify images privately with the two party servers (client)"

#: Exit codes of ``mpcvit infer`` (also in docs/service.md).
EXIT_OK = 0
EXIT_USAGE = 2  # bad arguments or client config (argparse's code too)
EXIT_SOME_FAILED = 3  # some images failed (unreadable, too large, refused); the rest printed
EXIT_PARTIES = 4  # parties unreachable, not mpcvit parties, not ready in time, or lost

EPILOG = """\
exit codes:
  0  every image was classified
  2  bad arguments or client config
  3  some images failed (unreadable, too large, not convertible, or refused by a
     party; with --pairs also an image whose pair failed after its shares were
     sent: the next images go to the other pairs); the others were classified
     and printed
  4  the parties could not be used: nothing answered at an address, the server
     there is not an mpcvit party (e.g. the dealer's port), they were not ready
     within wait_ready, or a party failed during the run (with --pairs: no pair
     serves)
  5  a module that an extra brings is missing (any mpcvit command; the message
     names the extra).  Without Pillow a PNG/JPEG is one failed image (3).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--config",
                        help="client YAML (deploy/client.yaml; deploy/local/client.yaml for "
                             "servers on this machine); optional with --pairs")
    parser.add_argument("--pairs", metavar="PAIRS",
                        help="several party pairs instead of the config's parties: "
                             "'p0:port,p1:port;p0b:port,p1b:port', or "
                             "'dns:P0,P1' with {ordinal} in both addresses (pair k: "
                             "{ordinal}=k, for every k whose names resolve)")
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="picture file (any size and colour) or fashion-mnist:test:INDEX[-END]")
    parser.add_argument("--top-k", type=int, help="classes to print per image")
    parser.add_argument("--batch", action="store_true",
                        help="send all images in one request instead of one by one")
    parser.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                        help="negate grey values for a 1-channel model: auto (default) when "
                             "a picture to resize has a light border, as Fashion-MNIST was made")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Report:
    """Prints each result or error as it comes and counts them."""

    def __init__(self, info: Any, top_k: int) -> None:
        self.info = info
        self.top_k = top_k
        self.failed = self.correct = self.known = 0

    def error(self, name: str, exc: Exception) -> None:
        self.failed += 1
        message = _message(exc)
        _say(f"mpcvit infer: {message if message.startswith(name) else f'{name}: {message}'}")

    def result(self, name: str, label: int | None, p: Any) -> None:
        names = self.info.class_names
        tops = ", ".join(f"{cls} {prob:.3f}" for _, cls, prob in p.top_k(self.top_k))
        truth = ""
        if label is not None:
            self.known += 1
            self.correct += int(p.label == label)
            truth = f" true={names[label]}"
        pair = "" if p.pair is None else f", pair {p.pair}"
        print(f"{name}:{truth} predicted={names[p.label]} | top{self.top_k}: {tops} | "
              f"{p.seconds:.2f} s, {p.megabytes:.1f} MB, {p.rounds} rounds{pair}", flush=True)


def _message(exc: Exception) -> str:
    from mpcvit.party.client import ClientError

    if isinstance(exc, ClientError) and exc.party is not None:
        return f"{type(exc).__name__}: {exc}"
    return str(exc)


def _image_failure(exc: Exception) -> bool:
    """Errors that concern one image only: report it and go on with the next."""
    from mpcvit.party.client import InvalidInput, RequestAborted, RequestTimeout, RequestTooLarge
    from mpcvit.party.images import ImageError
    from mpcvit.party.pool import PairFailed

    return isinstance(exc, (ImageError, InvalidInput, RequestTooLarge, RequestTimeout,
                            RequestAborted, PairFailed))


def classify(client: Any, pending: list[Any], report: Report, *, batch: bool,
             invert: bool | None) -> int:
    """Classify ``pending`` images one by one (or in one request); return an exit code."""
    from mpcvit.party.client import ClientError

    info = report.info
    loaded = []
    for i, item in enumerate(pending):
        try:
            x = info.preprocess(item.load(), invert=invert, name=item.name)
            if batch:
                loaded.append((item, x))
                continue
            report.result(item.name, item.label, client.infer(x, preprocessed=True))
        except ClientError as exc:
            if not _image_failure(exc):
                report.error(item.name, exc)
                left = len(pending) - i - 1
                if left:
                    _say(f"mpcvit infer: stopped; {left} image(s) not sent")
                return EXIT_PARTIES
            report.error(item.name, exc)
        except ValueError as exc:  # ImageError: unreadable or unconvertible picture
            report.error(item.name, exc)
    if batch and loaded:
        try:
            preds = client.infer_batch([x for _, x in loaded], preprocessed=True)
        except ClientError as exc:
            report.error(f"batch of {len(loaded)}", exc)
            return EXIT_SOME_FAILED if _image_failure(exc) else EXIT_PARTIES
        for (item, _), p in zip(loaded, preds, strict=True):
            report.result(item.name, item.label, p)
    return EXIT_SOME_FAILED if report.failed else EXIT_OK


def run(args: argparse.Namespace) -> int:
    from mpcvit.party.client import ClientError
    from mpcvit.party.client_config import ENV_PAIRS, ENV_PARTIES, ClientConfig
    from mpcvit.party.images import WORK_FACTOR, iter_images

    # Pillow's own size warning: pictures over the limit are refused with a clear message.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    if args.config is None and args.pairs is None:
        print("mpcvit infer: give --config FILE, --pairs PAIRS, or both", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.config is None:
            env = {k: v for k, v in os.environ.items() if k not in (ENV_PARTIES, ENV_PAIRS)}
            config = ClientConfig.from_dict({"pairs": args.pairs}, env)
        else:
            config = ClientConfig.from_yaml(args.config).with_pairs(args.pairs)
        client = config.client()
    except (ValueError, OSError) as exc:
        print(f"mpcvit infer: {args.config or '--pairs'}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    invert = {"auto": None, "yes": True, "no": False}[args.invert]
    with client:
        try:
            info = client.wait_ready(config.wait_ready, connect_timeout=config.connect_timeout,
                                     progress=_say)
        except ClientError as exc:
            print(f"mpcvit infer: {exc}", file=sys.stderr)
            return EXIT_PARTIES
        print(f"model {info.name}: input {info.input_shape}, {info.num_classes} classes, "
              f"{info.precision_bits}-bit fixed point", flush=True)
        c, h, w = info.input_shape
        pending = list(iter_images(args.images, max_pixels=config.max_pixels,
                                   draft=(WORK_FACTOR * h, WORK_FACTOR * w)))
        report = Report(info, args.top_k or config.top_k)
        code = classify(client, pending, report, batch=args.batch, invert=invert)
    if report.known:
        print(f"accuracy {report.correct}/{report.known}")
    for pair in client.pairs() if hasattr(client, "pairs") else ():
        _say(f"pair {pair['index']} ({', '.join(pair['addresses'])}): {pair['served']} "
             f"served, {pair['failed']} failed" + (f"; last down: {pair['down']}"
                                                   if pair["down"] else ""))
    if report.failed:
        _say(f"mpcvit infer: {report.failed} of {len(pending)} image(s) failed")
    return code
