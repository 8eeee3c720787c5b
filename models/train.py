"""Plain-torch training loop for the plaintext ViTs (no CLI needed).

AdamW with a linear warm-up then cosine decay (ReLU-softmax attention diverges without
warm-up), label smoothing, light augmentation, per-epoch progress through a callback,
resumable state files and optional knowledge distillation from a softmax teacher
(the MPCViT recipe: hard-label CE + temperature-scaled KL on logits + MSE on the final
token features).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataBundle


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.01  # cosine floor as a fraction of ``lr``
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    augment: bool = True
    seed: int = 0
    threads: int = 2
    eval_batch_size: int = 500
    # distillation (used only when a teacher is given)
    kd_temperature: float = 4.0
    kd_weight: float = 1.0  # weight of the soft logit term
    feature_weight: float = 1.0  # weight of the feature MSE term

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size and lr positive")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did, as reported to the progress callback."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float
    lr: float
    terms: dict[str, float] = field(default_factory=dict)  # distillation loss parts

    def line(self) -> str:
        """One human-readable progress line."""
        extra = "".join(f" {k}={v:.4f}" for k, v in self.terms.items())
        return (
            f"epoch {self.epoch}/{self.epochs} loss={self.loss:.4f} "
            f"train_acc={self.train_acc:.4f} test_loss={self.test_loss:.4f} "
            f"test_acc={self.test_acc:.4f} lr={self.lr:.2e} {self.seconds:.1f}s{extra}"
        )


@dataclass
class TrainResult:
    """Per-epoch history; ``start_epoch`` > 0 when the run resumed from a state file."""

    history: list[EpochStats]
    start_epoch: int = 0

    @property
    def final(self) -> EpochStats | None:
        return self.history[-1] if self.history else None


ProgressFn = Callable[[EpochStats], None]


def print_progress(stats: EpochStats) -> None:
    """Default progress callback: one line per epoch on stdout."""
    print(stats.line(), flush=True)


# ----------------------------------------------------------------------------- schedule


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine down to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases, norms, embeddings) plus a per-step warm-up/cosine schedule."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "emb" in name or "token" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def multiplier(step: int) -> float:
        return warmup_cosine(step, total, warm, cfg.min_lr_ratio)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, multiplier)


# ----------------------------------------------------------------------------- batches


def augment_batch(
    x: torch.Tensor, padding: int, hflip: bool, fill: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """Random crop after padding with the black-pixel value ``fill`` (per channel), and
    an optional random horizontal flip."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = fill.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(
            n, c, h, w + 2 * padding
        )
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, c, h, w)
        x = x.gather(3, cols)
    if hflip:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches, shuffled with ``gen`` (in order when ``gen`` is None)."""
    n = len(labels)
    order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        yield images[idx], labels[idx]


# ----------------------------------------------------------------------------- features


class FeatureTap:
    """Captures a sub-module's output during forward (the final token features for
    distillation), without the model having to return it."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.value = output

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("FeatureTap saw no forward pass")
        v, self.value = self.value, None
        return v

    def close(self) -> None:
        self._handle.remove()


def feature_module(model: nn.Module, name: str | None = None) -> nn.Module:
    """The module whose output is the final token features: ``name`` if given, else the
    model's final LayerNorm (``norm``, or the last LayerNorm registered)."""
    if name:
        return model.get_submodule(name)
    if isinstance(getattr(model, "norm", None), nn.Module):
        return model.norm
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    if not norms:
        raise ValueError("model has no LayerNorm to take features from; pass feature_name")
    return norms[-1]


# ----------------------------------------------------------------------------- losses


