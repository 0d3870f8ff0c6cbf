"""Invalid UTF-8 in a request's string fields is refused as INVALID_ARGUMENT naming the
field. Without this, protobuf's parse error reaches the client as UNKNOWN before any
handler (or the error mapping) runs."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from services.common.errors import FieldViolation, InvalidArgument


class _Unparsable:
    """What the lenient deserializer hands on instead of a message protobuf refused."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations

    def error(self) -> InvalidArgument:
        fields = ", ".join(v.field for v in self.violations if v.field)
        return InvalidArgument(f"invalid request: {fields or 'unparsable'}", self.violations)


class Utf8Guard(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT, naming the field, for a request message (unary, or any
    message of a request stream) whose string fields are not valid UTF-8 or that does not
    parse at all."""

    def __init__(self) -> None:
        self._handlers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        method = handler_call_details.method
        guarded = self._handlers.get(method)
        if guarded is None:
            handler = await continuation(handler_call_details)
            if not (handler and handler.request_deserializer and not handler.unary_stream):
                return handler  # not cached: unknown method names must not grow the dict
            guarded = self._handlers[method] = _guard(handler)
        return guarded


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse: Any = handler.request_deserializer
    descriptor: Descriptor | None = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            fields = [] if descriptor is None else invalid_utf8_fields(descriptor, data)
            return _Unparsable(
                [FieldViolation(field, "not valid UTF-8") for field in fields]
                or [FieldViolation("", "the request could not be parsed")]
            )

    serializers: dict[str, Any] = {
        "request_deserializer": deserialize,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        unary_unary: Any = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Unparsable):
                raise request.error()
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, **serializers)

    async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        # The handler reads the stream as usual and meets the error where the bad message is.
        async for request in requests:
            if isinstance(request, _Unparsable):
                raise request.error()
            yield request

    if handler.stream_unary:
        stream_unary: Any = handler.stream_unary

        async def guarded_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await stream_unary(checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(guarded_unary, **serializers)
    stream_stream: Any = handler.stream_stream
    if inspect.isasyncgenfunction(stream_stream):

        async def guarded_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in stream_stream(checked(requests), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(guarded_stream, **serializers)

    async def guarded_writer(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        return await stream_stream(checked(requests), context)

    return grpc.stream_stream_rpc_method_handler(guarded_writer, **serializers)


def invalid_utf8_fields(descriptor: Descriptor, data: bytes, prefix: str = "") -> list[str]:
    """Paths (`texts[2]`, `glossary[0].source`) of string fields in a serialized message
    whose bytes are not UTF-8, found by walking the wire format."""
    found: list[str] = []
    seen: dict[int, int] = {}
    position = 0
    try:
        while position < len(data):
            key, position = _varint(data, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _varint(data, position)
            elif wire_type == 1:
                position += 8
            elif wire_type == 5:
                position += 4
            elif wire_type == 2:
                length, position = _varint(data, position)
                value, position = data[position : position + length], position + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                path = prefix + field.name
                if field.is_repeated:
                    path += f"[{seen.get(number, 0)}]"
                    seen[number] = seen.get(number, 0) + 1
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        value.decode("utf-8")
                    except UnicodeDecodeError:
                        found.append(path)
                elif field.message_type is not None:
                    found += invalid_utf8_fields(field.message_type, value, path + ".")
            else:  # groups are not used by proto3; stop rather than guess
                break
    except IndexError:  # truncated input: report what was found before it
        pass
    return found


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
