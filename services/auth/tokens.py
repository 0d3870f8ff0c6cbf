"""Short-lived JWTs for API keys. The algorithm is pinned: a token signed any other way,
or not signed at all, is refused."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass

import jwt

from services.auth.tiers import tier_name
from services.common.errors import Unauthenticated

ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub"]


@dataclass(frozen=True)
class TokenClaims:
    key_id: str
    expires: dt.datetime


class TokenIssuer:
    def __init__(self, secret: str, issuer: str, audience: str) -> None:
        self.secret = secret
        self.issuer = issuer
        self.audience = audience

    def issue(self, key_id: str, owner: str, tier: int, ttl_s: int) -> tuple[str, dt.datetime]:
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        expires = now + dt.timedelta(seconds=ttl_s)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": key_id,
            "iat": now,
            "nbf": now,
            "exp": expires,
            "jti": secrets.token_hex(8),
            "owner": owner,
            "tier": tier_name(tier),
        }
        return jwt.encode(claims, self.secret, algorithm=ALGORITHM), expires

    def verify(self, token: str) -> TokenClaims:
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": _REQUIRED_CLAIMS},
                leeway=5,
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated("token invalid", reason="TOKEN_INVALID") from exc
        return TokenClaims(
            key_id=str(claims["sub"]), expires=dt.datetime.fromtimestamp(claims["exp"], dt.UTC)
        )
