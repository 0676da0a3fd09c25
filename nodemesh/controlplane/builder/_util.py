"""Helpers for reading user objects defensively and collecting precise errors."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Problems",
    "as_list",
    "as_map",
    "creation",
    "generation",
    "parse_duration",
]

_DURATION = re.compile(r"^(?:[0-9]{1,5}(?:h|m|s|ms)){1,4}$")
_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}


class Problems(list[str]):
    """Error messages collected while reading one object."""

    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}")


def as_map(value: Any) -> Mapping[str, Any]:
    if type(value) is dict:  # the common case, without the slow ABC instance check
        return value
    return value if isinstance(value, Mapping) else {}


def as_list(value: Any) -> Sequence[Any]:
    return value if isinstance(value, list) else []


def generation(obj: Mapping[str, Any]) -> int:
    g = as_map(obj.get("metadata")).get("generation", 0)
    return g if isinstance(g, int) else 0


def creation(obj: Mapping[str, Any]) -> str:
    return str(as_map(obj.get("metadata")).get("creationTimestamp", ""))


def parse_duration(value: Any, path: str, problems: Problems) -> int | None:
    """A Gateway API duration ("1h2m3s", "250ms") in milliseconds; None (and a problem) if bad."""
    if value is None:
        return None
    if not isinstance(value, str) or not _DURATION.match(value):
        problems.add(path, f"invalid duration {value!r} (expected e.g. 250ms, 1s, 1m30s)")
        return None
    return sum(int(n) * _UNIT_MS[unit] for n, unit in _PART.findall(value))


def int_in(value: Any, path: str, problems: Problems, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        problems.add(path, f"must be an integer in [{lo}, {hi}], got {value!r}")
        return None
    return value
