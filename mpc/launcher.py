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
from typing import TYPE_CHECKING, Any

from .config import LaunchConfig, ProviderSpec, Timeouts, TlsConfig
from .netem import EmulatedNetwork

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import ForkServerContext

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


def _context() -> ForkServerContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _dealer_main(tls: TlsConfig | None, netns: str | None, listen: str, conn: Any) -> None:
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


def _party_main(settings: _PartySettings, fn: Callable[..., Any], args: Sequence[Any],
                kwargs: dict[str, Any], conn: Connection) -> None:
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


def _run_party(s: _PartySettings, fn: Callable[..., Any], args: Sequence[Any],
               kwargs: dict[str, Any], conn: Connection) -> Any:
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
        connect_timeout=s.timeouts.dealer_connect,
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
        crypten.communicator.get().reset_communication_stats()  # count the program alone
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


@dataclass
class _Options:
    """What :func:`run_parties` was asked for, checked."""

    world_size: int
    provider: str
    backend: str
    timeout: float
    timeouts: Timeouts
    tls: Sequence[TlsConfig] | None
    dealer_tls: TlsConfig | None
    chunk_bytes: int
    network: EmulatedNetwork | None
    host: str
    ports: Sequence[int]
    dealer_port: int

    def check(self) -> None:
        if self.ports and len(self.ports) != self.world_size:
            raise ValueError("ports needs one port per party")
        if self.network is not None and (self.backend != "grpc" or self.world_size != 2):
            raise ValueError("an emulated network runs 2 parties over gRPC")
        if self.backend not in ("grpc", "gloo"):
            raise ValueError("backend must be 'grpc' or 'gloo'")
        if self.provider not in ("tfp", "dealer"):
            raise ValueError("provider must be 'tfp' or 'dealer'")
        if self.tls is not None and len(self.tls) != self.world_size:
            raise ValueError("tls needs one TlsConfig per party")
        if self.dealer_tls is not None and self.tls is None:
            raise ValueError("a TLS dealer needs the parties' TLS identities too")


class _Launch:
    """The processes of one :func:`run_parties` call: set up, run, tear down."""

    def __init__(self, opts: _Options) -> None:
        self.opts = opts
        self.ctx = _context()
        self.deadline = time.monotonic() + opts.timeout
        self.session = f"launch-{uuid.uuid4().hex}"
        self.rendezvous = os.path.join(tempfile.gettempdir(), f"mpcvit-rdv-{uuid.uuid4().hex}")
        self.procs: dict[Any, mp.Process] = {}
        self.conns: dict[Any, Any] = {}
        self.errors: dict[Any, str] = {}
        self.dealer_port: int | None = None
        net = opts.network
        self.views = {r: net.party(r) for r in range(opts.world_size)} if net else {}

    def wait_msg(self, key: Any, what: str) -> Any:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0 or not self.conns[key].poll(remaining):
            raise TimeoutError(
                f"party {key} gave no {what} within the {self.opts.timeout:.0f} s limit")
        try:
            return self.conns[key].recv()
        except EOFError:
            self.procs[key].join(1.0)
            raise ChildProcessError(f"party {key} exited (code {self.procs[key].exitcode}) "
                                    f"before sending its {what}") from None

    def _spawn(self, key: Any, target: Callable[..., None], args: tuple, name: str) -> Any:
        parent, child = self.ctx.Pipe()
        self.procs[key] = self.ctx.Process(target=target, args=(*args, child), name=name,
                                           daemon=True)
        self.conns[key] = parent
        self.procs[key].start()
        child.close()  # so the parent sees EOF when the child dies
        return parent

    def start_dealer(self) -> None:
        opts = self.opts
        if opts.provider != "dealer":
            return
        view = opts.network.dealer() if opts.network else None
        listen = view.listen if view else f"{opts.host}:{opts.dealer_port}"
        self._spawn("dealer", _dealer_main,
                    (opts.dealer_tls, view.netns if view else None, listen), "mpcvit-dealer")
        kind, value = self.wait_msg("dealer", "port")
        if kind != "port":
            raise PartyFailure({"dealer": value})
        self.dealer_port = value

    def _dealer_address(self, rank: int) -> str | None:
        if self.dealer_port is None:
            return None
        view = self.views.get(rank)
        return view.dealer if view is not None else f"{self.opts.host}:{self.dealer_port}"

    def start_parties(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        opts = self.opts
        for rank in range(opts.world_size):
            view = self.views.get(rank)
            settings = _PartySettings(
                rank, opts.world_size, opts.backend, opts.provider, self.session,
                opts.timeouts, opts.tls[rank] if opts.tls else None, opts.dealer_tls,
                opts.chunk_bytes, self.rendezvous, netns=view.netns if view else None,
                listen=view.listen if view
                else f"{opts.host}:{opts.ports[rank] if opts.ports else 0}",
            )
            conn = self._spawn(rank, _party_main, (settings, fn, args, kwargs),
                               f"mpcvit-party{rank}")
            conn.send(("dealer", self._dealer_address(rank)))

    def connect_peers(self) -> None:
        if self.opts.backend != "grpc":
            return
        peers = {}
        for rank in range(self.opts.world_size):
            kind, value = self.wait_msg(rank, "port")
            if kind != "port":
                raise PartyFailure({rank: value})
            peers[rank] = f"{self.opts.host}:{value}"
        for rank in range(self.opts.world_size):
            self.conns[rank].send(("peers", self.views[rank].peers if self.views else peers))

    def _receive(self, rank: int, results: dict[int, Any]) -> None:
        try:
            kind, value = self.conns[rank].recv()
        except EOFError:
            self.procs[rank].join(1.0)
            self.errors[rank] = f"process exited with code {self.procs[rank].exitcode}"
            return
        if kind == "ok":
            results[rank] = pickle.loads(value)
        else:
            self.errors[rank] = value

    def collect(self) -> list[Any]:
        results: dict[int, Any] = {}
        pending = set(range(self.opts.world_size))
        while pending:
            ready = mp.connection.wait([self.conns[r] for r in pending],
                                       timeout=max(0.0, self.deadline - time.monotonic()))
            if not ready:
                for r in pending:
                    self.errors[r] = f"no result within the {self.opts.timeout:.0f} s limit"
                break
            for r in [r for r in pending if self.conns[r] in ready]:
                pending.discard(r)
                self._receive(r, results)
        if self.errors:
            raise PartyFailure(self.errors)
        return [results[r] for r in range(self.opts.world_size)]

    def teardown(self) -> None:
        if "dealer" in self.conns:
            try:
                self.conns["dealer"].send("stop")
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs.values():
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        for conn in self.conns.values():
            conn.close()
        try:
            os.unlink(self.rendezvous)
        except OSError:
            pass


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
    opts = _Options(world_size, provider, backend, timeout,
                    Timeouts(connect=connect_timeout, recv=recv_timeout,
                             dealer=dealer_timeout or recv_timeout),
                    tls, dealer_tls, chunk_bytes, network, host, ports, dealer_port)
    opts.check()
    launch = _Launch(opts)
    try:
        launch.start_dealer()
        launch.start_parties(fn, args, kwargs)
        launch.connect_peers()
        return launch.collect()
    except (TimeoutError, ChildProcessError) as exc:
        launch.errors.setdefault("launcher", str(exc))
        raise PartyFailure(launch.errors) from None
    finally:
        launch.teardown()


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
