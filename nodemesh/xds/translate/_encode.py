"""Protobuf wire-format helpers for the resources the translator encodes by hand (endpoints,
route configurations). Field numbers come from the generated descriptors."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LEN", "VARINT", "strings", "tag", "varint"]

VARINT, LEN = 0, 2  # wire types
_BYTE = [bytes((i,)) for i in range(0x80)]


def tag(message: type, field: str, wire_type: int) -> bytes:
    number = message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]
    return varint((number << 3) | wire_type)


def varint(value: int) -> bytes:
    if value < 0x80:
        return _BYTE[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def strings(tag_bytes: bytes, values: Iterable[str]) -> list[bytes]:
    """The pieces (tag, length, bytes) of a repeated string field, to be joined."""
    out: list[bytes] = []
    for v in values:
        b = v.encode()
        n = len(b)
        out += (tag_bytes, _BYTE[n] if n < 0x80 else varint(n), b)
    return out
