"""``mpcvit train``: train a plaintext ViT and write an mpcvit checkpoint.

The optimizer/scheduler state goes to ``OUT.state`` after every epoch, so an interrupted
run continues with ``--resume``; the checkpoint itself (config + spec + weights) is
written when training ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "train a plaintext ViT (optionally distilled from a teacher) and save a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="config name (e.g. demo, vit_7_4_32)")
    parser.add_argument(
        "--arch",
        default="softmax",
        help="arch spec YAML file, or ATTENTION[+ACTIVATION][+NORM] applied to every "
        "head/layer (e.g. relu_softmax+relu, scale+relu+batchnorm); default softmax+gelu",
    )
    parser.add_argument(
        "--data",
        required=True,
        help="fashion-mnist[:DIR], digits, cifar10:DIR, cifar100:DIR, folder:DIR, "
        "synthetic[:k=v,...] or a dataset directory",
    )
    parser.add_argument("--out", required=True, type=Path, help="checkpoint to write")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=1.0, help="warm-up epochs")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    parser.add_argument("--limit", type=int, default=None, help="use N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use N test images")
    parser.add_argument("--teacher", default=None,
                        help="softmax teacher: a checkpoint path or a shipped name (teacher)")
    parser.add_argument("--kd-temperature", type=float, default=4.0)
    parser.add_argument("--kd-weight", type=float, default=1.0, help="soft-logit loss weight")
    parser.add_argument("--feature-weight", type=float, default=1.0, help="feature MSE weight")
    parser.add_argument("--resume", action="store_true", help="continue from OUT.state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (1 is steadier when other jobs share the cores)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda[:N]")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="training matmuls; auto: bf16 where the hardware has it natively")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training forward (about a minute to start)")


def state_path_for(out: Path) -> Path:
    """Where the resumable training state of checkpoint ``out`` lives."""
    return out.with_name(out.name + ".state")


def run(args: argparse.Namespace) -> int:
    import torch
    from mpcvit.models.configs import get_config
    from mpcvit.models.data import DatasetError, limit_bundle, load_dataset
    from mpcvit.models.plan import arch_plan
    from mpcvit.models.spec import ArchSpec
    from mpcvit.models.train import TrainConfig, resolve_device, resolve_precision, train
    from mpcvit.models.vit import build_model

    from .common import fit_config

    torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
        data = limit_bundle(load_dataset(args.data), args.limit, args.test_limit, args.seed)
        config = fit_config(get_config(args.model), data)
        spec = ArchSpec.parse(args.arch, config.depth, config.heads)
        plan = arch_plan(args.arch)  # the search's protocol plan, kept in the checkpoint
    except (DatasetError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    model = build_model(config, spec, plan)
    teacher = None
    if args.teacher is not None:
        from mpcvit.models.checkpoint import CheckpointError, load_model, resolve_checkpoint

        try:
            teacher = load_model(resolve_checkpoint(args.teacher))
        except (CheckpointError, FileNotFoundError) as exc:
            print(f"error: teacher: {exc}", file=sys.stderr)
            return 2
        if teacher.config.replace(name="") != config.replace(name=""):
            print(f"error: teacher shape {teacher.config} differs from {config}", file=sys.stderr)
            return 2
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup,
        label_smoothing=args.label_smoothing,
        augment=not args.no_augment,
        seed=args.seed,
        threads=args.threads,
        kd_temperature=args.kd_temperature,
        kd_weight=args.kd_weight,
        feature_weight=args.feature_weight,
        device=args.device,
        precision=args.precision,
        compile=args.compile,
    )
    precision = resolve_precision(cfg.precision, device)
    print(
        f"train {config.name} {spec.summary()} on {data.name}: "
        f"{len(data.train)} train / {len(data.test)} test images, {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}, {device} {precision}",
        flush=True,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = state_path_for(args.out)
    if args.resume and state.is_file():
        print(f"resuming from {state}", flush=True)
    try:
        result = train(model, data, cfg, teacher=teacher, state_path=state, resume=args.resume)
    except ValueError as exc:  # e.g. a state file from another model
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = result.final
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
               if not k.startswith("_")}  # fmt: skip
    extra = {
        "dataset": data.name,
        "normalization": {
            "mean": list(data.normalization.mean),
            "std": list(data.normalization.std),
        },
        "class_names": list(data.class_names),
        "test_acc": None if final is None else final.test_acc,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "train_options": options,
        "train_precision": precision,
    }
    from mpcvit.models.checkpoint import save_checkpoint

    save_checkpoint(model, args.out, extra=extra)
    acc = "n/a" if final is None else f"{final.test_acc:.4f}"
    print(f"saved {args.out} (test_acc={acc})")
    return 0
