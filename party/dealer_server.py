"""The dealer process: the dealer's gRPC server (with health and reflection) plus its
side ports, the plaintext probe port and the Prometheus endpoint (see ``config.py``)."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health

from .config import DealerConfig, listen_host
from .probes import mark_alive, serve_probe_port

log = logging.getLogger("mpcvit.dealer")


class DealerServer:
    """Assembles and runs the dealer (``mpcvit dealer``)."""

    def __init__(self, config: DealerConfig, listen: str | None = None) -> None:
        from mpcvit.mpc.dealer import DealerState

        self.config = config
        self.listen = listen or config.listen
        limits = config.limits
        self.state = DealerState(max_sessions=limits.max_sessions,
                                 sessions_per_caller=limits.sessions_per_caller,
                                 idle_ttl=limits.idle_ttl)
        self.health = health.HealthServicer()
        self.metrics = None
        if config.metrics.enabled:
            from .metrics import dealer_metrics

            self.metrics = dealer_metrics(self.state)
        self.server: grpc.Server | None = None
        self.probe_server: grpc.Server | None = None

    def start(self) -> int:
        """Bind every port and start serving; return the dealer's port."""
        from mpcvit.mpc.dealer import serve_dealer
        from mpcvit.mpc.roles import warn_unchecked

        if self.config.tls is None:
            warn_unchecked(log, "dealer")
        interceptors = (self.metrics.interceptor(),) if self.metrics is not None else ()
        self.server, port = serve_dealer(self.listen, self.config.tls, state=self.state,
                                         health_servicer=self.health,
                                         interceptors=interceptors)
        mark_alive(self.health)
        host = listen_host(self.listen)
        if self.config.health_port:
            self.probe_server = serve_probe_port(self.health, host, self.config.health_port)
        if self.metrics is not None:
            self.metrics.serve(host, self.config.metrics.port)
        return port

    def stop(self, grace: float = 3.0) -> None:
        """NOT_SERVING first, then stop taking calls and close the side ports."""
        self.health.enter_graceful_shutdown()
        if self.server is not None:
            self.server.stop(grace).wait(grace + 1)
        if self.probe_server is not None:
            self.probe_server.stop(0)
        if self.metrics is not None:
            self.metrics.stop()
