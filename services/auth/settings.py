"""Settings of the auth service (env prefix SPEECHMESH_AUTH_)."""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.settings import Environment, ServiceSettings

# Development defaults: usable on a laptop, refused in production.
DEV_JWT_SECRET = "speechmesh-dev-jwt-secret-change-me-0123456789"
DEV_HASH_PEPPER = "speechmesh-dev-hash-pepper-change-me"


class AuthSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="SPEECHMESH_AUTH_", extra="ignore", populate_by_name=True
    )

    port: int = 50053
    metrics_port: int = 9153
    jwt_secret: SecretStr = Field(
        default=SecretStr(DEV_JWT_SECRET), description="HMAC secret signing JWTs (HS256)."
    )
    jwt_issuer: str = "speechmesh-auth"
    jwt_audience: str = "speechmesh"
    token_ttl_default_s: int = Field(default=900, gt=0)
    token_ttl_max_s: int = Field(default=3600, gt=0)
    hash_pepper: SecretStr = Field(
        default=SecretStr(DEV_HASH_PEPPER),
        description="Server-side secret mixed into the stored HMAC of every API key.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "SPEECHMESH_ADMIN_KEY", "SPEECHMESH_AUTH_ADMIN_KEY", "admin_key"
        ),
        description="Bootstrap admin API key (env SPEECHMESH_ADMIN_KEY); not stored in Redis.",
    )
    redis_prefix: str = Field(default="sm:auth:", description="Prefix of every Redis key.")
    redis_timeout_s: float = Field(default=2.0, gt=0)

    @model_validator(mode="after")
    def _no_default_secrets_in_production(self) -> AuthSettings:
        if self.environment is Environment.PRODUCTION:
            for name, value, default in (
                ("jwt_secret", self.jwt_secret, DEV_JWT_SECRET),
                ("hash_pepper", self.hash_pepper, DEV_HASH_PEPPER),
            ):
                secret = value.get_secret_value()
                if not secret or secret == default or len(secret) < 32:
                    raise ValueError(
                        f"SPEECHMESH_AUTH_{name.upper()} must be set to a secret of at least "
                        "32 characters in production"
                    )
        if self.token_ttl_default_s > self.token_ttl_max_s:
            raise ValueError("token_ttl_default_s exceeds token_ttl_max_s")
        return self
