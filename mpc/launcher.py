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

from .config import LaunchConfig, ProviderSpec, Timeouts, TlsConfig
from .netem import EmulatedNetwork

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
    netns: str | None = None
    listen: str = "127.0.0.1:0"
    threads: int = 1


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _dealer_main(conn, tls: TlsConfig | None, netns: str | None, listen: str) -> None:
    try:
        if netns:
            from .netem import enter_netns

            enter_netns(netns)
        from .dealer import serve_dealer

        server, port = serve_dealer(listen, tls)
        conn.send(("port", port))
        conn.recv()  # any message (or EOF) means stop
    except EOFError:
        pass
    except Exception:  # pragma: no cover - reported to the parent
        conn.send(("error", traceback.format_exc()))
        return
    server.stop(grace=1.0)


def _party_main(settings: _PartySettings, fn, args, kwargs, conn) -> None:
    import torch

    # One intra-op thread per party: with two parties (+ dealer) on a small machine,
    # more threads only fight over the cores and make timings erratic.
    torch.set_num_threads(settings.threads)
    try:
        if settings.netns:  # before any thread starts: threads inherit the namespace
            from .netem import enter_netns

            enter_netns(settings.netns)
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

    kind, dealer_address = conn.recv()  # ("dealer", address or None)
    provider = ProviderSpec(
        kind=s.provider,
        address=dealer_address,
        # a party shows the dealer its own certificate (the dealer demands one)
        tls=s.tls if s.dealer_tls is not None else None,
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
        port = server.add_secure_port(s.listen, s.tls.server_credentials())
    else:
        port = server.add_insecure_port(s.listen)
    if port == 0:
        raise OSError(f"party {s.rank} cannot listen on {s.listen}")
    transport.listen_port = port
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
    dealer_timeout: float | None = None,
    tls: Sequence[TlsConfig] | None = None,
    dealer_tls: TlsConfig | None = None,
    chunk_bytes: int = 1 << 20,
    network: EmulatedNetwork | None = None,
    host: str = "127.0.0.1",
    ports: Sequence[int] = (),
    dealer_port: int = 0,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` in every party; return the per-rank results.

    ``fn`` must be picklable (module-level).  With ``network`` (an entered
    :class:`~mpcvit.mpc.netem.EmulatedNetwork`) the parties and the dealer run inside its
    namespaces and talk across its shaped, delayed link.  Raises :class:`PartyFailure` with each
    party's traceback (or exit code) if any party fails, and after ``timeout`` seconds.
    """
    if ports and len(ports) != world_size:
        raise ValueError("ports needs one port per party")
    if network is not None and (backend != "grpc" or world_size != 2):
        raise ValueError("an emulated network runs 2 parties over gRPC")
    if backend not in ("grpc", "gloo"):
        raise ValueError("backend must be 'grpc' or 'gloo'")
    if provider not in ("tfp", "dealer"):
        raise ValueError("provider must be 'tfp' or 'dealer'")
    if tls is not None and len(tls) != world_size:
        raise ValueError("tls needs one TlsConfig per party")
    if dealer_tls is not None and tls is None:
        raise ValueError("a TLS dealer needs the parties' TLS identities too")
    ctx = _context()
    deadline = time.monotonic() + timeout
    session = f"launch-{uuid.uuid4().hex}"
    timeouts = Timeouts(connect=connect_timeout, recv=recv_timeout,
                        dealer=dealer_timeout or recv_timeout)
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
        bound_dealer_port = None
        if provider == "dealer":
            parent, child = ctx.Pipe()
            dview = network.dealer() if network else None
            procs["dealer"] = ctx.Process(target=_dealer_main,
                                          args=(child, dealer_tls,
                                                dview.netns if dview else None,
                                                dview.listen if dview
                                                else f"{host}:{dealer_port}"),
                                          name="mpcvit-dealer", daemon=True)
            conns["dealer"] = parent
            procs["dealer"].start()
            child.close()  # so the parent sees EOF when the child dies
            kind, value = wait_msg("dealer", "port")
            if kind != "port":
                raise PartyFailure({"dealer": value})
            bound_dealer_port = value
        views = {r: network.party(r) for r in range(world_size)} if network else {}
        for rank in range(world_size):
            view = views.get(rank)
            settings = _PartySettings(
                rank, world_size, backend, provider, session, timeouts,
                tls[rank] if tls else None, dealer_tls, chunk_bytes, rendezvous,
                netns=view.netns if view else None,
                listen=view.listen if view else f"{host}:{ports[rank] if ports else 0}",
            )
            parent, child = ctx.Pipe()
            procs[rank] = ctx.Process(target=_party_main, args=(settings, fn, args, kwargs, child),
                                      name=f"mpcvit-party{rank}", daemon=True)
            conns[rank] = parent
            procs[rank].start()
            child.close()
            if bound_dealer_port is None:
                dealer_address = None
            elif view is not None:
                dealer_address = view.dealer
            else:
                dealer_address = f"{host}:{bound_dealer_port}"
            parent.send(("dealer", dealer_address))
        if backend == "grpc":
            peers = {}
            for rank in range(world_size):
                kind, value = wait_msg(rank, "port")
                if kind != "port":
                    raise PartyFailure({rank: value})
                peers[rank] = f"{host}:{value}"
            for rank in range(world_size):
                conns[rank].send(("peers", views[rank].peers if network else peers))
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


def run_parties_from_config(
    fn: Callable[..., Any], *args: Any, config: str | os.PathLike | LaunchConfig,
    timeout: float = 600.0, backend: str = "grpc", **kwargs: Any,
) -> list[Any]:
    """:func:`run_parties` with addresses, ports, timeouts and TLS from a YAML file."""
    cfg = config if isinstance(config, LaunchConfig) else LaunchConfig.from_yaml(config)
    return run_parties(
        fn, *args, world_size=cfg.world_size, provider=cfg.provider, backend=backend,
        timeout=timeout, recv_timeout=cfg.timeouts.recv, connect_timeout=cfg.timeouts.connect,
        dealer_timeout=cfg.timeouts.dealer,
        tls=cfg.tls, dealer_tls=cfg.dealer_tls, chunk_bytes=cfg.chunk_bytes, host=cfg.host,
        ports=cfg.ports, dealer_port=cfg.dealer_port, **kwargs,
    )
