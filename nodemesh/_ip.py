"""IP address checks on the hot path of big builds (100,000 endpoint addresses): a fast path
for what nearly every address is, a canonical IPv4 dotted quad, with `ipaddress` deciding the
rest (it is ~10 us a call)."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

__all__ = ["all_dotted_quads", "ip_version", "is_dotted_quad"]


# One octet: 0-255 in ASCII digits, no leading zero ([0-9], not \d, which takes any Unicode
# digit).
_OCTET = "(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
# The same octets for many quads: tried longest first and never backtracked into (an atomic
# group; an octet is always followed by a non-digit there), which halves the regex's work.
_ATOMIC_OCTET = "(?>25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_ATOMIC_QUAD = rf"{_ATOMIC_OCTET}(?:\.{_ATOMIC_OCTET}){{3}}"
_DOTTED_QUADS = re.compile(rf"{_ATOMIC_QUAD}(?:\n{_ATOMIC_QUAD})*")


def is_dotted_quad(text: str) -> bool:
    """A canonical IPv4 dotted quad: four ASCII decimal parts, none above 255, no leading
    zero. Exactly the strings `ipaddress.IPv4Address` accepts in that shape."""
    return _DOTTED_QUAD.fullmatch(text) is not None


def all_dotted_quads(values: list[Any]) -> bool:
    """Whether every value is a str (not a subclass) and `is_dotted_quad`. One regex pass over
    them joined by newlines instead of a call per value (an EndpointSlice's addresses): exactly
    len - 1 newlines means none came from inside a value."""
    if not values:
        return True
    if set(map(type, values)) != _ONLY_STR:
        return False
    joined = "\n".join(values)
    return joined.count("\n") == len(values) - 1 and _DOTTED_QUADS.fullmatch(joined) is not None


_ONLY_STR = {str}


def ip_version(text: str) -> int:
    """4 or 6, or 0 for what is not an IP address."""
    if is_dotted_quad(text):
        return 4
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0
