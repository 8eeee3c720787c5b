"""Helpers several ``mpcvit`` subcommands share."""

from __future__ import annotations

from typing import Any


def fit_config(config: Any, data: Any) -> Any:
    """``config`` (a ViTConfig) checked against the dataset's images, its head resized to
    the dataset's classes with a note on stdout."""
    fitted = config.for_dataset(data.image_shape, data.num_classes, data.name)
    if fitted.num_classes != config.num_classes:
        print(f"note: {data.num_classes} classes in {data.name}; head resized from "
              f"{config.num_classes}")
    return fitted
