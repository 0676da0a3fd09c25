"""IP address checks on the hot path of big builds (100,000 endpoint addresses): a fast path
for what nearly every address is, a canonical IPv4 dotted quad, with `ipaddress` deciding the
rest (it is ~10 us a call)."""

from __future__ import annotations

import ipaddress

__all__ = ["ip_version", "is_dotted_quad"]


def is_dotted_quad(text: str) -> bool:
    """A canonical IPv4 dotted quad: four ASCII decimal parts, none above 255, no leading
    zero. Exactly the strings `ipaddress.IPv4Address` accepts in that shape."""
    parts = text.split(".")
    return len(parts) == 4 and all(
        p.isdigit() and p.isascii() and (p == "0" or p[0] != "0") and int(p) < 256 for p in parts
    )


def ip_version(text: str) -> int:
    """4 or 6, or 0 for what is not an IP address."""
    if is_dotted_quad(text):
        return 4
    try:
        return ipaddress.ip_address(text).version
    except ValueError:
        return 0
