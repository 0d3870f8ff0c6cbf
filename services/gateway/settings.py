"""Settings of the gateway (env prefix SPEECHMESH_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SPEECHMESH_GATEWAY_", extra="ignore")

    port: int = 50050
    metrics_port: int = 9150
    auth_target: str = "127.0.0.1:50053"
    asr_target: str = "127.0.0.1:50051"
    mt_target: str = "127.0.0.1:50052"

    downstream_tls_ca_file: Path | None = Field(
        default=None, description="CA that signed the downstreams' certificates (turns on TLS)."
    )
    downstream_tls_cert_file: Path | None = Field(
        default=None, description="The gateway's client certificate, for downstreams with mTLS."
    )
    downstream_tls_key_file: Path | None = None
    downstream_tls_server_name: str | None = Field(
        default=None, description="Name to check in the downstreams' certificates."
    )

    default_deadline_s: float = Field(
        default=30.0, gt=0, description="Deadline for calls whose caller set none."
    )
    deadline_margin_s: float = Field(
        default=0.005, ge=0, description="Kept back from each downstream call for our own reply."
    )
    auth_lease_s: float = Field(
        default=1.0,
        ge=0,
        description=(
            "For this long after auth's verdict on a credential, its unary public calls are"
            " admitted without a round trip to auth (charged in batches, within the quota auth"
            " reported); 0 authenticates every call first."
        ),
    )
    auth_charge_interval_s: float = Field(
        default=0.2,
        gt=0,
        description="How often calls admitted on leases are charged to auth (and re-verified).",
    )
    retry_max_attempts: int = Field(default=3, ge=1, le=10)
    retry_initial_backoff_s: float = Field(default=0.05, gt=0)
    retry_max_backoff_s: float = Field(default=1.0, gt=0)
    retry_budget_ratio: float = Field(
        default=0.2, ge=0, le=1, description="Retries allowed per request, over a 10 s window."
    )
    breaker_fail_max: int = Field(
        default=5, ge=1, description="Consecutive failures that open a downstream's breaker."
    )
    breaker_reset_s: float = Field(
        default=10.0, gt=0, description="How long an open breaker waits before a trial call."
    )
    breaker_sync_interval_s: float = Field(
        default=0.5, gt=0, description="How often breaker states are shared through Redis."
    )
    cache_ttl_s: int = Field(default=3600, ge=0, description="Results cache TTL; 0 disables.")
    redis_prefix: str = "sm:gateway:"
    redis_timeout_s: float = Field(default=0.5, gt=0)
    downstream_health_timeout_s: float = Field(default=1.0, gt=0)
    max_audio_bytes: int = Field(
        default=10 * 1024 * 1024, gt=0, description="Largest audio of one unary request."
    )
    stream_default_deadline_s: float = Field(
        default=3600.0, gt=0, description="Deadline for streams whose caller set none."
    )
