"""``mpcvit import --reference CKPT --out MODEL.pt``: a published MPCViT / MPCViT+ checkpoint
(PKU-SEC-Lab/mpcvit, as its trainer saved it) as an mpcvit checkpoint.

The file is unpickled without running code (``models.reference.read_reference_file``);
config and spec come from tensor shapes, alphas (head kinds) and betas (MPCViT+ token
masks).  Before writing, the imported model's logits are compared on random inputs with
the reference forward pass re-implemented from the state dict
(``models.reference.reference_forward``), so a wrong import cannot pass silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = "import a reference MPCViT/MPCViT+ checkpoint (PKU-SEC-Lab/mpcvit) as an mpcvit model"

CHECK_INPUTS = 4  # random inputs of the self-check
CHECK_TOLERANCE = 1e-4  # relative to 1 + max |logit|; measured: 1e-7 to 1e-5 in float32


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reference", required=True, type=Path,
                        help="the reference trainer's checkpoint (.pth.tar), a timm-style dict "
                             "or a plain state dict")
    parser.add_argument("--out", required=True, type=Path, help="mpcvit checkpoint to write")
    parser.add_argument("--ema", action="store_true",
                        help="import the EMA weights (state_dict_ema) instead of state_dict")
    parser.add_argument("--attn-eps", type=float, default=None,
                        help="ReLU-softmax denominator guard (default: the reference's 1e-5, "
                             "which reproduces its logits; 0.00390625 = 2**-8 is this project's "
                             "default for its own models)")
    parser.add_argument("--alpha-threshold", type=float, default=None,
                        help="binarise non-0/1 alphas (a search checkpoint): heads with alpha "
                             ">= T become ReLU-softmax")
    parser.add_argument("--beta-threshold", type=float, default=None,
                        help="binarise non-0/1 betas: tokens with beta >= T keep GeLU")
    parser.add_argument("--heads", type=int, default=None,
                        help="head count of a softmax checkpoint without alphas (the teacher), "
                             "when its shape matches no named config")
    parser.add_argument("--json", action="store_true", help="end with one JSON object")


def _metadata(rf: Any, path: Path, channels: int, check: float) -> dict[str, Any]:
    """The checkpoint's ``extra``: provenance, and the dataset's normalisation when the
    trainer's command line names it (party 0 reports it to clients)."""
    from mpcvit.models.data import NORMALIZATION

    args = rf.meta.get("args", {})
    extra: dict[str, Any] = {"imported_from": {"file": path.name, "weights": rf.source,
                                               **rf.meta},
                             "reference_max_abs_diff": check}
    mean, std = args.get("mean"), args.get("std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels:
        extra["normalization"] = {"mean": [float(v) for v in mean],
                                  "std": [float(v) for v in std]}
    dataset = str(args.get("dataset") or "").replace("_", "-").lower()
    if dataset in NORMALIZATION:
        extra["dataset"] = dataset
    return extra


def self_check(model: Any, sd: dict, thresholds: bool) -> tuple[float, float]:
    """(max |ours − reference|, max |reference|) of the logits on random inputs, the
    reference forward run with the reference's own epsilon."""
    import torch
    from mpcvit.models.reference import REFERENCE_ATTN_EPS, binarised, reference_forward

    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(CHECK_INPUTS, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    ref_sd = binarised(sd, model.spec) if thresholds else sd
    with torch.no_grad():
        want = reference_forward(ref_sd, x, REFERENCE_ATTN_EPS, heads=cfg.heads)
        got = model(x)
    return float((got - want).abs().max()), float(want.abs().max())


def describe(model: Any) -> list[str]:
    cfg, spec = model.config, model.spec
    lines = [f"config: {cfg.name} (cct): {cfg.depth} layers, {cfg.heads} heads, dim {cfg.dim}, "
             f"{cfg.num_tokens} tokens, {cfg.in_chans}x{cfg.image_size}x{cfg.image_size} "
             f"input, {cfg.num_classes} classes, attn_eps {cfg.attn_eps:g}"]
    heads = {k: v for k, v in spec.summary().items()
             if k in ("softmax", "relu_softmax", "scale")}
    lines.append("heads: " + ", ".join(f"{n} {k}" for k, n in heads.items()))
    masked = [(i, len(layer.token_mask)) for i, layer in enumerate(spec.layers)
              if layer.token_mask is not None]
    if masked:
        parts = ", ".join(f"layer {i}: {k}" for i, k in masked)
        lines.append(f"MPCViT+ token masks (GeLU tokens of {cfg.num_tokens}; the rest identity "
                     f"+ ReLU after linear2): {parts}")
    else:
        lines.append("MLP: GeLU on every token")
    return lines


def run(args: argparse.Namespace) -> int:
    from mpcvit.models.checkpoint import save_checkpoint
    from mpcvit.models.reference import (
        REFERENCE_ATTN_EPS,
        ReferenceImportError,
        import_reference,
        read_reference_file,
        unwrap_reference,
    )

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        rf = unwrap_reference(read_reference_file(args.reference), ema=args.ema)
        model = import_reference(
            rf, alpha_threshold=args.alpha_threshold, beta_threshold=args.beta_threshold,
            attn_eps=REFERENCE_ATTN_EPS if args.attn_eps is None else args.attn_eps,
            heads=args.heads)
    except (ReferenceImportError, ValueError) as exc:
        print(f"mpcvit import: {exc}", file=sys.stderr)
        return 2
    origin = ", ".join(f"{k} {v}" for k, v in rf.meta.items() if k in ("arch", "epoch", "metric"))
    say(f"read {args.reference}: weights from {rf.source!r}" + (f" ({origin})" if origin else ""))
    for line in describe(model):
        say(line)
    thresholds = args.alpha_threshold is not None or args.beta_threshold is not None
    diff, scale = self_check(model, rf.state_dict, thresholds)
    say(f"self-check on {CHECK_INPUTS} random inputs: max |logit - reference forward| = "
        f"{diff:.2e} (logits up to {scale:.3g})")
    exact = model.config.attn_eps == REFERENCE_ATTN_EPS
    if exact and diff > CHECK_TOLERANCE * (1 + scale):
        print(f"mpcvit import: the imported model does not reproduce the reference forward "
              f"(max difference {diff:.3g}); nothing written", file=sys.stderr)
        return 1
    if not exact:
        say(f"  (attn_eps {model.config.attn_eps:g} instead of the reference's "
            f"{REFERENCE_ATTN_EPS:g}: the difference is that choice, not an import error)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, args.out,
                    extra=_metadata(rf, args.reference, model.config.in_chans, diff))
    say(f"wrote {args.out}: evaluate it with `mpcvit eval --model {args.out} --data DATA "
        f"[--secure]`, or serve it as party 0's `model:`")
    if args.json:
        print(json.dumps({"out": str(args.out), "config": model.config.to_dict(),
                          "spec": model.spec.to_dict(), "max_abs_diff": diff,
                          "max_abs_logit": scale, "weights": rf.source}))
    return 0
