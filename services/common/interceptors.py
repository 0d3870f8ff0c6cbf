"""The one server interceptor: request id, metrics, access log, and exception → status.

All four concerns run in a single wrapper around each handler, whatever its streaming shape:
every call pays for one layer, not four, and wrapped handlers are built once per method.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import grpc

from services.common import metrics
from services.common.errors import ServiceError, internal_status
from services.common.logs import request_id_var
from services.common.utf8 import Utf8Guard

log = logging.getLogger("speechmesh.rpc")

REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Probes and grpcurl's reflection calls would drown the access log.
INFRASTRUCTURE_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _MethodObserver:
    """Per-method state, built once: labels, metric children, whether to log."""

    def __init__(self, method: str, rpc_type: str, access_log: bool) -> None:
        service, _, name = method.lstrip("/").partition("/")
        self.method = method
        self.labels = (service, name, rpc_type)
        self.in_flight = metrics.in_flight.labels(service, name)
        self.seconds = metrics.handling_seconds.labels(service, name, rpc_type)
        self.access_log = access_log and not method.startswith(INFRASTRUCTURE_PREFIXES)

    def scope(self, context: grpc.aio.ServicerContext) -> _CallScope:
        return _CallScope(self, context)


class _CallScope:
    """Entered around one call. Maps errors to statuses and records how the call ended."""

    __slots__ = ("context", "observer", "request_id", "started", "token")

    def __init__(self, observer: _MethodObserver, context: grpc.aio.ServicerContext) -> None:
        self.observer = observer
        self.context = context

    async def __aenter__(self) -> None:
        given = ""
        for key, value in self.context.invocation_metadata() or ():
            if (
                key == REQUEST_ID_HEADER
                and isinstance(value, str)
                and _VALID_REQUEST_ID.match(value)
            ):
                given = value
        self.request_id = given or uuid.uuid4().hex
        self.token = request_id_var.set(self.request_id)
        self.observer.in_flight.inc()
        self.started = time.perf_counter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        context, observer = self.context, self.observer
        status: grpc.Status | None = None
        if exc is None:
            code = grpc.StatusCode.OK
        elif isinstance(exc, ServiceError):
            status = exc.to_status()
            code = status.code
            log.info(
                "request refused",
                extra={
                    "method": observer.method,
                    "code": code.name,
                    "reason": exc.reason,
                    "error": exc.message,
                },
            )
        elif isinstance(exc, asyncio.CancelledError):
            code = grpc.StatusCode.CANCELLED
        elif isinstance(exc, grpc.aio.AbortError) or not isinstance(exc, Exception):
            raw = context.code()
            code = (
                raw
                if isinstance(raw, grpc.StatusCode)
                else _CODES_BY_VALUE.get(raw, grpc.StatusCode.UNKNOWN)
            )
        else:
            log.error("unhandled error", exc_info=exc, extra={"method": observer.method})
            status = internal_status(self.request_id)
            code = status.code
        elapsed = time.perf_counter() - self.started
        observer.in_flight.dec()
        observer.seconds.observe(elapsed)
        metrics.handled_total.labels(*observer.labels, code.name).inc()
        if observer.access_log:
            log.info(
                "rpc finished",
                extra={
                    "method": observer.method,
                    "code": code.name,
                    "duration_ms": round(elapsed * 1000, 3),
                    "peer": context.peer(),
                },
            )
        trailing = (*(context.trailing_metadata() or ()), (REQUEST_ID_HEADER, self.request_id))
        request_id_var.reset(self.token)
        if status is not None:
            await context.abort(
                status.code,
                status.details,
                trailing_metadata=trailing + tuple(status.trailing_metadata),
            )
        elif exc is None:
            context.set_trailing_metadata(trailing)


Scope = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """Returns the same handler with `scope(context)` entered for the whole call."""
    serializers: dict[str, Any] = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        unary_unary: Any = handler.unary_unary

        async def _unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context):
                return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(_unary_unary, **serializers)
    if handler.stream_unary:
        stream_unary: Any = handler.stream_unary

        async def _stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context):
                return await stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(_stream_unary, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_streaming_response(handler.unary_stream, scope), **serializers
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_streaming_response(handler.stream_stream, scope), **serializers
    )


def _wrap_streaming_response(behavior: Any, scope: Scope) -> Any:
    # A streaming handler is either an async generator or a coroutine that writes through
    # context.write (as grpc's own health servicer does); the wrapper must keep its shape.
    if inspect.isasyncgenfunction(behavior):

        async def _generator(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context):
                async for response in behavior(request, context):
                    yield response

        return _generator

    async def _writer(request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with scope(context):
            return await behavior(request, context)

    return _writer


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler in a scope, once per method (the wrapped handler is
    cached, so a call costs one dictionary lookup here)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def scope_for(self, method: str, handler: grpc.RpcMethodHandler) -> Scope | None:
        """The scope to run calls of `method` in; None leaves the handler as it is."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:  # None for methods no servicer handles
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = await continuation(handler_call_details)
            if handler is None:
                return None
            scope = self.scope_for(method, handler)
            wrapped = handler if scope is None else wrap_handler(handler, scope)
            self._wrapped[method] = wrapped
        return wrapped


class ServerCallInterceptor(WrappingInterceptor):
    def __init__(self, access_log: bool = True) -> None:
        super().__init__()
        self.access_log = access_log

    def scope_for(self, method: str, handler: grpc.RpcMethodHandler) -> Scope:
        return _MethodObserver(method, _rpc_type(handler), self.access_log).scope


def server_interceptors(access_log: bool = True) -> list[grpc.aio.ServerInterceptor]:
    # The UTF-8 guard runs inside the call scope, so its refusals are mapped and counted.
    return [ServerCallInterceptor(access_log), Utf8Guard()]
