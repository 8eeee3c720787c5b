"""The baseline: the same ViT shape on stock CrypTen functions, over gloo.

Stock CrypTen has no GeLU or LayerNorm module and its ONNX import breaks on this torch,
so this is the straightforward port a user would write: CrypTen's ``softmax``, GeLU from
CrypTen's ``erf``, LayerNorm from CrypTen's ``inv_sqrt``.  Only its cost is used: erf's
series diverges outside |x| < ~1.5, so its logits are not meaningful (see docs/gelu.md).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..mpc.compat import import_crypten

crypten = import_crypten()

Tensor = Any  # crypten MPCTensor


def _layer_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    mean = x.mean(dim=-1, keepdim=True)
    centred = x - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    return centred * (var + eps).inv_sqrt()


def _gelu(x: Tensor) -> Tensor:
    return x * 0.5 * (1 + (x * (1 / math.sqrt(2))).erf())


def stock_vit_party(config_dict: dict, seed: int = 0) -> dict:
    """Party program: one warm-up and one timed batch-1 forward; party's rounds/bytes."""
    from mpcvit.models.configs import ViTConfig

    cfg = ViTConfig.from_dict(config_dict)
    g = torch.Generator().manual_seed(seed)
    d, hidden, heads = cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.heads
    n = (cfg.image_size // cfg.patch) ** 2 + 1

    def w(*shape: int) -> Tensor:  # party 0's weights (random, scaled like a trained ViT's)
        return crypten.cryptensor(torch.randn(*shape, generator=g) / math.sqrt(shape[-1]), src=0)

    patch = w(d, cfg.in_chans, cfg.patch, cfg.patch)
    cls_pos = w(n, d)
    layers = [(w(d, 3 * d), w(d, d), w(d, hidden), w(hidden, d)) for _ in range(cfg.depth)]
    head = w(d, cfg.num_classes)
    image = torch.randn(1, cfg.in_chans, cfg.image_size, cfg.image_size, generator=g)
    x_in = crypten.cryptensor(image, src=1)

    def forward() -> Tensor:
        x = x_in.conv2d(patch, stride=cfg.patch).flatten(2).transpose(1, 2)[0]  # (N-1, d)
        x = crypten.cat([cls_pos[:1], x + cls_pos[1:]], dim=0)
        hd = d // heads
        for qkv_w, proj_w, w1, w2 in layers:
            qkv = _layer_norm(x).matmul(qkv_w).reshape(n, 3, heads, hd).permute(1, 2, 0, 3)
            att = qkv[0].matmul(qkv[1].transpose(-2, -1)).mul(hd**-0.5).softmax(dim=-1)
            x = x + att.matmul(qkv[2]).permute(1, 0, 2).reshape(n, d).matmul(proj_w)
            x = x + _gelu(_layer_norm(x).matmul(w1)).matmul(w2)
        return _layer_norm(x[:1]).matmul(head)

    comm = crypten.communicator.get()
    forward()  # warm-up
    comm.barrier()
    comm.reset_communication_stats()
    tic = time.perf_counter()
    forward()
    seconds = time.perf_counter() - tic
    stats = comm.get_communication_stats()
    return {"online_s": seconds, "rounds": stats["rounds"], "bytes": stats["bytes"]}
