"""Typed settings. The only module family that reads the environment.

Each service has one `BaseSettings` subclass with its own env prefix
(`SPEECHMESH_AUTH_`, `SPEECHMESH_ASR_`, ...). Settings shared by every service live in
`ServiceSettings`, so `SPEECHMESH_AUTH_PORT` and `SPEECHMESH_ASR_PORT` are the same field
read under two prefixes.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    PRODUCTION = "production"


class ModelCacheSettings(BaseSettings):
    """Where converted models live: outside the repository, reused across runs."""

    model_config = SettingsConfigDict(env_prefix="SPEECHMESH_MODEL_", extra="ignore")

    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "speechmesh" / "models",
        description="Folder for converted and exported models (env SPEECHMESH_MODEL_CACHE_DIR).",
    )


def model_cache_dir() -> Path:
    return ModelCacheSettings().cache_dir.expanduser()


class ServiceSettings(BaseSettings):
    """What every service has: where it listens, how it logs, how it shuts down."""

    model_config = SettingsConfigDict(extra="ignore", protected_namespaces=())

    host: str = Field(default="[::]", description="Address the gRPC server binds.")
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(
        default=0, ge=-1, le=65535, description="Prometheus HTTP port; -1 disables it."
    )
    environment: Environment = Environment.DEVELOPMENT
    log_level: str = "INFO"
    grace_period_s: float = Field(
        default=10.0, ge=0, description="How long SIGTERM waits for in-flight calls."
    )
    max_message_bytes: int = Field(
        default=16 * 1024 * 1024, gt=0, description="Largest gRPC message received or sent."
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis to use.")
    health_interval_s: float = Field(
        default=1.0, gt=0, description="How often readiness is re-checked for health."
    )
    shutdown_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="After SIGTERM, how long to keep serving while health says NOT_SERVING, "
        "so load balancers stop routing before the port closes.",
    )
    max_concurrent_rpcs: int | None = Field(
        default=None, gt=0, description="RPCs handled at once; more are refused RESOURCE_EXHAUSTED."
    )
    access_log: bool = Field(default=True, description="Log one line per RPC.")
    tls_cert_file: Path | None = Field(default=None, description="Server certificate (PEM).")
    tls_key_file: Path | None = Field(default=None, description="Server private key (PEM).")
    tls_client_ca_file: Path | None = Field(
        default=None, description="CA whose client certificates are required (mTLS)."
    )
