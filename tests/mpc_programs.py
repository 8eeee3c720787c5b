"""Programs run inside party processes by the runtime tests (must be importable)."""

from __future__ import annotations

import os
import time

import torch
from mpcvit.mpc.compat import import_crypten

crypten = import_crypten()
from crypten.mpc.primitives import BinarySharedTensor  # noqa: E402

# Fixed plaintext inputs: party 0 holds x (and w), party 1 holds y.
X = torch.tensor([[0.5, -1.25, 2.0, 3.5], [-0.75, 1.5, 0.25, -2.5]])
Y = torch.tensor([[1.5, 0.5, -1.0, 2.0], [2.25, -0.5, 1.75, 0.125]])
IMG = torch.linspace(-1, 1, 1 * 2 * 5 * 5).reshape(1, 2, 5, 5)
KERNEL = torch.linspace(-0.5, 0.5, 3 * 2 * 3 * 3).reshape(3, 2, 3, 3)
POS = torch.tensor([0.5, 1.0, 4.0, 20.0, 80.0, 150.0])  # where CrypTen is accurate
BITS_A = torch.tensor([0b1011, 0b0110, 123456789, -5], dtype=torch.long)
BITS_B = torch.tensor([0b0110, 0b0011, 987654321, 77], dtype=torch.long)


def all_ops() -> dict[str, torch.Tensor]:
    """Every operation the issue lists, revealed (both parties get the same values)."""
    x = crypten.cryptensor(X, src=0)
    y = crypten.cryptensor(Y, src=1)
    img = crypten.cryptensor(IMG, src=1)
    kernel = crypten.cryptensor(KERNEL, src=0)
    pos = crypten.cryptensor(POS, src=0)
    # Integer XOR/AND on binary (XOR-shared) tensors.
    a = BinarySharedTensor(BITS_A, src=0)
    b = BinarySharedTensor(BITS_B, src=1)
    out = {
        "add": x + y,
        "mul": x * y,
        "matmul": x.matmul(y.t()),
        "conv2d": img.conv2d(kernel, padding=1),
        "relu": x.relu(),
        "gt": x > y,
        "lt": x < y,
        "eq": x == x,
        "exp": (x / 2).exp(),
        "reciprocal": pos.reciprocal(),
        "inv_sqrt": pos.inv_sqrt(),
        "erf": (x / 4).erf(),
        "softmax": x.softmax(dim=-1),
        "argmax": x.argmax(dim=-1, one_hot=True),
        "xor": a ^ b,
        "and": a & b,
    }
    revealed = {k: v.get_plain_text() for k, v in out.items()}
    revealed["_stats"] = crypten.communicator.get().get_communication_stats()
    return revealed


def plaintext_ops() -> dict[str, torch.Tensor]:
    return {
        "add": X + Y,
        "mul": X * Y,
        "matmul": X @ Y.t(),
        "conv2d": torch.nn.functional.conv2d(IMG, KERNEL, padding=1),
        "relu": X.relu(),
        "gt": (X > Y).float(),
        "lt": (X < Y).float(),
        "eq": torch.ones_like(X),
        "exp": (X / 2).exp(),
        "reciprocal": POS.reciprocal(),
        "inv_sqrt": POS.rsqrt(),
        "erf": torch.erf(X / 4),
        "softmax": X.softmax(dim=-1),
        "argmax": torch.nn.functional.one_hot(X.argmax(dim=-1), X.shape[-1]).float(),
        "xor": BITS_A ^ BITS_B,
        "and": BITS_A & BITS_B,
    }


def die_midway(rank_to_die: int = 1) -> torch.Tensor:
    """One party exits abruptly mid-protocol; the other keeps computing."""
    x = crypten.cryptensor(X, src=0)
    y = x * x
    if crypten.communicator.get().get_rank() == rank_to_die:
        os._exit(3)
    for _ in range(5):
        y = y * x
    return y.get_plain_text()


def fail_midway(rank_to_fail: int = 0) -> torch.Tensor:
    """One party's own part of the session fails (an exception, not a crash)."""
    x = crypten.cryptensor(X, src=0)
    y = x * x
    if crypten.communicator.get().get_rank() == rank_to_fail:
        raise RuntimeError("this party's part failed")
    for _ in range(5):
        y = y * x
    return y.get_plain_text()


def stall(rank_to_stall: int = 1, seconds: float = 30.0) -> torch.Tensor:
    """One party goes silent (alive, connected) for longer than the recv timeout."""
    x = crypten.cryptensor(X, src=0)
    if crypten.communicator.get().get_rank() == rank_to_stall:
        time.sleep(seconds)
    return (x * x).get_plain_text()


def small_mul() -> torch.Tensor:
    x = crypten.cryptensor(X, src=0)
    y = crypten.cryptensor(Y, src=1)
    return (x * y).get_plain_text()


def _mixed_work() -> torch.Tensor:
    x = crypten.cryptensor(X, src=0)
    y = crypten.cryptensor(Y, src=1)
    return (x.matmul(y.t()).relu() + (x * y).sum()).softmax(dim=-1).get_plain_text()


def offline_phase() -> dict:
    """Record a trace, prepare a dealer session offline, rerun with no online dealer calls."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    rank = crypten.communicator.get().get_rank()
    first = _mixed_work()
    state = provider.state
    trace, spec = list(state.trace), state.spec
    provider.end()
    offline_s = provider.prepare("prepared-session", rank, 2, spec, trace)
    provider.begin("prepared-session", rank, 2, spec)
    calls_before = provider.stats()["requests"]
    second = _mixed_work()
    return {
        "first": first, "second": second, "tuples": len(trace),
        "online_calls": provider.stats()["requests"] - calls_before,
        "offline_calls": calls_before, "offline_s": offline_s,
    }


def offline_phase_one_party(prepared_rank: int) -> torch.Tensor:
    """Only ``prepared_rank`` prepares the second session; the other party draws (and,
    as party 0, fetches) its tuples during it.  The result must not change."""
    from mpcvit.mpc import runtime

    provider = runtime.dealer_provider()
    rank = crypten.communicator.get().get_rank()
    _mixed_work()
    state = provider.state
    trace, spec = list(state.trace), state.spec
    provider.end()
    if rank == prepared_rank:
        provider.prepare("half-prepared", rank, 2, spec, trace)
    provider.begin("half-prepared", rank, 2, spec)
    return _mixed_work()


def plain_mixed_work() -> torch.Tensor:
    return ((X @ Y.t()).relu() + (X * Y).sum()).softmax(dim=-1)


def ports_and_product() -> dict:
    """The port this party's server listens on (from its transport) and x*y."""
    comm = crypten.communicator.get()
    return {"port": int(comm.transport.listen_port), "product": small_mul()}


def idle_stats() -> dict:
    """The communication figures of a session that runs nothing."""
    return dict(crypten.communicator.get().get_communication_stats())


def one_product_stats() -> dict:
    """x·y of two fresh sharings (sharing is local: pseudo-random zero shares), then the
    figures: one Beaver product opens x − a and y − b in one exchange."""
    x = crypten.cryptensor(X, src=0)
    y = crypten.cryptensor(Y, src=1)
    x * y
    return dict(crypten.communicator.get().get_communication_stats())
