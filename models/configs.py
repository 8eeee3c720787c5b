"""Named ViT shapes.

A config is pure shape information (no weights, no attention kinds): both parties build
the same module tree from it, so it must be cheap to serialise and compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

BLOCK_STYLES = ("prenorm", "cct")


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT-Lite: conv patch tokenizer, class token, blocks, LN, linear head.

    ``block`` is ``"prenorm"`` (x += attn(ln1 x); x += mlp(ln2 x)) or ``"cct"``, the
    MPCViT reference block (x += attn(pre_norm x); x = norm1 x; x += mlp x).
    """

    image_size: int
    in_chans: int
    patch: int
    dim: int
    depth: int
    heads: int
    num_classes: int
    mlp_ratio: float = 2.0
    block: str = "prenorm"
    ln_eps: float = 1e-5
    # Denominator guard of ReLU-softmax/2Quad.  The reference uses 1e-5, below one
    # fixed-point ulp; 2**-8 is safe under MPC (see models.ops.ATTN_EPS).
    attn_eps: float = 2.0**-8
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("image_size", "in_chans", "patch", "dim", "depth", "heads", "num_classes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ViTConfig.{f} must be a positive int, got {v!r}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} not divisible by patch {self.patch}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} not divisible by heads {self.heads}")
        if self.block not in BLOCK_STYLES:
            raise ValueError(f"block must be one of {BLOCK_STYLES}, got {self.block!r}")
        if not self.attn_eps > 0 or not self.ln_eps > 0:
            raise ValueError("attn_eps and ln_eps must be positive")
        if self.mlp_ratio <= 0 or int(self.dim * self.mlp_ratio) <= 0:
            raise ValueError(f"bad mlp_ratio {self.mlp_ratio!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def num_tokens(self) -> int:
        """Patches plus the class token."""
        return self.num_patches + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ViTConfig fields: {sorted(unknown)}")
        return cls(**d)

    def for_dataset(self, image_shape: tuple[int, int, int], num_classes: int,
                    dataset: str = "") -> ViTConfig:
        """This config for a dataset of ``image_shape`` (C, H, W) images: ValueError if the
        images do not fit, and the head resized to the dataset's ``num_classes``."""
        c, h, w = image_shape
        if (c, h, w) != (self.in_chans, self.image_size, self.image_size):
            raise ValueError(
                f"config {self.name or '?'} expects {self.in_chans}x{self.image_size}x"
                f"{self.image_size} images, dataset {dataset or '?'} has {c}x{h}x{w}")
        return self if num_classes == self.num_classes else self.replace(num_classes=num_classes)

    def replace(self, **changes: Any) -> ViTConfig:
        return ViTConfig.from_dict({**self.to_dict(), **changes})


CONFIGS: dict[str, ViTConfig] = {
    # MPCViT CIFAR model: 7 layers, dim 256, 4 heads, 8x8 patches + cls = 65 tokens.
    "vit_7_4_32": ViTConfig(
        image_size=32, in_chans=3, patch=4, dim=256, depth=7, heads=4, num_classes=10,
        name="vit_7_4_32",
    ),
    # MPCViT Tiny-ImageNet model: 9 layers, dim 192, 12 heads (head dim 16), 257 tokens.
    "vit_9_12_64": ViTConfig(
        image_size=64, in_chans=3, patch=4, dim=192, depth=9, heads=12, num_classes=200,
        name="vit_9_12_64",
    ),
    # Fashion-MNIST demo: 28x28 grey, 7x7 patches + cls = 50 tokens; small enough to train
    # on 2 CPU cores in minutes and to run securely in seconds.
    "demo": ViTConfig(
        image_size=28, in_chans=1, patch=4, dim=64, depth=4, heads=4, num_classes=10,
        name="demo",
    ),
}


def get_config(name: str) -> ViTConfig:
    """Look up a named config; the error lists the known names."""
    try:
        return CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown config {name!r}; known: {sorted(CONFIGS)}") from None