def distillation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    features: torch.Tensor,
    teacher_features: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Hard-label CE + T²·KL(teacher‖student) at temperature T + MSE on features."""
    hard = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
    t = cfg.kd_temperature
    soft = F.kl_div(
        F.log_softmax(logits / t, dim=-1),
        F.log_softmax(teacher_logits / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    feat = F.mse_loss(features, teacher_features)
    total = hard + cfg.kd_weight * soft + cfg.feature_weight * feat
    return total, {"hard": hard.item(), "soft": soft.item(), "feature": feat.item()}


@torch.no_grad()
def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on a split."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in iterate_batches(images, labels, batch_size, None):
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(-1) == y).sum().item()
    model.train(was_training)
    n = max(1, len(labels))
    return loss_sum / n, correct / n


# ----------------------------------------------------------------------------- state


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write a training state atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _state(model, opt, sched, epoch: int, history: list[EpochStats], cfg: TrainConfig) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "history": [asdict(h) for h in history],
        "train_config": asdict(cfg),
    }


# ----------------------------------------------------------------------------- loop


def train(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig = TrainConfig(),
    *,
    teacher: nn.Module | None = None,
    feature_name: str | None = None,
    teacher_feature_name: str | None = None,
    state_path: str | os.PathLike | None = None,
    resume: bool = False,
    progress: ProgressFn | None = print_progress,
) -> TrainResult:
    """Train ``model`` (NCHW images -> logits) on ``data`` in place.

    With ``state_path`` the optimizer/scheduler/epoch state is saved after every epoch;
    with ``resume`` and an existing state file, training continues after its epoch.
    Epoch ``e`` always uses seed ``cfg.seed + e`` so a resumed run matches an unbroken one.
    """
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    train_x, train_y = data.train.tensors()
    test_x, test_y = data.test.tensors()
    steps = math.ceil(len(train_y) / cfg.batch_size)
    opt, sched = make_optimizer(model, cfg, steps)
    history: list[EpochStats] = []
    start = 0
    if resume and state_path is not None and Path(state_path).is_file():
        try:
            st = load_state(state_path)
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            start = int(st["epoch"])
            history = [EpochStats(**h) for h in st["history"]]
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{state_path}: cannot resume from this training state ({exc})"
            ) from exc
    fill = torch.tensor([-m / s for m, s in zip(data.normalization.mean, data.normalization.std,
                                                   strict=True)])  # fmt: skip
    taps: tuple[FeatureTap, FeatureTap] | None = None
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        taps = (
            FeatureTap(feature_module(model, feature_name)),
            FeatureTap(feature_module(teacher, teacher_feature_name)),
        )
    try:
        for epoch in range(start, cfg.epochs):
            stats = _train_epoch(model, teacher, taps, opt, sched, train_x, train_y, fill, data,
                                 cfg, epoch)  # fmt: skip
            test_loss, test_acc = evaluate(model, test_x, test_y, cfg.eval_batch_size)
            stats = EpochStats(epoch=epoch + 1, epochs=cfg.epochs, test_loss=test_loss,
                               test_acc=test_acc, **stats)  # fmt: skip
            history.append(stats)
            if state_path is not None:
                save_state(state_path, _state(model, opt, sched, epoch + 1, history, cfg))
            if progress is not None:
                progress(stats)
    finally:
        if taps is not None:
            for tap in taps:
                tap.close()
    return TrainResult(history=history, start_epoch=start)


def _train_epoch(model, teacher, taps, opt, sched, train_x, train_y, fill, data, cfg, epoch):
    """One pass over the training split; returns the EpochStats fields it measured."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + epoch)  # dropout etc.
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    term_sums: dict[str, float] = {}
    for x, y in iterate_batches(train_x, train_y, cfg.batch_size, gen):
        if cfg.augment:
            x = augment_batch(x, data.crop_padding, data.hflip, fill, gen)
        logits = model(x)
        if teacher is not None and taps is not None:
            feats = taps[0].pop()
            with torch.no_grad():
                t_logits = teacher(x)
            t_feats = taps[1].pop()
            loss, terms = distillation_loss(logits, y, t_logits, feats, t_feats, cfg)
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v * len(y)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(-1) == y).sum().item()
        seen += len(y)
    n = max(1, seen)
    return {
        "loss": loss_sum / n,
        "train_acc": correct / n,
        "seconds": time.perf_counter() - t0,
        "lr": opt.param_groups[0]["lr"],
        "terms": {k: v / n for k, v in term_sums.items()},
    }
