"""What the gateway knows about its downstreams: health (polled), breakers, cache."""

from __future__ import annotations

import asyncio

import grpc
import pybreaker
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.cache import RedisCache
from services.gateway.downstream import Downstream
from speechmesh.asr.v1 import asr_pb2
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2
from speechmesh.mt.v1 import mt_pb2

# The readiness name each downstream reports under.
HEALTH_NAMES = {
    "auth": auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name,
    "asr": asr_pb2.DESCRIPTOR.services_by_name["AsrService"].full_name,
    "mt": mt_pb2.DESCRIPTOR.services_by_name["MtService"].full_name,
}
# The gateway cannot work without these; without mt it still transcribes.
REQUIRED = ("auth", "asr")

_BREAKER_STATES = {
    pybreaker.STATE_CLOSED: gateway_pb2.BREAKER_STATE_CLOSED,
    pybreaker.STATE_OPEN: gateway_pb2.BREAKER_STATE_OPEN,
    pybreaker.STATE_HALF_OPEN: gateway_pb2.BREAKER_STATE_HALF_OPEN,
}


class MeshStatus:
    def __init__(
        self, downstreams: dict[str, Downstream], caches: list[RedisCache], timeout_s: float
    ) -> None:
        self.downstreams = downstreams
        self.caches = caches
        self.timeout_s = timeout_s
        self.serving = dict.fromkeys(downstreams, False)
        self._health = {
            name: health_pb2_grpc.HealthStub(d.channel) for name, d in downstreams.items()
        }

    async def _check(self, name: str) -> bool:
        try:
            response = await self._health[name].Check(
                health_pb2.HealthCheckRequest(service=HEALTH_NAMES[name]), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def refresh(self) -> bool:
        """Checks every downstream; returns whether the required ones serve."""
        names = list(self.downstreams)
        results = await asyncio.gather(*(self._check(n) for n in names))
        self.serving = dict(zip(names, results, strict=True))
        return all(self.serving[n] for n in REQUIRED if n in self.serving)

    def describe(self) -> list[gateway_pb2.DownstreamStatus]:
        statuses = []
        for name, downstream in self.downstreams.items():
            breaker = downstream.breaker
            status = gateway_pb2.DownstreamStatus(
                name=name,
                target=downstream.target,
                serving=gateway_pb2.SERVING_STATE_SERVING
                if self.serving.get(name)
                else gateway_pb2.SERVING_STATE_NOT_SERVING,
                breaker=_BREAKER_STATES.get(breaker.state, gateway_pb2.BREAKER_STATE_UNSPECIFIED),
                consecutive_failures=breaker.consecutive_failures,
            )
            if breaker.changed_ms:
                status.breaker_change_time.FromMilliseconds(breaker.changed_ms)
            statuses.append(status)
        return statuses

    async def cache_stats(self) -> gateway_pb2.CacheStats:
        entries = 0
        for cache in self.caches:
            try:
                entries += await cache.count()
            except Exception:  # stats are best-effort: Redis may be away
                entries = -1
                break
        return gateway_pb2.CacheStats(
            hits=sum(c.hits for c in self.caches),
            misses=sum(c.misses for c in self.caches),
            entries=max(entries, 0),
        )
