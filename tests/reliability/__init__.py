"""Reliability tests: fuzzing, security checks and fault injection, each against the whole
mesh (redis, auth, asr, mt and gateway as real processes, real models). Helpers they share
live here; each module starts its own mesh (they need different settings)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from services.common.testing import error_details
from speechmesh.auth.v1 import auth_pb2
from speechmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tools.mesh import Mesh

ADMIN_KEY = "dev-admin-key"
ADMIN = (("x-api-key", ADMIN_KEY),)
SERVICES = ("auth", "asr", "mt", "gateway")
ERROR_DOMAIN = "speechmesh"

# English-only Whisper tiny: the mesh starts in seconds and decodes fast on two cores.
QUICK_MODELS = {
    "SPEECHMESH_ASR_MODELS": '["whisper-tiny.en-int8"]',
    "SPEECHMESH_ASR_DEFAULT_MODEL": "whisper-tiny.en-int8",
}


def mesh_env(**extra: str) -> dict[str, str]:
    """Settings every reliability mesh shares: quick models, quiet logs."""
    return {
        **QUICK_MODELS,
        **{f"SPEECHMESH_{s.upper()}_ACCESS_LOG": "false" for s in SERVICES},
        **extra,
    }


@contextlib.contextmanager
def running_mesh(env: dict[str, str], log_dir: Path) -> Iterator[Mesh]:
    log_dir.mkdir(parents=True, exist_ok=True)
    with Mesh(env=env, log_dir=log_dir) as mesh:
        yield mesh


def create_key(channel: grpc.Channel, tier: int, owner: str = "reliability") -> str:
    """A new API key, created through the gateway's AdminService with the bootstrap key."""
    created = gateway_pb2_grpc.AdminServiceStub(channel).CreateApiKey(
        gateway_pb2.CreateApiKeyRequest(owner=owner, tier=tier),  # type: ignore[arg-type]
        metadata=ADMIN,
        timeout=10,
    )
    return str(created.api_key)


def admin_tier_key(channel: grpc.Channel) -> tuple[tuple[str, str], ...]:
    """Metadata with a stored ADMIN-tier key: unlimited, yet checked by auth's Lua script."""
    return (("x-api-key", create_key(channel, auth_pb2.TIER_ADMIN)),)


def rss_bytes(mesh: Mesh) -> dict[str, int]:
    return {name: psutil.Process(mesh[name].pid).memory_info().rss for name in SERVICES}


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM) since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def say(config: pytest.Config, line: str) -> None:
    """Writes a line to the terminal even when pytest captures output (figures to keep)."""
    reporter: Any = config.pluginmanager.getplugin("terminalreporter")
    capture: Any = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capture is None:  # pragma: no cover - plugins turned off
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


def clear_refusal(error: grpc.RpcError, allowed: Iterable[grpc.StatusCode]) -> str:
    """Asserts `error` is a refusal the caller can act on: one of `allowed`, a message,
    ErrorInfo (domain speechmesh, a reason), and BadRequest field violations when the
    request was invalid. Returns the reason."""
    call: Any = error
    code = call.code()
    assert code in set(allowed), f"{code.name}: {call.details()}"
    assert call.details(), f"{code.name} without a message"
    details = error_details(call)
    info = details.get("ErrorInfo")
    assert info is not None, f"{code.name} {call.details()!r} carries no ErrorInfo"
    assert info.domain == ERROR_DOMAIN and info.reason, info
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad_request = details.get("BadRequest")
        assert bad_request is not None and bad_request.field_violations, (
            f"INVALID_ARGUMENT {call.details()!r} names no field"
        )
    return str(info.reason)
