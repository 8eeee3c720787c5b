"""The measurements of docs/published-checkpoints.md, in one command:

    nice -n 10 .venv/bin/python -m mpcvit.bench.published --out runs/published

1. **Import exactness** at the published shapes (``vit_7_4_32``, ``vit_9_12_64``): a
   reference-layout MPCViT+ model (trained-like weight scales, mixed alphas, mixed betas)
   saved as the reference trainer saves it (timm ``CheckpointSaver``: ``args`` Namespace,
   optimizer state, EMA weights), imported with ``mpcvit import``; the imported logits
   against the reference forward, with the reference's eps and with 2**-8.
2. **MPCViT+ under MPC on real images**: a demo-shaped MPCViT+ (CCT block, half the heads
   ReLU-softmax, GeLU on the class token and the central 5x5 patches of every layer but
   the last, whose MLP is linearised) trained briefly on Fashion-MNIST, written as a
   reference trainer file, imported, and evaluated with ``mpcvit eval --secure`` (dealer,
   both parties over gRPC); the same weights with GeLU on every token are run in the same
   way as the baseline for rounds and bytes.
3. With ``--secure-big``: the ``vit_7_4_32`` MPCViT+ of step 1 and its all-GeLU twin in a
   whole-model secure run on random inputs (argmax agreement, rounds, bytes).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..models.configs import get_config
from ..models.reference import to_reference_state_dict
from ..models.spec import ArchSpec, LayerSpec
from ..models.vit import ViT


def save_trainer_checkpoint(sd: dict[str, torch.Tensor], path: Path, **args: Any) -> None:
    """``sd`` written as the reference trainer writes it: timm's CheckpointSaver dict with
    a DataParallel ``module.`` prefix, EMA weights, optimizer state and the command line
    as an argparse.Namespace."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=5.5e-4)
    torch.save({"epoch": 0, "arch": args.get("model", "vit"), "version": 2,
                "args": argparse.Namespace(**args),
                "state_dict": collections.OrderedDict(("module." + k, v) for k, v in sd.items()),
                "state_dict_ema": collections.OrderedDict(sd.items()),
                "optimizer": opt.state_dict(), "metric": 0.0}, path)


def mpcvit_plus_spec(depth: int, heads: int, side: int, mu: float = 0.5,
                     keep: int | None = None) -> ArchSpec:
    """Half the heads ReLU-softmax (``ArchSpec.grouped``); GeLU on the class token and the
    central ``keep`` x ``keep`` patches of every layer but the last, whose MLP is
    linearised (an empty mask)."""
    keep = keep if keep is not None else max(1, side - 2)
    lo = (side - keep) // 2
    central = tuple(1 + r * side + c for r in range(lo, lo + keep) for c in range(lo, lo + keep))
    grouped = ArchSpec.grouped(depth, heads, mu)
    layers = [LayerSpec(layer.attention, "gelu", (0, *central) if i < depth - 1 else ())
              for i, layer in enumerate(grouped.layers)]
    return ArchSpec(tuple(layers))


def _trained_like(model: ViT, seed: int) -> ViT:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name and "token" not in name:
                p.mul_(4.0)
    return model.eval()


