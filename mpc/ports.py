"""Free local TCP ports for processes started on one machine (demo, tests, emulated links)."""

from __future__ import annotations

import socket
import threading

_handed_out: set[int] = set()
_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and that this process has not handed out before.

    The kernel may give the same ephemeral port to two ``bind(0)`` calls once the first
    socket is closed, so ports picked one after another for servers that start later could
    collide (a party would then dial another party where it expects the dealer).  Never
    repeating a port within the process rules that out.
    """
    with _lock:
        for _ in range(1000):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no fresh free port after 1000 tries")
