"""A TCP relay that really delays (and optionally rate-limits) bytes on the wire.

This machine's kernel has no ``netem``, so round-trip delay is added here: every chunk
read from one side is released to the other side ``delay`` seconds later, in both
directions, without stalling the bytes behind it (a pipe of bytes in flight, like a
long wire).  Rate limiting is normally done by the kernel (``tbf`` on a veth pair, see
``mpc/netem.py``); the relay's own token bucket is the fallback where namespaces cannot
be created.

Run as ``python -m mpcvit.mpc.relay --listen HOST:PORT --target HOST:PORT --delay-ms D``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import signal
import sys
import time
from collections.abc import Callable

READ_BYTES = 256 << 10


class TokenBucket:
    """Bytes per second with a burst of ``burst`` bytes (None rate: unlimited)."""

    def __init__(self, rate: float | None, burst: int = 64 << 10) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    async def take(self, n: int) -> None:
        if not self.rate:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= min(n, self.burst):
                self.tokens -= n
                return
            await asyncio.sleep((min(n, self.burst) - self.tokens) / self.rate)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                bucket: TokenBucket) -> None:
    """Copy reader → writer, releasing each chunk ``delay`` s after it was read."""
    in_flight: collections.deque[tuple[float, bytes]] = collections.deque()
    arrived = asyncio.Event()
    done = False

    async def read_side() -> None:
        nonlocal done
        try:
            while data := await reader.read(READ_BYTES):
                in_flight.append((time.monotonic() + delay, data))
                arrived.set()
        finally:
            done = True
            arrived.set()

    async def write_side() -> None:
        while True:
            if not in_flight:
                if done:
                    break
                arrived.clear()
                await arrived.wait()
                continue
            due, data = in_flight[0]
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            in_flight.popleft()
            await bucket.take(len(data))
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    reader_task = asyncio.create_task(read_side())
    try:
        await write_side()
    finally:
        reader_task.cancel()


async def _handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                  target: tuple[str, int], delay: float, rate: float | None) -> None:
    host, port = target
    try:
        up_reader, up_writer = await asyncio.open_connection(host, port)
    except OSError:
        client_writer.close()
        return
    half = delay / 2  # the round trip crosses the relay once each way
    tasks = [
        asyncio.create_task(_pump(client_reader, up_writer, half, TokenBucket(rate))),
        asyncio.create_task(_pump(up_reader, client_writer, half, TokenBucket(rate))),
    ]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for t in tasks:
        t.cancel()
    for w in (up_writer, client_writer):
        w.close()


async def serve(listen: tuple[str, int], target: tuple[str, int], rtt: float,
                rate: float | None = None,
                ready: Callable[[int], object] | None = None) -> None:
    server = await asyncio.start_server(
        lambda r, w: _handle(r, w, target, rtt, rate), listen[0], listen[1]
    )
    port = server.sockets[0].getsockname()[1]
    if ready is not None:
        ready(port)
    async with server:
        await server.serve_forever()


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, type=_addr)
    p.add_argument("--target", required=True, type=_addr)
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip delay to add")
    p.add_argument("--rate-mbit", type=float, default=0.0,
                   help="user-space rate limit per direction (0: none)")
    args = p.parse_args(argv)
    rate = args.rate_mbit * 1e6 / 8 if args.rate_mbit else None

    def ready(port: int) -> None:
        print(f"relay listening on {args.listen[0]}:{port}", flush=True)

    loop = asyncio.new_event_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    loop.create_task(serve(args.listen, args.target, args.rtt_ms / 1000, rate, ready))
    loop.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
