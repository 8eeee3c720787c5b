"""Helpers several ``mpcvit`` subcommands share."""

from __future__ import annotations

import ctypes
import os
from typing import Any

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for a long-running server; True if set.

    gRPC hands large messages to many threads, and glibc gives threads arenas of their
    own (up to 8 per core): the heap then fragments and a party's resident memory crept
    up by about 40 MB over its first few hundred requests.  With two arenas it stays
    within a few MB (docs/reliability.md).  ``MALLOC_ARENA_MAX`` in the environment, if
    set, wins; other C libraries are left alone."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):
        return False


def fit_config(config: Any, data: Any) -> Any:
    """``config`` (a ViTConfig) checked against the dataset's images, its head resized to
    the dataset's classes with a note on stdout."""
    fitted = config.for_dataset(data.image_shape, data.num_classes, data.name)
    if fitted.num_classes != config.num_classes:
        print(f"note: {data.num_classes} classes in {data.name}; head resized from "
              f"{config.num_classes}")
    return fitted
