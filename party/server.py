"""A party server process: one gRPC port for clients (InferenceService, health,
reflection) and for the peer party (PeerService), plus the session coordinator thread.

Party 0 loads the plaintext model from a checkpoint; party 1 starts empty and receives
the public architecture and weight shares from party 0 over the peer link.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mpcvit.mpc.errors import PeerError, PeerTimeout
from mpcvit.mpc.roles import Allowed, RoleChecker, warn_unchecked
from mpcvit.mpc.transport import PeerTransport
from mpcvit.proto.generated import inference_pb2, inference_pb2_grpc, peer_pb2

from .backend import CrypTenBackend, ModelFacts, describe_model
from .config import PartyConfig, listen_host
from .coordinator import ChannelDown, ChannelTimeout, Follower, Leader
from .pairing import PairingTable
from .probes import mark_alive, serve_probe_port
from .service import InferenceServicer, PartyService

log = logging.getLogger("mpcvit.party")

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEALTH_POLL = 0.5  # seconds between checks of the peer link for the health status


class TransportChannel:
    """The coordinator's control channel over the PeerTransport (maps its errors)."""

    def __init__(self, transport: PeerTransport, peer: int) -> None:
        self.transport = transport
        self.peer = peer

    def link(self) -> tuple[int, bool]:
        return self.transport.link_state(self.peer)

    def wait_link(self, timeout: float) -> bool:
        return self.transport.wait_for_peer(self.peer, timeout)

    def ensure(self, timeout: float) -> None:
        try:
            self.transport.ensure_connected(timeout)
        except PeerError as exc:
            raise ChannelDown(str(exc)) from None

    def send(self, msg: peer_pb2.Control) -> None:
        try:
            self.transport.send_control(self.peer, msg)
        except PeerError as exc:
            raise ChannelDown(str(exc)) from None

    def recv(self, timeout: float, generation: int) -> peer_pb2.Control:
        try:
            return self.transport.recv_control(self.peer, timeout, generation)
        except PeerTimeout as exc:
            raise ChannelTimeout(str(exc)) from None
        except PeerError as exc:  # disconnected, or a malformed message (logged, skipped)
            raise ChannelDown(str(exc)) from None


def load_party_model(config: PartyConfig) -> tuple[Any, ModelFacts]:
    """Party 0: the plaintext model and its public facts.

    ``random:<config>[:seed]`` builds an untrained model of a named shape (tests and
    benchmarks only: its predictions are meaningless); anything else is a checkpoint.
    The model runs the checkpoint's protocol plan unless the config's ``protocol`` names
    another; party 1 receives it with the public facts.
    """
    if config.model.startswith("random:"):
        import torch
        from mpcvit.models.vit import build_model

        _, name, *seed = config.model.split(":")
        torch.manual_seed(int(seed[0]) if seed else 0)
        model = build_model(name)
        extra: dict[str, Any] = {}
    else:
        from mpcvit.models.checkpoint import load_checkpoint, resolve_checkpoint

        model, extra = load_checkpoint(resolve_checkpoint(config.model))
    if config.protocol:
        from mpcvit.models.plan import ModelPlan

        model.set_protocol(ModelPlan.parse(config.protocol))
    model.eval()
    return model, describe_model(model, config.served_name, config.dataset, extra)


