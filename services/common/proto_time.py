"""google.protobuf Duration to and from seconds, the way every service handles times."""

from __future__ import annotations

from google.protobuf import duration_pb2


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def seconds(value: duration_pb2.Duration) -> float:
    """A caller's Duration in seconds. Not ToTimedelta(): any int64 of seconds is a valid
    Duration on the wire, and timedelta overflows far below that."""
    return value.seconds + value.nanos / 1e9
