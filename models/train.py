"""Plain-torch training loop for the plaintext ViTs (no CLI needed).

AdamW with a linear warm-up then cosine decay (ReLU-softmax attention diverges without
warm-up), label smoothing, light augmentation, per-epoch progress through a callback,
resumable state files and optional knowledge distillation from a softmax teacher
(the MPCViT recipe: hard-label CE + temperature-scaled KL on logits + MSE on the final
token features).

Speed on CPU (measured in ``models/assets/README.md``): bf16 autocast where the hardware
computes bf16 natively, a fused AdamW and a single-kernel gradient clip.  The same loop
runs on CUDA (``device``); ``compile`` adds ``torch.compile`` on the training forward.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
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
    eval_batch_size: int = 256
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda" or "cuda:N"
    precision: str = "auto"  # "auto" (bf16 where native), "bf16" or "fp32"
    fused_optimizer: bool = True  # one fused AdamW kernel instead of a loop per tensor
    compile: bool = False  # torch.compile the training forward (slow start, see README)
    # distillation (used only when a teacher is given)
    kd_temperature: float = 4.0
    kd_weight: float = 1.0  # weight of the soft logit term
    feature_weight: float = 1.0  # weight of the feature MSE term

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size <= 0 or self.lr <= 0:
            raise ValueError("epochs must be >= 0, batch_size and lr positive")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ValueError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


PRECISIONS = ("auto", "bf16", "fp32")
# Settings that shape the trajectory: a run resumes only with the ones it was started with
# (``epochs`` may grow; device, threads, precision and compile may change between sittings).
RESUME_KEYS = ("batch_size", "lr", "min_lr_ratio", "weight_decay", "warmup_epochs",
               "label_smoothing", "grad_clip", "augment", "seed")


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did, as reported to the progress callback."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    seconds: float  # training pass of this epoch
    lr: float
    terms: dict[str, float] = field(default_factory=dict)  # distillation loss parts
    elapsed: float = 0.0  # wall seconds since this sitting started (training + evaluation)
    eta: float = 0.0  # estimated seconds to the last epoch, from this sitting's pace

    def line(self) -> str:
        """One human-readable progress line."""
        extra = "".join(f" {k}={v:.4f}" for k, v in self.terms.items())
        return (
            f"epoch {self.epoch}/{self.epochs} loss={self.loss:.4f} "
            f"train_acc={self.train_acc:.4f} test_loss={self.test_loss:.4f} "
            f"test_acc={self.test_acc:.4f} lr={self.lr:.2e} {self.seconds:.1f}s "
            f"elapsed={_clock(self.elapsed)} eta={_clock(self.eta)}{extra}"
        )


def _clock(seconds: float) -> str:
    """H:MM:SS."""
    s = max(0, int(round(seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


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


# ----------------------------------------------------------------------------- device


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``: ``auto`` is CUDA when available, else CPU.  Asking
    for CUDA where there is none is a ValueError with the reason, not a late failure."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested, but no CUDA GPU is available to "
                             "this torch build (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r} (use auto, cpu, cuda or cuda:N)")
    return device


def cpu_has_native_bf16(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX): only then is bf16
    autocast faster than fp32 (elsewhere it is emulated and slower)."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``bf16`` or ``fp32``: ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs
    with native bf16, fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """bf16 autocast (matmuls in bf16, weights and reductions stay fp32), or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


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
        fused=cfg.fused_optimizer or None,
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
    an optional random horizontal flip.

    Vectorised over the batch (two gathers, one select); the random draws come from the
    CPU generator ``gen`` whatever ``x``'s device, so a run's augmentation does not depend
    on where it trains.
    """
    n, c, h, w = x.shape
    dev = x.device
    if padding > 0:
        padded = fill.to(dev, x.dtype).view(1, c, 1, 1).expand(
            n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(dev)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(dev)
        rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None].expand(
            n, c, h, w + 2 * padding
        )
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :].expand(
            n, c, h, w)
        x = x.gather(3, cols)
    if hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def iterate_batches(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, gen: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches, shuffled with ``gen`` (in order when ``gen`` is None); the order is
    drawn on the CPU, the batches come from wherever ``images`` lives."""
    n = len(labels)
    if gen is None:
        for start in range(0, n, batch_size):
            yield images[start : start + batch_size], labels[start : start + batch_size]
        return
    order = torch.randperm(n, generator=gen).to(images.device)
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


def _distillation_step(
    student: Callable[[torch.Tensor], torch.Tensor],
    teacher: nn.Module,
    taps: tuple[FeatureTap, FeatureTap],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one distilled batch and its parts as detached tensors (no host sync)."""
    logits = student(x)
    feats = taps[0].pop()
    with torch.no_grad():
        t_logits = teacher(x)
    t_feats = taps[1].pop()
    hard = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    t = cfg.kd_temperature
    soft = F.kl_div(F.log_softmax(logits.float() / t, dim=-1),
                    F.log_softmax(t_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * (t * t)
    feat = F.mse_loss(feats.float(), t_feats.float())
    loss = hard + cfg.kd_weight * soft + cfg.feature_weight * feat
    parts = {"hard": hard.detach(), "soft": soft.detach(), "feature": feat.detach()}
    return logits, loss, parts


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on a split, in fp32 on the model's
    device (the split may live elsewhere).  Small batches stay in cache: on 2 CPU cores
    256 images per batch evaluate faster than 1000."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in iterate_batches(images, labels, batch_size, None):
        out = model(x.to(device))
        y = y.to(device)
        loss_sum += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(-1) == y).sum()
    model.train(was_training)
    n = max(1, len(labels))
    return loss_sum.item() / n, correct.item() / n


# ----------------------------------------------------------------------------- state


def save_state(path: str | os.PathLike, state: dict) -> None:
    """Write a training state atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _state(model: nn.Module, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LambdaLR, epoch: int, history: list[EpochStats],
           cfg: TrainConfig) -> dict:
    """Everything a later sitting needs.  The random streams need no saving: epoch ``e``
    reseeds them from ``cfg.seed`` and ``e``, so they are a function of the epoch."""
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "history": [asdict(h) for h in history],
        "train_config": asdict(cfg),
    }


