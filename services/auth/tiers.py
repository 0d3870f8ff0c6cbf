"""What each tier may do. Zero means unlimited."""

from __future__ import annotations

from dataclasses import dataclass

from speechmesh.auth.v1 import auth_pb2


@dataclass(frozen=True)
class TierLimits:
    per_minute: int
    per_day: int

    @property
    def unlimited(self) -> bool:
        return self.per_minute == 0 and self.per_day == 0


ADMIN_TIER = auth_pb2.TIER_ADMIN

LIMITS: dict[int, TierLimits] = {
    auth_pb2.TIER_FREE: TierLimits(per_minute=10, per_day=1_000),
    auth_pb2.TIER_BASIC: TierLimits(per_minute=50, per_day=10_000),
    auth_pb2.TIER_PRO: TierLimits(per_minute=200, per_day=100_000),
    auth_pb2.TIER_ENTERPRISE: TierLimits(per_minute=1_000, per_day=1_000_000),
    auth_pb2.TIER_ADMIN: TierLimits(per_minute=0, per_day=0),
}


def tier_name(tier: int) -> str:
    return auth_pb2.Tier.Name(tier).removeprefix("TIER_").lower()


# Methods only an admin-tier principal may call.
ADMIN_METHOD_PREFIXES = (
    "/speechmesh.gateway.v1.AdminService/",
    "/speechmesh.auth.v1.AuthService/CreateApiKey",
    "/speechmesh.auth.v1.AuthService/RevokeApiKey",
    "/speechmesh.auth.v1.AuthService/ListApiKeys",
)


def is_admin_method(method: str) -> bool:
    return method.startswith(ADMIN_METHOD_PREFIXES)
