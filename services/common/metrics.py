"""Prometheus metrics shared by every service, named like go-grpc-prometheus's."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

handled_total = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
)
handling_seconds = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC, from receipt to status.",
    ["grpc_service", "grpc_method", "grpc_type"],
    buckets=LATENCY_BUCKETS,
)
in_flight = Gauge(
    "grpc_server_in_flight",
    "RPCs being handled now.",
    ["grpc_service", "grpc_method"],
)


def serve_metrics(port: int) -> int | None:
    """Starts the metrics HTTP endpoint; returns the bound port (None when disabled)."""
    if port < 0:
        return None
    server, _thread = start_http_server(port)
    return int(server.server_address[1])
