"""Reading a caller's credential from gRPC metadata: `x-api-key` or `authorization: Bearer`."""

from __future__ import annotations

from collections.abc import Iterable

API_KEY_HEADER = "x-api-key"
AUTHORIZATION_HEADER = "authorization"
# Redis pub/sub channel on which auth announces each revoked key id, so that gateways drop
# what they lease for it at once instead of when the lease runs out.
REVOKED_KEYS_CHANNEL = "speechmesh:revoked-keys"


def credentials_from_metadata(
    metadata: Iterable[tuple[str, str | bytes]] | None,
) -> tuple[str, str]:
    """Returns (api_key, token); either may be empty."""
    api_key = token = ""
    for key, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if key == API_KEY_HEADER:
            api_key = text.strip()
        elif key == AUTHORIZATION_HEADER:
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                token = credential.strip()
    return api_key, token
