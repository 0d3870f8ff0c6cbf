"""Security checks on the running mesh: secrets never reach logs or Redis (nor Redis's
append-only file), admin RPCs refuse every non-admin credential, forged JWTs (`alg: none`,
another key, another algorithm, tampered claims) are refused, oversize messages are refused
before the server allocates them, and a caller's mistakes never open a breaker for others.

TLS and mTLS are covered by tests/common/test_tls.py.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import secrets
import struct
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import numpy as np
import pytest
import redis
import soundfile
from google.protobuf import duration_pb2

from services.common.testing import error_details
from speechmesh.asr.v1 import asr_pb2
from speechmesh.auth.v1 import auth_pb2, auth_pb2_grpc
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.reliability import (
    SERVICES,
    clear_refusal,
    mesh_env,
    peak_rss_bytes,
    say,
)
from tools.mesh import Mesh

pytestmark = pytest.mark.models

# Secrets of this mesh's own, so a leak is unambiguous (none is a development default).
ADMIN_KEY = "adm-" + secrets.token_urlsafe(24)
JWT_SECRET = "jwt-" + secrets.token_urlsafe(32)
PEPPER = "pepper-" + secrets.token_urlsafe(32)
ISSUER, AUDIENCE = "speechmesh-auth", "speechmesh"
GATEWAY_MAX_MESSAGE = 4 * 1024 * 1024
GATEWAY_MAX_AUDIO = 1024 * 1024
ADMIN_RPCS: dict[str, Any] = {
    "CreateApiKey": gateway_pb2.CreateApiKeyRequest(owner="intruder", tier=auth_pb2.TIER_ADMIN),
    "RevokeApiKey": gateway_pb2.RevokeApiKeyRequest(key_id="0123456789abcdef"),
    "ListApiKeys": gateway_pb2.ListApiKeysRequest(),
    "ResetCircuitBreakers": gateway_pb2.ResetCircuitBreakersRequest(),
    "ClearCache": gateway_pb2.ClearCacheRequest(),
    "GetMeshStatus": gateway_pb2.GetMeshStatusRequest(),
}
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Secured:
    mesh: Mesh
    logs: Path
    gateway: grpc.Channel
    auth: grpc.Channel
    secrets: set[str] = field(default_factory=set, repr=False)  # every secret handled here

    @property
    def admin(self) -> tuple[tuple[str, str], ...]:
        return (("x-api-key", ADMIN_KEY),)

    def key(self, tier: int) -> str:
        api_key = create_key_with(self.gateway, tier, self.admin)
        self.secrets.update({api_key, api_key.split("_", 2)[2]})
        return api_key

    def token(self, api_key: str, ttl_s: int = 600) -> str:
        token = (
            auth_pb2_grpc.AuthServiceStub(self.auth)
            .IssueToken(auth_pb2.IssueTokenRequest(api_key=api_key, ttl_seconds=ttl_s), timeout=10)
            .token
        )
        self.secrets.add(token)
        return str(token)


def create_key_with(channel: grpc.Channel, tier: int, admin: Any) -> str:
    created = gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(owner="security", tier=tier),  # type: ignore[arg-type]
        metadata=admin,
        timeout=10,
    )
    return str(created.api_key)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    logs = tmp_path_factory.mktemp("security-logs")
    env = mesh_env(
        SPEECHMESH_AUTH_JWT_SECRET=JWT_SECRET,
        SPEECHMESH_AUTH_HASH_PEPPER=PEPPER,
        SPEECHMESH_GATEWAY_MAX_MESSAGE_BYTES=str(GATEWAY_MAX_MESSAGE),
        SPEECHMESH_GATEWAY_MAX_AUDIO_BYTES=str(GATEWAY_MAX_AUDIO),
        # Everything logged, access logs included: a leak at any level counts.
        **{f"SPEECHMESH_{s.upper()}_LOG_LEVEL": "DEBUG" for s in SERVICES},
        **{f"SPEECHMESH_{s.upper()}_ACCESS_LOG": "true" for s in SERVICES},
    )
    with Mesh(env=env, log_dir=logs, admin_key=ADMIN_KEY) as mesh:
        options = [("grpc.max_send_message_length", -1)]
        with (
            grpc.insecure_channel(mesh["gateway"].target, options=options) as gateway,
            grpc.insecure_channel(mesh["auth"].target, options=options) as auth,
        ):
            yield Secured(mesh, logs, gateway, auth, {ADMIN_KEY, JWT_SECRET, PEPPER})


def _refused(call: Any, code: grpc.StatusCode) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    clear_refusal(caught.value, {code})
    return caught.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: dict[str, Any], claims: dict[str, Any], key: bytes, digest: Any) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _claims(key_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": key_id,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": secrets.token_hex(8),
        "tier": "ADMIN",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


# --- secrets -----------------------------------------------------------------------------


def _redis_dump(url: str) -> bytes:
    """Every key and value in Redis, whatever its type, as one blob to search."""
    client = redis.Redis.from_url(url)
    out = []
    try:
        for key in client.scan_iter(count=1_000):
            out.append(key)
            kind = client.type(key).decode()
            if kind == "string":
                out.append(client.get(key) or b"")
            elif kind == "hash":
                for name, value in client.hgetall(key).items():
                    out += [name, value]
            elif kind == "list":
                out += client.lrange(key, 0, -1)
            elif kind == "set":
                out += list(client.smembers(key))
            elif kind == "zset":
                out += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
            elif kind == "stream":
                out += [repr(entry).encode() for entry in client.xrange(key)]
            else:
                out.append(client.dump(key) or b"")
    finally:
        client.close()
    return b"\n".join(out)


def test_no_secret_ever_reaches_logs_or_redis(
    secured: Secured, pytestconfig: pytest.Config
) -> None:
    """Keys, tokens, the admin key, the JWT secret and the pepper are used every way a
    caller can (success, refusal, revocation, forgery), then looked for, byte for byte, in
    every log line of every service and in all of Redis, its append-only file included."""
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    admin = gateway_pb2_grpc.AdminServiceStub(secured.gateway)
    auth = auth_pb2_grpc.AuthServiceStub(secured.auth)
    languages = gateway_pb2.ListLanguagesRequest()
    text = gateway_pb2.TranslateTextRequest(
        texts=["The secret is safe."], source_language="en", target_language="pt"
    )
    free, pro = secured.key(auth_pb2.TIER_FREE), secured.key(auth_pb2.TIER_PRO)
    elevated = secured.key(auth_pb2.TIER_ADMIN)
    token = secured.token(pro)
    for credential in (
        (("x-api-key", pro),),
        (("authorization", f"Bearer {token}"),),
        (("x-api-key", elevated),),
    ):
        public.ListLanguages(languages, metadata=credential, timeout=10)
        public.TranslateText(text, metadata=credential, timeout=30)
    admin.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=(("x-api-key", elevated),))
    auth.GetUsage(auth_pb2.GetUsageRequest(), metadata=(("x-api-key", pro),), timeout=10)
    auth.Authenticate(auth_pb2.AuthenticateRequest(api_key=pro, method="/x/y"), timeout=10)
    auth.Authenticate(auth_pb2.AuthenticateRequest(token=token, method="/x/y"), timeout=10)
    # Refusals: rate limit, a damaged key, a forged token, a non-admin at an admin RPC,
    # then a revoked key and its token.
    for _ in range(11):
        try:
            public.ListLanguages(languages, metadata=(("x-api-key", free),), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    damaged = pro[:-3] + ("aaa" if not pro.endswith("aaa") else "bbb")
    forged = _signed(
        {"alg": "HS256", "typ": "JWT"}, _claims(pro.split("_")[1]), b"guess", hashlib.sha256
    )
    secured.secrets.update({damaged, damaged.split("_", 2)[2], forged})
    for credential in (
        (("x-api-key", damaged),),
        (("authorization", f"Bearer {forged}"),),
        (("x-api-key", pro), ("authorization", f"Bearer {token}")),
    ):
        with pytest.raises(grpc.RpcError):
            public.ListLanguages(languages, metadata=credential, timeout=10)
    with pytest.raises(grpc.RpcError):
        admin.ListApiKeys(gateway_pb2.ListApiKeysRequest(), metadata=(("x-api-key", pro),))
    with pytest.raises(grpc.RpcError):
        auth.IssueToken(auth_pb2.IssueTokenRequest(api_key=damaged), timeout=10)
    admin.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(key_id=pro.split("_")[1]), metadata=secured.admin
    )
    for credential in ((("x-api-key", pro),), (("authorization", f"Bearer {token}"),)):
        with pytest.raises(grpc.RpcError):
            public.ListLanguages(languages, metadata=credential, timeout=10)
    # Each service has logged by now (access logs on): give the files a moment to flush.
    time.sleep(0.5)
    logs = {name: (secured.logs / f"{name}.log").read_bytes() for name in SERVICES}
    assert all(logs.values()), "a service wrote no log at all: the check would prove nothing"
    assert b"request_id" in logs["gateway"]
    stored = _redis_dump(secured.mesh.redis_url or "")
    assert secured.mesh.redis is not None
    aof = b"".join(
        path.read_bytes() for path in sorted(secured.mesh.redis.dir.rglob("*")) if path.is_file()
    )
    assert b"hash" in stored and aof, "Redis holds no key records: the check would prove nothing"
    say(
        pytestconfig,
        f"security: {len(secured.secrets)} secrets looked for in "
        f"{sum(map(len, logs.values())) / 1e3:.0f} kB of logs, {len(stored) / 1e3:.0f} kB of "
        f"Redis data and {len(aof) / 1e3:.0f} kB of append-only file",
    )
    for secret in sorted(secured.secrets):
        needle = secret.encode()
        for name, content in logs.items():
            assert needle not in content, f"a secret ({secret[:6]}...) is in the {name} log"
        assert needle not in stored, f"a secret ({secret[:6]}...) is stored in Redis"
        assert needle not in aof, f"a secret ({secret[:6]}...) is in Redis's append-only file"


# --- admin RPCs --------------------------------------------------------------------------


def test_admin_rpcs_refuse_every_non_admin_credential(secured: Secured) -> None:
    admin = gateway_pb2_grpc.AdminServiceStub(secured.gateway)
    auth = auth_pb2_grpc.AuthServiceStub(secured.auth)
    other = secured.key(auth_pb2.TIER_FREE).split("_")[1]
    for tier in (
        auth_pb2.TIER_FREE,
        auth_pb2.TIER_BASIC,
        auth_pb2.TIER_PRO,
        auth_pb2.TIER_ENTERPRISE,
    ):
        api_key = secured.key(tier)
        for credential in (
            (("x-api-key", api_key),),
            (("authorization", f"Bearer {secured.token(api_key)}"),),
        ):
            for name, request in ADMIN_RPCS.items():
                error = _refused(
                    lambda n=name, r=request, c=credential: getattr(admin, n)(
                        r, metadata=c, timeout=10
                    ),
                    PERMISSION_DENIED,
                )
                assert error_details(error)["ErrorInfo"].reason == "ADMIN_REQUIRED", name
            # auth's own admin RPCs, called directly
            for call in (
                lambda c=credential: auth.CreateApiKey(
                    auth_pb2.CreateApiKeyRequest(owner="x", tier=auth_pb2.TIER_ADMIN), metadata=c
                ),
                lambda c=credential: auth.RevokeApiKey(
                    auth_pb2.RevokeApiKeyRequest(key_id=other), metadata=c
                ),
                lambda c=credential: auth.ListApiKeys(auth_pb2.ListApiKeysRequest(), metadata=c),
                lambda c=credential: auth.GetUsage(
                    auth_pb2.GetUsageRequest(key_id=other), metadata=c
                ),
            ):
                _refused(call, PERMISSION_DENIED)
    for name, request in ADMIN_RPCS.items():  # no credential at all
        _refused(lambda n=name, r=request: getattr(admin, n)(r, timeout=10), UNAUTHENTICATED)
    # The other key is untouched, and an ADMIN-tier key may do it all.
    elevated = (("x-api-key", secured.key(auth_pb2.TIER_ADMIN)),)
    admin.GetMeshStatus(gateway_pb2.GetMeshStatusRequest(), metadata=elevated, timeout=10)
    listed = admin.ListApiKeys(gateway_pb2.ListApiKeysRequest(page_size=1000), metadata=elevated)
    assert not next(k for k in listed.keys if k.key_id == other).revoked
    # Revoked, an admin key is nobody: neither it nor its tokens get in.
    revoked_key = secured.key(auth_pb2.TIER_ADMIN)
    revoked_token = secured.token(revoked_key)
    admin.RevokeApiKey(
        gateway_pb2.RevokeApiKeyRequest(key_id=revoked_key.split("_")[1]), metadata=elevated
    )
    for credential in (
        (("x-api-key", revoked_key),),
        (("authorization", f"Bearer {revoked_token}"),),
    ):
        _refused(
            lambda c=credential: admin.GetMeshStatus(
                gateway_pb2.GetMeshStatusRequest(), metadata=c
            ),
            UNAUTHENTICATED,
        )


# --- JWTs --------------------------------------------------------------------------------


def test_forged_jwts_are_refused(secured: Secured) -> None:
    """`alg: none`, another key, another HMAC algorithm with the right key, an asymmetric
    algorithm named over an HMAC signature, tampered claims, wrong audience or issuer, not
    yet valid, expired, unknown subject: each is UNAUTHENTICATED, at the gateway (even for
    admin RPCs) and at auth's Authenticate."""
    elevated = secured.key(auth_pb2.TIER_ADMIN)
    pro = secured.key(auth_pb2.TIER_PRO)
    admin_id, pro_id = elevated.split("_")[1], pro.split("_")[1]
    real = secured.token(pro)
    secret = JWT_SECRET.encode()
    header, payload, signature = real.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    escalated = _b64(json.dumps({**claims, "sub": admin_id, "tier": "ADMIN"}).encode())
    past = int(time.time()) - 7_200
    forged = {
        "alg none": _unsigned({"alg": "none", "typ": "JWT"}, _claims(admin_id)),
        "alg None": _unsigned({"alg": "None"}, _claims(admin_id)),
        "alg none, signature kept": _unsigned({"alg": "none"}, claims)[:-1] + f".{signature}",
        "another key": _signed(
            {"alg": "HS256", "typ": "JWT"}, _claims(admin_id), b"not-the-key", hashlib.sha256
        ),
        "HS512 with the key": _signed({"alg": "HS512"}, _claims(admin_id), secret, hashlib.sha512),
        "HS384 with the key": _signed({"alg": "HS384"}, _claims(admin_id), secret, hashlib.sha384),
        "RS256 named, HMAC signed": _signed(
            {"alg": "RS256"}, _claims(admin_id), secret, hashlib.sha256
        ),
        "tampered claims": f"{header}.{escalated}.{signature}",
        "signature stripped": f"{header}.{payload}.",
        "wrong audience": jwt.encode(_claims(admin_id, aud="someone-else"), JWT_SECRET, "HS256"),
        "wrong issuer": jwt.encode(_claims(admin_id, iss="evil"), JWT_SECRET, "HS256"),
        "no expiry": jwt.encode(_claims(admin_id, exp=None), JWT_SECRET, "HS256"),
        "expired": jwt.encode(
            _claims(pro_id, iat=past, nbf=past, exp=past + 60), JWT_SECRET, "HS256"
        ),
        "not yet valid": jwt.encode(
            _claims(pro_id, nbf=int(time.time()) + 3_600), JWT_SECRET, "HS256"
        ),
        "unknown subject": jwt.encode(_claims("0123456789abcdef"), JWT_SECRET, "HS256"),
        "key id in jwk header": _signed(
            {"alg": "HS256", "jku": "http://127.0.0.1:1/keys", "kid": "x"},
            _claims(admin_id),
            b"attacker",
            hashlib.sha256,
        ),
    }
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    admin = gateway_pb2_grpc.AdminServiceStub(secured.gateway)
    auth = auth_pb2_grpc.AuthServiceStub(secured.auth)
    secured.secrets.update(forged.values())
    for name, token in forged.items():
        bearer = (("authorization", f"Bearer {token}"),)
        for call in (
            lambda b=bearer: public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=b),
            lambda b=bearer: admin.GetMeshStatus(gateway_pb2.GetMeshStatusRequest(), metadata=b),
            lambda t=token: auth.Authenticate(auth_pb2.AuthenticateRequest(token=t, method="/a/b")),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == UNAUTHENTICATED, (name, caught.value.details())  # type: ignore[attr-defined]
            reason = clear_refusal(caught.value, {UNAUTHENTICATED})
            assert reason in {"TOKEN_INVALID", "TOKEN_EXPIRED"}, (name, reason)
    # The control: the same mesh takes a token signed the one right way.
    public.ListLanguages(
        gateway_pb2.ListLanguagesRequest(), metadata=(("authorization", f"Bearer {real}"),)
    )
    right = jwt.encode(_claims(admin_id), JWT_SECRET, "HS256")
    admin.GetMeshStatus(
        gateway_pb2.GetMeshStatusRequest(), metadata=(("authorization", f"Bearer {right}"),)
    )


