"""Structured logs for the servers: one JSON object (or key=value line) per record.

Log records carry ids, shapes, sizes, timings and statuses only.  Nothing in the party
code passes share values, plaintext inputs, outputs or weights to a logger.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonLineFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "msg": ...}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(fmt: str = "json", level: str = "INFO", role: str = "") -> None:
    """Send logs to stderr in the chosen format (idempotent)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        prefix = f"{role} " if role else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s {prefix}%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