class PartyServer:
    """Assembles and runs one party (see module docstring)."""

    def __init__(self, config: PartyConfig, *, model: Any = None,
                 facts: ModelFacts | None = None) -> None:
        self.config = config
        if config.rank == 0 and model is None:
            model, facts = load_party_model(config)
        self.transport = PeerTransport(config.rank, 2, tls=config.tls, timeouts=config.timeouts,
                                       chunk_bytes=config.chunk_bytes)
        self.backend = CrypTenBackend(self.transport, config.provider, rank=config.rank,
                                      model=model, facts=facts,
                                      bulk_prepare_max_batch=config.limits.bulk_prepare_max_batch)
        st = config.service_timeouts
        peer = 1 - config.rank
        self.queue = PairingTable(peer=peer, pairing_timeout=st.pairing,
                                  request_timeout=st.request,
                                  max_pending=config.limits.max_pending)
        channel = TransportChannel(self.transport, peer)
        self.health = health.HealthServicer()
        common = dict(peer=peer, connect_timeout=st.peer_connect,
                      reply_timeout=max(st.pairing, config.timeouts.dealer),
                      on_ready_change=self._refresh_health)
        if config.rank == 0:
            self.coordinator: Leader | Follower = Leader(
                self.queue, channel, self.backend, max_batch=config.limits.max_batch,
                max_wait=config.limits.max_wait,
                offline_sessions=config.limits.offline_sessions, **common)
        else:
            self.coordinator = Follower(self.queue, channel, self.backend, **common)
        self.service = PartyService(
            config.rank, self.coordinator, config.limits, facts=lambda: self.backend.facts,
            ready=lambda: self.coordinator.ready,
            reason=lambda: self.coordinator.status()[1],
            precision_bits=self.backend.precision_bits, request_timeout=st.request)
        self.metrics = None
        if config.metrics.enabled:
            from .metrics import party_metrics

            self.metrics = party_metrics(config.rank, queue=self.queue,
                                         serving=lambda: bool(self._serving),
                                         dealer=config.provider.kind == "dealer")
        self.server: grpc.Server | None = None
        self.probe_server: grpc.Server | None = None
        self.port: int | None = None
        self._stopped = threading.Event()
        self._serving: bool | None = None
        self._health_lock = threading.Lock()

    def _refresh_health(self, _ready: bool | None = None) -> None:
        """SERVING iff the weights are shared and the peer link is up: a party whose peer
        is missing cannot serve a request, so it must not look ready."""
        with self._health_lock:
            serving = (self.coordinator.ready
                       and self.transport.peer_connected(1 - self.config.rank))
            if serving == self._serving:
                return
            self._serving = serving
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                self.health.set(name, status)
        log.info("event=health status=%s", health_pb2.HealthCheckResponse.ServingStatus.Name(
            status))

    def _watch_health(self) -> None:
        while not self._stopped.wait(HEALTH_POLL):
            self._refresh_health()

    def start(self) -> int:
        """Bind the port, start serving and the coordinator; return the bound port."""
        cfg = self.config
        if cfg.tls is None:
            warn_unchecked(log, f"party{cfg.rank}")
        limit = cfg.limits.max_request_bytes + (64 << 10)
        options = self.transport.server_options()
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length",
                        max(limit, cfg.chunk_bytes + (1 << 20))))
        # Accept the peer link's keepalive pings (every 10 s) without a GOAWAY
        # "too_many_pings", which would drop the link between sessions.
        options += [("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                    ("grpc.http2.max_ping_strikes", 0)]
        # Client requests are bounded by max_request_bytes in PartyService; the peer's
        # frames by chunk_bytes.
        # Every admitted call gets a thread (waiting calls hold one), with room left for
        # the peer's stream and health checks; calls beyond the limit are refused with
        # RESOURCE_EXHAUSTED instead of queueing unboundedly.
        concurrent = cfg.limits.max_concurrent_rpcs
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=concurrent + 8),
                                  options=options, maximum_concurrent_rpcs=concurrent + 4,
                                  interceptors=[self.metrics.interceptor()] if self.metrics
                                  else None)
        self.transport.add_to_server(self.server)
        allowed = Allowed.clients(cfg.tls.allowed_clients if cfg.tls is not None else None)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.service, RoleChecker.from_tls(cfg.tls), allowed),
            self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self._refresh_health()
        mark_alive(self.health)
        if cfg.tls is not None:
            port = self.server.add_secure_port(cfg.listen, cfg.tls.server_credentials())
        else:
            port = self.server.add_insecure_port(cfg.listen)
        if port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        self.port = port
        self.server.start()
        if cfg.health_port:
            self.probe_server = serve_probe_port(self.health, listen_host(cfg.listen),
                                                 cfg.health_port)
        if self.metrics is not None:
            self.metrics.serve(listen_host(cfg.listen), cfg.metrics.port)
        try:
            self.transport.connect({1 - cfg.rank: cfg.peer},
                                   timeout=cfg.service_timeouts.peer_connect)
        except PeerError as exc:
            log.info("event=peer_not_yet_reachable peer=%s error=%s", cfg.peer, exc)
        self.coordinator.start()
        threading.Thread(target=self._watch_health, name="health", daemon=True).start()
        log.info("event=party_started rank=%d listen=%s port=%d peer=%s provider=%s tls=%s "
                 "model=%s max_batch=%d", cfg.rank, cfg.listen, port, cfg.peer,
                 cfg.provider.kind, cfg.tls is not None, cfg.served_name if cfg.rank == 0
                 else "(from party 0)", cfg.limits.max_batch)
        return port

    def stop(self, grace: float = 5.0) -> None:
        """Graceful shutdown: stop taking requests, fail queued ones, close links."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        log.info("event=party_stopping rank=%d", self.config.rank)
        self.health.enter_graceful_shutdown()
        self.coordinator.stop()
        self.queue.close("party is shutting down")
        self.coordinator.join(grace)
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        if self.probe_server is not None:
            self.probe_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
        self.transport.close()
        log.info("event=party_stopped rank=%d", self.config.rank)

    def wait(self) -> None:
        self._stopped.wait()

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down gracefully."""
        done = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("event=signal signal=%s", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not done.wait(1.0):
            pass
        self.stop()
