"""Kubernetes label selectors in their string form (what `kubectl get -l` takes), for choosing
the Nodes that run nodemesh (`--node-selector`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["LabelSelector"]

_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?)*"
_KEY = rf"(?:{_PREFIX}/)?{_NAME}"
_VALUE = rf"(?:{_NAME})?"
_EXISTS = re.compile(rf"\s*(!?)\s*({_KEY})\s*")
_EQUALS = re.compile(rf"\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*")
_SET = re.compile(rf"\s*({_KEY})\s+(in|notin)\s*\(([^()]*)\)\s*")
_VALUE_ONLY = re.compile(_VALUE)

Test = Callable[[Mapping[str, Any]], bool]


class LabelSelector:
    """Requirements joined by commas, all of which must hold: `key=value` (or `==`),
    `key!=value` (true without the label too), `key`, `!key`, `key in (a,b)`, `key notin (a,b)`
    (true without the label too). The empty selector matches everything.

    >>> LabelSelector("nodemesh.io/node=true,!node-role.kubernetes.io/control-plane").matches(
    ...     {"nodemesh.io/node": "true"})
    True
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self._tests: list[Test] = []
        problems: list[str] = []
        for part in _split(text):
            test = _requirement(part)
            if test is None:
                problems.append(repr(part.strip()))
            else:
                self._tests.append(test)
        if problems:
            raise ValueError(f"label selector {text!r}: cannot read {', '.join(problems)}")

    def matches(self, labels: Mapping[str, Any]) -> bool:
        return all(test(labels) for test in self._tests)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSelector) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"LabelSelector({self.text!r})"


def _split(text: str) -> list[str]:
    """The requirements: commas inside `( )` separate values, not requirements."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    if len(parts) == 1 and not parts[0].strip():
        return []  # the empty selector
    return parts


def _requirement(part: str) -> Test | None:
    m = _EQUALS.fullmatch(part)
    if m is not None:
        key, op, value = m.groups()
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    m = _SET.fullmatch(part)
    if m is not None:
        key, op, listed = m.groups()
        # "()" is the set of the empty value, as kubectl reads it: `zone in ()` holds for a
        # label `zone: ""` only (apimachinery's labels parser, "handles \"()\"")
        values = frozenset(v.strip() for v in listed.split(","))
        if not all(_VALUE_ONLY.fullmatch(v) for v in values):
            return None
        if op == "notin":
            return lambda labels: labels.get(key) not in values
        return lambda labels: labels.get(key) in values
    m = _EXISTS.fullmatch(part)
    if m is not None:
        negated, key = m.groups()
        if negated:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    return None
