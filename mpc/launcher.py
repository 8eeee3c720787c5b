"""Run a function as N real party processes talking over gRPC (plus a dealer).

The gRPC counterpart of CrypTen's ``run_multiprocess``: used by tests, the profiler and
benchmarks.  Children come from a fork server that has already imported torch and
CrypTen (fast start, and no gRPC state inherited from the caller).  ``backend="gloo"``
runs the same function over CrypTen's stock torch.distributed communicator, so the two
transports can be compared on one program.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

from .config import ProviderSpec, Timeouts, TlsConfig

log = logging.getLogger("mpcvit.launcher")

_PRELOAD = ["mpcvit.mpc.runtime"]


class PartyFailure(RuntimeError):
    """One or more parties failed; ``errors`` maps rank (or 'dealer') to what happened."""

    def __init__(self, errors: dict[Any, str]) -> None:
        self.errors = errors
        lines = [f"--- party {rank} ---\n{msg}" for rank, msg in errors.items()]
        super().__init__("secure run failed:\n" + "\n".join(lines))


@dataclass(frozen=True)
class _PartySettings:
    rank: int
    world_size: int
    backend: str
    provider: str
    session: str
    timeouts: Timeouts
    tls: TlsConfig | None
    dealer_tls: TlsConfig | None
    chunk_bytes: int
    rendezvous: str


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _dealer_main(conn, tls: TlsConfig | None) -> None:
    from .dealer import serve_dealer

    try:
        server, port = serve_dealer("127.0.0.1:0", tls)
        conn.send(("port", port))
        conn.recv()  # any message (or EOF) means stop
    except EOFError:
        pass
    except Exception:  # pragma: no cover - reported to the parent
        conn.send(("error", traceback.format_exc()))
        return
    server.stop(grace=1.0)


def _party_main(settings: _PartySettings, fn, args, kwargs, conn) -> None:
    try:
        result = _run_party(settings, fn, args, kwargs, conn)
        # Plain pickle: torch's multiprocessing pickler would pass tensors by shared
        # memory handles that die with this process.
        conn.send(("ok", pickle.dumps(result)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _run_party(s: _PartySettings, fn, args, kwargs, conn):
    import grpc

    from . import runtime
    from .transport import PeerTransport

    kind, dealer_port = conn.recv()  # ("dealer", port or None)
    provider = ProviderSpec(
        kind=s.provider,
        address=f"127.0.0.1:{dealer_port}" if dealer_port else None,
        tls=s.dealer_tls,
        timeout=s.timeouts.dealer,
    )
    if s.backend == "gloo":
        os.environ.update(
            WORLD_SIZE=str(s.world_size), RANK=str(s.rank), DISTRIBUTED_BACKEND="gloo",
            RENDEZVOUS=f"file://{s.rendezvous}",
        )
        crypten = runtime.crypten
        runtime.select_provider(provider)
        crypten.cfg.communicator.verbose = True
        crypten.init()
        try:
            if s.provider == "dealer":
                runtime.dealer_provider().begin(s.session, s.rank, s.world_size, provider)
            try:
                return fn(*args, **kwargs)
            finally:
                if s.provider == "dealer":
                    runtime.dealer_provider().end()
        finally:
            crypten.uninit()

    transport = PeerTransport(
        s.rank, s.world_size, tls=s.tls, timeouts=s.timeouts, chunk_bytes=s.chunk_bytes
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=s.world_size + 4),
        options=transport.server_options(),
    )
    transport.add_to_server(server)
    if s.tls is not None:
        port = server.add_secure_port("127.0.0.1:0", s.tls.server_credentials())
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        conn.send(("port", port))
        _, peers = conn.recv()
        transport.connect({int(r): a for r, a in peers.items()})
        with runtime.crypten_session(transport, s.session, provider):
            return fn(*args, **kwargs)
    finally:
        transport.close()
        server.stop(grace=0.5)


def run_parties(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    provider: str = "tfp",
    backend: str = "grpc",
    timeout: float = 600.0,
    recv_timeout: float = 60.0,
    connect_timeout: float = 60.0,
    tls: Sequence[TlsConfig] | None = None,
    dealer_tls: TlsConfig | None = None,
    chunk_bytes: int = 1 << 20,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in every party; return the per-rank results.

    ``fn`` must be picklable (module-level).  Raises :class:`PartyFailure` with each
    party's traceback (or exit code) if any party fails, and after ``timeout`` seconds.
    """
    if backend not in ("grpc", "gloo"):
        raise ValueError("backend must be 'grpc' or 'gloo'")
    if provider not in ("tfp", "dealer"):
        raise ValueError("provider must be 'tfp' or 'dealer'")
    if tls is not None and len(tls) != world_size:
        raise ValueError("tls needs one TlsConfig per party")
    ctx = _context()
    deadline = time.monotonic() + timeout
    session = f"launch-{uuid.uuid4().hex}"
    timeouts = Timeouts(connect=connect_timeout, recv=recv_timeout, dealer=recv_timeout)
    rendezvous = os.path.join(tempfile.gettempdir(), f"mpcvit-rdv-{uuid.uuid4().hex}")
    procs: dict[Any, mp.Process] = {}
    conns: dict[Any, Any] = {}
    errors: dict[Any, str] = {}

    def wait_msg(key, what: str):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not conns[key].poll(remaining):
            raise TimeoutError(f"party {key} gave no {what} within the {timeout:.0f} s limit")
        try:
            return conns[key].recv()
        except EOFError:
            procs[key].join(1.0)
            raise ChildProcessError(
                f"party {key} exited (code {procs[key].exitcode}) before sending its {what}"
            ) from None

    try:
        dealer_port = None
        if provider == "dealer":
            parent, child = ctx.Pipe()
            procs["dealer"] = ctx.Process(target=_dealer_main, args=(child, dealer_tls),
                                          name="mpcvit-dealer", daemon=True)
            conns["dealer"] = parent
            procs["dealer"].start()
            child.close()  # so the parent sees EOF when the child dies
            kind, value = wait_msg("dealer", "port")
            if kind != "port":
                raise PartyFailure({"dealer": value})
            dealer_port = value
        for rank in range(world_size):
            settings = _PartySettings(
                rank, world_size, backend, provider, session, timeouts,
                tls[rank] if tls else None, dealer_tls, chunk_bytes, rendezvous,
            )
            parent, child = ctx.Pipe()
            procs[rank] = ctx.Process(target=_party_main, args=(settings, fn, args, kwargs, child),
                                      name=f"mpcvit-party{rank}", daemon=True)
            conns[rank] = parent
            procs[rank].start()
            child.close()
            parent.send(("dealer", dealer_port))
        if backend == "grpc":
            peers = {}
            for rank in range(world_size):
                kind, value = wait_msg(rank, "port")
                if kind != "port":
                    raise PartyFailure({rank: value})
                peers[rank] = f"127.0.0.1:{value}"
            for rank in range(world_size):
                conns[rank].send(("peers", peers))
        results: dict[int, Any] = {}
        pending = set(range(world_size))
        while pending:
            ready = mp.connection.wait([conns[r] for r in pending],
                                       timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                for r in pending:
                    errors[r] = f"no result within the {timeout:.0f} s limit"
                break
            for r in [r for r in pending if conns[r] in ready]:
                pending.discard(r)
                try:
                    kind, value = conns[r].recv()
                except EOFError:
                    procs[r].join(1.0)
                    errors[r] = f"process exited with code {procs[r].exitcode}"
                    continue
                if kind == "ok":
                    results[r] = pickle.loads(value)
                else:
                    errors[r] = value
        if errors:
            raise PartyFailure(errors)
        return [results[r] for r in range(world_size)]
    except (TimeoutError, ChildProcessError) as exc:
        errors.setdefault("launcher", str(exc))
        raise PartyFailure(errors) from None
    finally:
        for key, conn in conns.items():
            if key == "dealer":
                try:
                    conn.send("stop")
                except (BrokenPipeError, OSError):
                    pass
        for proc in procs.values():
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        for conn in conns.values():
            conn.close()
        try:
            os.unlink(rendezvous)
        except OSError:
            pass
