"""TLS and mutual TLS with certificates made at test time (openssl): the auth service
behind mTLS, and the gateway reaching it with its client certificate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from services.auth.service import AuthService
from services.common.testing import running_service
from services.common.tls import channel_credentials
from services.gateway.service import GatewayService
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.auth.conftest import ADMIN, auth_settings
from tests.gateway.conftest import gateway_settings


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for localhost, and a client certificate, all signed by it."""
    folder = tmp_path_factory.mktemp("pki")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=folder,
    )
    for name, extension in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=folder,
        )
        (folder / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=folder,
        )
    return folder


async def test_mtls_refuses_clients_without_a_certificate(
    pki: Path, redis_url: str, redis_prefix: str
) -> None:
    settings = auth_settings(
        redis_url,
        redis_prefix,
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_client_ca_file=pki / "ca.pem",
    )
    async with running_service(AuthService(settings), settings) as runtime:
        target = f"localhost:{runtime.port}"
        request = auth_pb2.ListApiKeysRequest()
        for credentials in (None, channel_credentials(pki / "ca.pem", None, None)):
            channel = (
                grpc.aio.insecure_channel(target)
                if credentials is None
                else grpc.aio.secure_channel(target, credentials)
            )
            async with channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(
                        request, metadata=ADMIN, timeout=3
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        mutual = channel_credentials(pki / "ca.pem", pki / "client.pem", pki / "client.key")
        assert mutual is not None
        async with grpc.aio.secure_channel(target, mutual) as channel:
            await auth_pb2_grpc.AuthServiceStub(channel).ListApiKeys(request, metadata=ADMIN)


async def test_gateway_reaches_auth_over_mtls(pki: Path, redis_url: str, redis_prefix: str) -> None:
    a_settings = auth_settings(
        redis_url,
        redis_prefix,
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_client_ca_file=pki / "ca.pem",
    )
    async with running_service(AuthService(a_settings), a_settings) as auth:
        g_settings = gateway_settings(
            redis_url,
            redis_prefix,
            auth_target=f"127.0.0.1:{auth.port}",
            downstream_tls_ca_file=pki / "ca.pem",
            downstream_tls_cert_file=pki / "client.pem",
            downstream_tls_key_file=pki / "client.key",
            downstream_tls_server_name="localhost",
        )
        async with running_service(GatewayService(g_settings), g_settings) as gateway:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                listed = await gateway_pb2_grpc.AdminServiceStub(channel).ListApiKeys(
                    gateway_pb2.ListApiKeysRequest(), metadata=ADMIN
                )
                assert listed.next_page_token == ""


def test_half_configured_tls_is_refused() -> None:
    from services.common.tls import server_credentials

    with pytest.raises(ValueError, match="both"):
        server_credentials(Path("cert.pem"), None, None)
    with pytest.raises(ValueError, match="client CA"):
        server_credentials(None, None, Path("ca.pem"))
