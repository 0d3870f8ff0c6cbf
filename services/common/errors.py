"""Domain errors that carry their own gRPC status and `google.rpc` details.

Services raise these; the error interceptor turns them into a status with a
`grpc-status-details-bin` trailer (ErrorInfo always, plus BadRequest, RetryInfo or
QuotaFailure where they apply). Anything else that escapes a handler becomes INTERNAL
with no internals in the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "speechmesh"
# A status travels in HTTP/2 headers, and clients refuse more than 8 KiB of them: refusals
# repeat a caller's value only in part, so a huge value cannot turn into RESOURCE_EXHAUSTED.
MAX_ECHO_CHARS = 64
MAX_MESSAGE_CHARS = 1024
MAX_VIOLATION_CHARS = 256
MAX_VIOLATIONS = 10


def shown(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """A caller's value for an error message: quoted, and cut short when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class ServiceError(Exception):
    """Base of every error a handler may raise on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, reason: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        message = _clipped(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = {k: _clipped(v, MAX_ECHO_CHARS) for k, v in (metadata or {}).items()}

    def extra_details(self) -> list[object]:
        """Details beyond ErrorInfo; subclasses add theirs."""
        return []

    def to_status(self) -> grpc.Status:
        details = [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata
            ),
            *self.extra_details(),
        ]
        packed = []
        for detail in details:
            item = any_pb2.Any()
            item.Pack(detail)  # type: ignore[arg-type]
            packed.append(item)
        return rpc_status.to_status(
            status_pb2.Status(
                code=getattr(code_pb2, self.code.name), message=self.message, details=packed
            )
        )


class InvalidArgument(ServiceError):
    """The request itself is wrong; retrying it unchanged cannot succeed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        violations: Iterable[FieldViolation] = (),
        *,
        reason: str = "INVALID_ARGUMENT",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = list(violations)[:MAX_VIOLATIONS]

    @classmethod
    def field(
        cls, field: str, description: str, *, reason: str = "INVALID_ARGUMENT"
    ) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)], reason=reason)

    def extra_details(self) -> list[object]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=_clipped(v.description, MAX_VIOLATION_CHARS)
                    )
                    for v in self.violations
                ]
            )
        ]


class NotFound(ServiceError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ServiceError):
    """No credential, or one that is unknown, revoked, expired or forged."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServiceError):
    """The system is not in a state where this can be done."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class _RetryableError(ServiceError):
    def __init__(
        self,
        message: str,
        *,
        reason: str,
        retry_after_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s

    def extra_details(self) -> list[object]:
        if self.retry_after_s is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(self.retry_after_s * 1e9)))
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Unavailable(_RetryableError):
    """A dependency is down; the same call may succeed after retry_after_s."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(_RetryableError):
    """A limit was hit: a rate limit, a quota, or a full queue."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        retry_after_s: float | None = None,
        violations: Iterable[QuotaViolation] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, retry_after_s=retry_after_s, metadata=metadata)
        self.violations = list(violations)

    def extra_details(self) -> list[object]:
        details = super().extra_details()
        if self.violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(
                            subject=v.subject, description=v.description
                        )
                        for v in self.violations
                    ]
                )
            )
        return details


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the work could finish."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DownstreamError(ServiceError):
    """A downstream service's refusal, returned to our caller as it came: same code, same
    message and the same google.rpc details (a BadRequest from asr stays a BadRequest)."""

    _STATUS_DETAILS_KEY = "grpc-status-details-bin"

    def __init__(self, source: str, error: grpc.aio.AioRpcError) -> None:
        super().__init__(error.details() or "", reason=f"{source.upper()}_ERROR")
        self.source = source
        self.code = error.code()
        trailing: Any = error.trailing_metadata() or ()
        self._trailing = tuple((k, v) for k, v in trailing if k == self._STATUS_DETAILS_KEY)
        if not self._trailing:  # a plain status: give it ErrorInfo like any other refusal
            self._trailing = tuple(super().to_status().trailing_metadata)

    def to_status(self) -> grpc.Status:
        return _Status(self.code, self.message, self._trailing)


@dataclass(frozen=True)
class _Status(grpc.Status):  # type: ignore[misc]
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def internal_status(request_id: str) -> grpc.Status:
    """The status for an unexpected error: nothing internal, only what support needs."""
    info = error_details_pb2.ErrorInfo(
        reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
    )
    item = any_pb2.Any()
    item.Pack(info)
    return rpc_status.to_status(
        status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error (request id {request_id})",
            details=[item],
        )
    )