def _resume(state_path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LambdaLR,
            cfg: TrainConfig) -> tuple[list[EpochStats], int]:
    """Load a state file into model/optimizer/scheduler; (history, epochs done)."""
    try:
        st = load_state(state_path)
        saved = st.get("train_config", {})
        changed = [f"{k}={saved[k]!r} (now {getattr(cfg, k)!r})" for k in RESUME_KEYS
                   if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise ValueError("it was made with " + ", ".join(changed))
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        history = [EpochStats(**h) for h in st["history"]]
        return history, int(st["epoch"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{state_path}: cannot resume from this training state ({exc})") from exc


# ----------------------------------------------------------------------------- loop


@dataclass
class _Run:
    """What every step of a run uses (built once by ``train``)."""

    model: nn.Module  # the module holding the weights
    forward: Callable[[torch.Tensor], torch.Tensor]  # ``model`` or its compiled form
    teacher: nn.Module | None
    taps: tuple[FeatureTap, FeatureTap] | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    precision: str
    fill: torch.Tensor


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
    Training runs on ``cfg.device``; the model (and teacher) end where they started.
    """
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    home = next(model.parameters()).device
    teacher_home = None if teacher is None else next(teacher.parameters()).device
    model.to(device)
    train_x, train_y = (t.to(device) for t in data.train.tensors())
    test_x, test_y = (t.to(device) for t in data.test.tensors())
    opt, sched = make_optimizer(model, cfg, math.ceil(len(train_y) / cfg.batch_size))
    history: list[EpochStats] = []
    start = 0
    if resume and state_path is not None and Path(state_path).is_file():
        history, start = _resume(state_path, model, opt, sched, cfg)
    fill = torch.tensor([-m / s for m, s in zip(data.normalization.mean, data.normalization.std,
                                                   strict=True)], device=device)  # fmt: skip
    taps = None if teacher is None else _teacher_taps(model, teacher.to(device), feature_name,
                                                       teacher_feature_name)  # fmt: skip
    run = _Run(model, torch.compile(model) if cfg.compile else model, teacher, taps, opt,
               sched, device, precision, fill)  # fmt: skip
    began = time.perf_counter()
    try:
        for epoch in range(start, cfg.epochs):
            stats = _train_epoch(run, train_x, train_y, data, cfg, epoch)
            test_loss, test_acc = evaluate(model, test_x, test_y, cfg.eval_batch_size)
            elapsed = time.perf_counter() - began
            eta = elapsed / (epoch + 1 - start) * (cfg.epochs - epoch - 1)
            stats = EpochStats(epoch=epoch + 1, epochs=cfg.epochs, test_loss=test_loss,
                               test_acc=test_acc, elapsed=elapsed, eta=eta, **stats)  # fmt: skip
            history.append(stats)
            if state_path is not None:
                save_state(state_path, _state(model, opt, sched, epoch + 1, history, cfg))
            if progress is not None:
                progress(stats)
    finally:
        for tap in taps or ():
            tap.close()
        model.to(home)
        if teacher is not None:
            teacher.to(teacher_home)
    return TrainResult(history=history, start_epoch=start)


def _teacher_taps(model: nn.Module, teacher: nn.Module, feature_name: str | None,
                  teacher_feature_name: str | None) -> tuple[FeatureTap, FeatureTap]:
    """Freeze the teacher; hooks that capture both models' final token features."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return (
        FeatureTap(feature_module(model, feature_name)),
        FeatureTap(feature_module(teacher, teacher_feature_name)),
    )


def _train_epoch(run: _Run, train_x: torch.Tensor, train_y: torch.Tensor, data: DataBundle,
                 cfg: TrainConfig, epoch: int) -> dict[str, float | dict[str, float]]:
    """One pass over the training split; returns the EpochStats fields it measured.

    Sums stay on the device (no host sync per step); the loss is taken in fp32 whatever
    the autocast precision.
    """
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + epoch)  # dropout etc.
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    run.model.train()
    params = [p for p in run.model.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    term_sums: dict[str, torch.Tensor] = {}
    for x, y in iterate_batches(train_x, train_y, cfg.batch_size, gen):
        if cfg.augment:
            x = augment_batch(x, data.crop_padding, data.hflip, run.fill, gen)
        with autocast(run.device, run.precision):
            if run.taps is not None:
                logits, loss, parts = _distillation_step(run.forward, run.teacher, run.taps,
                                                         x, y, cfg)  # fmt: skip
                for k, v in parts.items():
                    term_sums[k] = term_sums.get(k, 0.0) + v * len(y)
            else:
                logits = run.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        run.opt.step()
        run.sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(-1) == y).sum()
    n = max(1, len(train_y))
    return {
        "loss": loss_sum.item() / n,
        "train_acc": correct.item() / n,
        "seconds": time.perf_counter() - t0,
        "lr": run.opt.param_groups[0]["lr"],
        "terms": {k: float(v) / n for k, v in term_sums.items()},
    }
