"""Prometheus metrics of a party or dealer process, served over HTTP (``GET /metrics``).

Every collector lives in the server's own :class:`CollectorRegistry` (no process-global
state).  The hooks are thin: a gRPC server interceptor counts each finished unary call
by method and status and times it, and reads the rounds and bytes of each input from
``Infer`` responses; gauges read the queue, the peer link and the prepared sessions
when scraped.  No share, input, output or weight value is ever a label or a sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ROUND_BUCKETS = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400)
BYTE_BUCKETS = tuple(float(1 << (20 + 2 * k)) for k in range(7))  # 1 MiB .. 4 GiB
INFER_METHOD = "Infer"


class ServerMetrics:
    """The collectors of one server process (``role``: party0, party1 or dealer)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mpcvit_requests", "Finished gRPC calls by method and status code (OK or the "
            "failure's code)", ["method", "status"], registry=r)
        self.latency = Histogram(
            "mpcvit_request_seconds", "Wall time of finished gRPC calls at this server",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rounds = Histogram(
            "mpcvit_request_rounds", "Communication rounds of the secure session that "
            "served each input (party servers)", buckets=ROUND_BUCKETS, registry=r)
        self.bytes = Histogram(
            "mpcvit_request_bytes", "Bytes this party sent to its peer in the secure session "
            "that served each input", buckets=BYTE_BUCKETS, registry=r)
        Gauge("mpcvit_info", "Constant 1; the role label says which server this is",
              ["role"], registry=r).labels(role).set(1)
        self._http: Any = None

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value ``read()`` returns at each scrape."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    # -- hooks -------------------------------------------------------------------------
    def call_done(self, method: str, status: str, seconds: float) -> None:
        self.requests.labels(method, status).inc()
        self.latency.labels(method).observe(seconds)

    def infer_done(self, response: Any) -> None:
        """Rounds and bytes of each input of a successful ``InferResponse``."""
        for output in response.outputs:
            self.rounds.observe(output.stats.rounds)
            self.bytes.observe(output.stats.bytes_sent)

    def interceptor(self) -> grpc.ServerInterceptor:
        return _MetricsInterceptor(self)

    # -- HTTP endpoint -----------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the ``/metrics`` HTTP endpoint on its own thread; return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _MetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every unary-unary call (streams, such as the peer link, are not
    requests)."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        metrics = self.metrics

        def behavior(request: object, context: grpc.ServicerContext) -> object:
            started = time.monotonic()
            try:
                response = inner(request, context)
            except BaseException:
                code = context.code()
                metrics.call_done(method, code.name if code else "UNKNOWN",
                                  time.monotonic() - started)
                raise
            code = context.code()
            status = code.name if code else "OK"
            metrics.call_done(method, status, time.monotonic() - started)
            if method == INFER_METHOD and status == "OK":
                metrics.infer_done(response)
            return response

        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def party_metrics(rank: int, *, queue: Any, serving: Callable[[], bool],
                  dealer: bool) -> ServerMetrics:
    """A party's collectors: the common ones plus its queue, health and offline phase."""
    m = ServerMetrics(f"party{rank}")
    m.gauge("mpcvit_queue_depth", "Request halves queued at this party", lambda: len(queue))
    m.gauge("mpcvit_ready", "1 while health is SERVING (weights shared, peer connected)",
            lambda: float(serving()))

    def prepared() -> float:
        if not dealer:
            return 0.0
        from mpcvit.mpc.runtime import dealer_provider

        return float(dealer_provider().prepared_sessions)

    m.gauge("mpcvit_prepared_sessions", "Sessions whose dealer randomness this party holds "
            "ahead of their online phase", prepared)
    return m


def dealer_metrics(state: Any) -> ServerMetrics:
    """The dealer's collectors: the common ones plus its open sessions and weight masks."""
    m = ServerMetrics("dealer")
    m.gauge("mpcvit_dealer_open_sessions", "Dealer sessions opened (seeds handed out) and "
            "not closed yet, prepared ones included", lambda: float(state.open_sessions))
    m.gauge("mpcvit_dealer_weight_masks", "Weight masks kept for the parties' loaded models",
            lambda: float(state.weight_masks))
    return m