def _cli(argv: list[str]) -> dict:
    """Run an ``mpcvit`` subcommand with ``--json`` as users do (its own process); its
    last stdout line as a dict."""
    proc = subprocess.run([sys.executable, "-m", "mpcvit.commands", *argv, "--json"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"mpcvit {' '.join(argv)} exited {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exactness(out: Path, name: str, seed: int = 0) -> dict[str, Any]:
    """Step 1 for one published shape."""
    cfg = get_config(name).replace(block="cct")
    side = int(round((cfg.num_tokens - 1) ** 0.5))
    torch.manual_seed(seed)
    model = _trained_like(ViT(cfg, mpcvit_plus_spec(cfg.depth, cfg.heads, side)), seed)
    ref = out / f"{name}_plus.pth.tar"
    save_trainer_checkpoint(to_reference_state_dict(model), ref, model=name, linear_gelu=True)
    row: dict[str, Any] = {"model": name}
    for label, extra in (("eps_1e-5", []), ("eps_2^-8", ["--attn-eps", str(2.0**-8)])):
        rep = _cli(["import", "--reference", str(ref), "--out", str(out / f"{name}.pt"), *extra])
        row[label] = rep["max_abs_diff"]
        row["max_abs_logit"] = rep["max_abs_logit"]
    return row


def secure_eval(ckpt: Path, images: int) -> dict[str, Any]:
    return _cli(["eval", "--model", str(ckpt), "--data", "fashion-mnist", "--secure",
                 "--limit", str(images)])


def train_demo_plus(out: Path, epochs: float, train_limit: int | None, seed: int = 0,
                    **train_options: Any) -> tuple[ViT, Path]:
    """Step 2's model: trained (``train_options`` override ``TrainConfig``'s fields),
    then written as a reference trainer file."""
    from ..models.data import limit_bundle, load_dataset
    from ..models.train import TrainConfig, train

    cfg = get_config("demo").replace(block="cct", attn_eps=1e-5)
    torch.manual_seed(seed)
    model = ViT(cfg, mpcvit_plus_spec(cfg.depth, cfg.heads, 7, keep=5))
    data = load_dataset("fashion-mnist")
    if train_limit:
        data = limit_bundle(data, train_limit, 1000)
    train(model, data, TrainConfig(epochs=max(1, round(epochs)), seed=seed, **train_options),
          progress=None)
    ref = out / "demo_plus.pth.tar"
    save_trainer_checkpoint(to_reference_state_dict(model.eval()), ref, model="demo_plus",
                            dataset="fashion_mnist", mean=[0.2860], std=[0.3530],
                            linear_gelu=True)
    return model, ref


def real_images(out: Path, epochs: float, train_limit: int | None, images: int) -> dict:
    """Step 2."""
    from ..models.checkpoint import load_checkpoint, save_checkpoint

    tic = time.perf_counter()
    _, ref = train_demo_plus(out, epochs, train_limit)
    trained_s = time.perf_counter() - tic
    plus = out / "demo_plus.pt"
    imp = _cli(["import", "--reference", str(ref), "--out", str(plus)])
    full_model, extra = load_checkpoint(plus)
    full_model.set_spec(ArchSpec(tuple(LayerSpec(layer.attention, "gelu")
                                       for layer in full_model.spec.layers)))
    full = out / "demo_plus_all_gelu.pt"
    save_checkpoint(full_model, full, extra)
    return {"train_seconds": trained_s, "import_max_abs_diff": imp["max_abs_diff"],
            "plus": secure_eval(plus, images), "all_gelu": secure_eval(full, images)}


def secure_big(out: Path, images: int) -> dict[str, Any]:
    """Step 3 (needs step 1's vit_7_4_32 file)."""
    from ..models.checkpoint import load_checkpoint
    from ..models.profiler import measure_secure_model

    model, _ = load_checkpoint(out / "vit_7_4_32.pt")
    cfg = model.config
    x = torch.randn(images, cfg.in_chans, cfg.image_size, cfg.image_size,
                    generator=torch.Generator().manual_seed(1))
    rows = {}
    for label, spec in (("plus", model.spec),
                        ("all_gelu", ArchSpec(tuple(LayerSpec(layer.attention, "gelu")
                                                    for layer in model.spec.layers)))):
        model.set_spec(spec)
        run = measure_secure_model(cfg, spec, x, model.state_dict())
        with torch.no_grad():
            want = model(x)
        rows[label] = {"rounds": run.rounds, "bytes": run.bytes,
                       "seconds": run.cost.compute_s,
                       "agreement": float((run.logits.argmax(1) == want.argmax(1)).float()
                                          .mean()),
                       "max_abs_err": float((run.logits - want).abs().max())}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/published"))
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--train-limit", type=int, default=None, help="training images (default all)")
    p.add_argument("--images", type=int, default=50, help="test images run securely")
    p.add_argument("--secure-big", type=int, default=0,
                   help="random inputs for step 3 (0: skip it)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"exactness": [exactness(args.out, n)
                                            for n in ("vit_7_4_32", "vit_9_12_64")]}
    print(json.dumps(result["exactness"]), flush=True)
    result["real_images"] = real_images(args.out, args.epochs, args.train_limit, args.images)
    print(json.dumps(result["real_images"]), flush=True)
    if args.secure_big:
        result["secure_big"] = secure_big(args.out, args.secure_big)
        print(json.dumps(result["secure_big"]), flush=True)
    (args.out / "published.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
