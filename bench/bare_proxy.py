"""The least a Python gRPC hop can cost: a grpc.aio server that forwards one method's bytes,
unparsed, to another server, with no interceptors, no auth and no retries.
`make bench-gateway` puts it in front of mt beside the gateway, to show how much of what
the gateway adds is the hop itself.

    python bench/bare_proxy.py PORT TARGET METHOD
"""

from __future__ import annotations

import asyncio
import sys

import grpc


async def serve(port: int, target: str, method: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        forward = channel.unary_unary(method, None, None)  # bytes as they are

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return await forward(request, timeout=context.time_remaining())  # type: ignore[no-any-return]

        handler = grpc.unary_unary_rpc_method_handler(relay)
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_OneMethod(method, handler),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()


class _OneMethod(grpc.GenericRpcHandler):
    def __init__(self, method: str, handler: grpc.RpcMethodHandler) -> None:
        self.method = method
        self.handler = handler

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.handler if details.method == self.method else None


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