# --- sizes -------------------------------------------------------------------------------


def _wav_claiming(seconds: float, rate: int = 8_000) -> bytes:
    """A WAV header claiming `seconds` of 16-bit mono audio, followed by almost nothing."""
    data_bytes = min(int(seconds * rate * 2), 2**32 - 1)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    header = (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
    )
    return header + fmt + b"data" + struct.pack("<I", data_bytes) + b"\x00\x00" * 100


def test_oversize_messages_are_refused_before_allocation(
    secured: Secured, pytestconfig: pytest.Config
) -> None:
    """A message over a server's limit is refused RESOURCE_EXHAUSTED from its length prefix:
    the server's peak RSS does not grow by anything like the message. A WAV header's claim
    of hours of audio allocates nothing either."""
    user = (("x-api-key", secured.key(auth_pb2.TIER_ENTERPRISE)),)
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    size = 8 * GATEWAY_MAX_MESSAGE
    huge = gateway_pb2.TranscribeRequest(audio=asr_pb2.Audio(content=os.urandom(size)))
    for service in ("gateway", "asr", "auth", "mt"):
        pid = secured.mesh[service].pid
        before = peak_rss_bytes(pid)
        with grpc.insecure_channel(
            secured.mesh[service].target, options=[("grpc.max_send_message_length", -1)]
        ) as channel:
            method = {
                "gateway": "/speechmesh.gateway.v1.SpeechTranslationService/Transcribe",
                "asr": "/speechmesh.asr.v1.AsrService/Recognize",
                "auth": "/speechmesh.auth.v1.AuthService/Authenticate",
                "mt": "/speechmesh.mt.v1.MtService/Translate",
            }[service]
            payload = (
                huge.SerializeToString()
                if service in ("gateway", "asr")
                else (
                    b"\x0a" + _varint(size) + b"x" * size  # one huge string field 1
                )
            )
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method)(payload, metadata=user, timeout=30)
            elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value.details()  # type: ignore[attr-defined]
        grew = peak_rss_bytes(pid) - before
        code = caught.value.code().name  # type: ignore[attr-defined]
        say(
            pytestconfig,
            f"security: {size / 2**20:.0f} MiB message to {service}: {code} in "
            f"{elapsed * 1000:.0f} ms, peak RSS +{grew / 2**20:.1f} MiB",
        )
        assert grew < size / 4, f"{service}'s peak RSS grew {grew / 2**20:.0f} MiB"
    # The servers are fine afterwards.
    public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=user, timeout=10)
    # A header claiming 70 hours of audio (over 4 GiB) allocates nothing for the claim: the
    # decoder sizes by the bytes actually there.
    before = peak_rss_bytes(secured.mesh["asr"].pid)
    try:
        public.Transcribe(
            gateway_pb2.TranscribeRequest(audio=asr_pb2.Audio(content=_wav_claiming(70 * 3600))),
            metadata=user,
            timeout=30,
        )
    except grpc.RpcError as error:
        clear_refusal(error, {grpc.StatusCode.INVALID_ARGUMENT})
    assert peak_rss_bytes(secured.mesh["asr"].pid) - before < 64 * 2**20


