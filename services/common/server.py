"""The gRPC server every service runs on: health, reflection, interceptors, metrics,
readiness and graceful shutdown. A service only supplies a `GrpcService`."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from services.common.interceptors import server_interceptors
from services.common.logs import configure_logging
from services.common.metrics import serve_metrics
from services.common.settings import ServiceSettings
from services.common.tasks import stop_tasks
from services.common.tls import server_credentials

log = logging.getLogger("speechmesh.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcService(abc.ABC):
    """What a service gives the runtime: its servicers and its lifecycle.

    Health has two levels. The overall service "" turns SERVING once `start()` has finished
    and stays so while the process lives (liveness and startup probes). Each full service
    name follows `is_ready()` (readiness): a service whose dependency is down reports
    NOT_SERVING there until it is back.
    """

    name: str
    service_names: Sequence[str]

    def __init__(self) -> None:
        self._health_check_requested = asyncio.Event()

    @abc.abstractmethod
    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Registers the servicers."""

    def interceptors(self) -> Sequence[grpc.aio.ServerInterceptor]:
        """Interceptors of the service's own, run inside the shared one (e.g. the gateway's
        authentication)."""
        return ()

    async def start(self) -> None:
        """Loads models and opens connections; runs after the port is bound."""

    async def is_ready(self) -> bool:
        """Whether requests can be served now."""
        return True

    async def stop(self) -> None:
        """Releases what start() acquired."""

    def request_health_check(self) -> None:
        """Asks for readiness to be re-checked now rather than at the next interval."""
        self._health_check_requested.set()


class Runtime:
    """Hosts one GrpcService on a grpc.aio server."""

    def __init__(self, service: GrpcService, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[*server_interceptors(settings.access_log), *service.interceptors()],
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
                # Two servers silently sharing a port would split traffic between versions.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        self.port = 0
        self.metrics_port: int | None = None
        self._readiness_task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> int:
        """Binds, starts serving NOT_SERVING, runs service.start(), then tracks readiness."""
        for name in ("", *self.service.service_names):
            await self.health.set(name, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service.add_to_server(self.server)
        reflection.enable_server_reflection(
            (
                *self.service.service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        address = f"{self.settings.host}:{self.settings.port}"
        credentials = server_credentials(
            self.settings.tls_cert_file,
            self.settings.tls_key_file,
            self.settings.tls_client_ca_file,
        )
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        await self.server.start()
        self.metrics_port = serve_metrics(self.settings.metrics_port)
        log.info(
            "listening",
            extra={
                "service": self.service.name,
                "port": self.port,
                "metrics_port": self.metrics_port,
            },
        )
        await self.service.start()
        await self._update_readiness()
        await self.health.set("", SERVING)
        self._readiness_task = asyncio.create_task(self._track_readiness())
        return self.port

    async def _update_readiness(self) -> None:
        try:
            async with asyncio.timeout(max(self.settings.health_interval_s, 1.0)):
                ready = await self.service.is_ready()
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            ready = False
        for name in self.service.service_names:
            await self.health.set(name, SERVING if ready else NOT_SERVING)

    async def _track_readiness(self) -> None:
        requested = self.service._health_check_requested
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.health_interval_s):
                    await requested.wait()
            requested.clear()
            await self._update_readiness()

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, optional drain delay, finish in-flight calls, close."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        log.info("shutting down", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        if self.settings.shutdown_delay_s:
            await asyncio.sleep(self.settings.shutdown_delay_s)
        await stop_tasks(self._readiness_task)
        await self.server.stop(grace)
        await self.service.stop()
        log.info("stopped")


async def serve(make_service: Callable[[], GrpcService], settings: ServiceSettings) -> None:
    """Runs a service until SIGTERM or SIGINT, then shuts it down gracefully. The service is
    built here, inside the running loop: grpc.aio channels bind to the loop they are made in."""
    service = make_service()
    configure_logging(service.name, settings.log_level)
    runtime = Runtime(service, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(runtime.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()  # a failed start ends the process with its error
        await stopping
    else:
        starting.cancel()
    await runtime.stop()


def run(make_service: Callable[[], GrpcService], settings: ServiceSettings) -> None:
    """Entry point for `python -m services.<name>`."""
    asyncio.run(serve(make_service, settings))
