"""Protobuf wire-format helpers for the resources the translator encodes by hand (endpoints,
route configurations). Field numbers come from the generated descriptors."""

from __future__ import annotations

from collections.abc import Iterable

from nodemesh.xds._wire import SMALL_LIMIT, SMALL_VARINTS, varint

__all__ = ["LEN", "VARINT", "strings", "strings_bytes", "tag", "varint"]

VARINT, LEN = 0, 2  # wire types


def tag(message: type, field: str, wire_type: int) -> bytes:
    number = message.DESCRIPTOR.fields_by_name[field].number  # type: ignore[attr-defined]
    return varint((number << 3) | wire_type)


def strings(tag_bytes: bytes, values: Iterable[str]) -> list[bytes]:
    """The pieces (tag, length, bytes) of a repeated string field, to be joined."""
    out: list[bytes] = []
    for v in values:
        b = v.encode()
        n = len(b)
        out += (tag_bytes, SMALL_VARINTS[n] if n < SMALL_LIMIT else varint(n), b)
    return out


def strings_bytes(tag_bytes: bytes, values: Iterable[str]) -> bytes:
    """`b"".join(strings(tag_bytes, values))`. When the tag is one byte and every value is ASCII
    and shorter than 128 characters (host names, most of what is encoded), every piece is one
    character per byte: the pieces are joined as text and encoded once."""
    if len(tag_bytes) == 1 and tag_bytes[0] < 0x80:
        t = chr(tag_bytes[0])
        out: list[str] = []
        try:
            for v in values:
                out += (t, chr(len(v)), v)
        except ValueError:  # chr() of a length beyond Unicode: not the fast case
            pass
        else:
            text = "".join(out)
            # ASCII also means every chr(length) was below 128, a one-byte varint.
            if text.isascii():
                return text.encode()
    return b"".join(strings(tag_bytes, values))