def test_oversize_metadata_is_refused_cleanly(secured: Secured) -> None:
    """A credential header far over gRPC's metadata limit is refused, not crashed on."""
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    for header in ("x-api-key", "authorization", "x-request-id"):
        with pytest.raises(grpc.RpcError) as caught:
            public.ListLanguages(
                gateway_pb2.ListLanguagesRequest(), metadata=((header, "k" * 64_000),), timeout=10
            )
        assert caught.value.code() in {  # type: ignore[attr-defined]
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNAUTHENTICATED,
        }, caught.value.details()  # type: ignore[attr-defined]
    user = (("x-api-key", secured.key(auth_pb2.TIER_PRO)),)
    public.ListLanguages(gateway_pb2.ListLanguagesRequest(), metadata=user, timeout=10)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _requests_seen_by_asr(mesh: Mesh) -> float:
    url = f"http://127.0.0.1:{mesh['asr'].metrics_port}/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="Recognize"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_audio_over_the_gateway_limit_is_refused_at_the_edge(secured: Secured) -> None:
    user = (("x-api-key", secured.key(auth_pb2.TIER_ENTERPRISE)),)
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    seen = _requests_seen_by_asr(secured.mesh)
    error = _refused(
        lambda: public.Transcribe(
            gateway_pb2.TranscribeRequest(
                audio=asr_pb2.Audio(content=b"\x00" * (GATEWAY_MAX_AUDIO + 1))
            ),
            metadata=user,
            timeout=30,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert error_details(error)["BadRequest"].field_violations[0].field == "audio.content"
    assert _requests_seen_by_asr(secured.mesh) == seen, "asr was sent audio over the limit"


# --- breakers ----------------------------------------------------------------------------


def _asr_breaker(secured: Secured) -> int:
    status = gateway_pb2_grpc.AdminServiceStub(secured.gateway).GetMeshStatus(
        gateway_pb2.GetMeshStatusRequest(), metadata=secured.admin, timeout=10
    )
    return next(d.breaker for d in status.downstreams if d.name == "asr")


def test_a_callers_bad_audio_never_opens_a_breaker(secured: Secured) -> None:
    user = (("x-api-key", secured.key(auth_pb2.TIER_ENTERPRISE)),)
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    for index in range(12):
        _refused(
            lambda i=index: public.Transcribe(
                gateway_pb2.TranscribeRequest(audio=asr_pb2.Audio(content=b"junk%d" % i)),
                metadata=user,
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    assert _asr_breaker(secured) == gateway_pb2.BREAKER_STATE_CLOSED


def test_a_callers_bad_stream_config_never_opens_a_breaker(secured: Secured) -> None:
    user = (("x-api-key", secured.key(auth_pb2.TIER_ENTERPRISE)),)
    bystander = (("x-api-key", secured.key(auth_pb2.TIER_ENTERPRISE)),)
    public = gateway_pb2_grpc.SpeechTranslationServiceStub(secured.gateway)
    config = asr_pb2.StreamingRecognitionConfig(
        sample_rate_hertz=16_000, silence_duration=duration_pb2.Duration(seconds=2**62)
    )
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1_600, np.float32), 16_000, format="WAV", subtype="PCM_16")
    try:
        for _ in range(8):
            with pytest.raises(grpc.RpcError):
                list(
                    public.StreamingTranscribe(
                        iter([gateway_pb2.StreamingTranscribeRequest(config=config)]),
                        metadata=user,
                        timeout=10,
                    )
                )
        assert _asr_breaker(secured) == gateway_pb2.BREAKER_STATE_CLOSED
        public.Transcribe(
            gateway_pb2.TranscribeRequest(audio=asr_pb2.Audio(content=buffer.getvalue())),
            metadata=bystander,
            timeout=30,
        )
    finally:
        gateway_pb2_grpc.AdminServiceStub(secured.gateway).ResetCircuitBreakers(
            gateway_pb2.ResetCircuitBreakersRequest(), metadata=secured.admin, timeout=10
        )
