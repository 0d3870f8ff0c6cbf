"""TLS for servers and for the channels between services; mutual TLS when a client CA is
configured. Without certificates everything stays plaintext (local runs, tests)."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
) -> grpc.ServerCredentials | None:
    """Credentials for a server port; None means plaintext. A client CA turns on mTLS:
    only clients presenting a certificate it signed may connect."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise ValueError("a client CA needs the server's own certificate and key too")
        return None
    if cert_file is None or key_file is None:
        raise ValueError("TLS needs both a certificate and a key file")
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=client_ca_file.read_bytes() if client_ca_file else None,
        require_client_auth=client_ca_file is not None,
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> grpc.ChannelCredentials | None:
    """Credentials for a client channel; None means plaintext. A certificate and key make
    the client present itself (for servers that require mTLS)."""
    if ca_file is None and cert_file is None and key_file is None:
        return None
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key, and the other way round")
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )
