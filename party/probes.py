"""Health for Kubernetes probes: a plaintext port that serves only grpc.health.v1.

The kubelet's built-in gRPC probes cannot present a client certificate, so they cannot
reach a mutual-TLS port.  The probe port shares the server's ``HealthServicer``: the
statuses are the same on both ports, and nothing but health is served here.

Service names: ``""`` (and the server's own service name) is readiness; ``liveness``
is SERVING from start-up until shutdown, whatever the peer does, so that a missing peer
makes a pod unready without getting it restarted.
"""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

LIVENESS = "liveness"


def mark_alive(servicer: health.HealthServicer) -> None:
    servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)


def serve_probe_port(servicer: health.HealthServicer, host: str, port: int) -> grpc.Server:
    """Serve ``servicer`` in plaintext on ``host:port`` (a small server of its own)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2),
                         maximum_concurrent_rpcs=16)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen for health probes on {address}")
    server.start()
    return server
