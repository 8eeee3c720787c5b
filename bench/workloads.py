"""MPC workloads shared by benchmarks and tests (run inside party processes)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ..mpc.compat import import_crypten

crypten = import_crypten()

Tensor = Any  # crypten MPCTensor


def vit_block(x: Tensor, w_qkv: Tensor, w_proj: Tensor, w1: Tensor, w2: Tensor,
              heads: int) -> Tensor:
    """One ViT block on encrypted tensors: softmax attention + ReLU MLP, residuals."""
    tokens, dim = x.shape
    hd = dim // heads
    qkv = x.matmul(w_qkv).reshape(tokens, 3, heads, hd).permute(1, 2, 0, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    att = q.matmul(k.transpose(-2, -1)).mul(hd**-0.5).softmax(dim=-1)
    y = att.matmul(v).permute(1, 0, 2).reshape(tokens, dim).matmul(w_proj) + x
    return y + y.matmul(w1).relu().matmul(w2)


def block_workload(
    tokens: int = 65, dim: int = 256, heads: int = 4, hidden: int = 512,
    repeats: int = 3, seed: int = 0,
) -> dict:
    """Encrypt inputs and weights, run :func:`vit_block` ``repeats`` times, reveal.

    Returns the revealed output, the median seconds of one block, and the rounds and
    bytes of ONE block as this party counted them (CrypTen's accounting).
    """
    g = torch.Generator().manual_seed(seed)
    x_plain = torch.randn(tokens, dim, generator=g) * 0.5
    weights = [
        torch.randn(dim, 3 * dim, generator=g) / dim**0.5,
        torch.randn(dim, dim, generator=g) / dim**0.5,
        torch.randn(dim, hidden, generator=g) / dim**0.5,
        torch.randn(hidden, dim, generator=g) / hidden**0.5,
    ]
    comm = crypten.communicator.get()
    x = crypten.cryptensor(x_plain, src=1)
    enc = [crypten.cryptensor(w, src=0) for w in weights]
    vit_block(x, *enc, heads=heads)  # warm-up (allocations, lazy imports, dealer channel)
    comm.barrier()
    times, stats = [], None
    for _ in range(repeats):
        comm.reset_communication_stats()
        tic = time.perf_counter()
        y = vit_block(x, *enc, heads=heads)
        comm.barrier()
        times.append(time.perf_counter() - tic)
        stats = comm.get_communication_stats()
    return {
        "out": y.get_plain_text(),
        "seconds": statistics.median(times),
        "times": times,
        # minus the closing barrier (1 round, 0 bytes)
        "rounds": stats["rounds"] - 1,
        "bytes": stats["bytes"],
    }
