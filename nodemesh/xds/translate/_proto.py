"""Small constructors shared by the translate modules (durations, percentages, Any packing)."""

from __future__ import annotations

from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

__all__ = ["any_of", "duration", "fraction", "uint32"]


def duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=ms // 1000, nanos=(ms % 1000) * 1_000_000)


def uint32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def fraction(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage with four decimals of precision (per million)."""
    if percent == int(percent):
        return percent_pb2.FractionalPercent(
            numerator=int(percent), denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    return percent_pb2.FractionalPercent(
        numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def any_of(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
