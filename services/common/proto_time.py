"""google.protobuf Duration from seconds, the way every service reports times."""

from __future__ import annotations

from google.protobuf import duration_pb2


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value
