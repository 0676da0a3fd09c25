"""HTTPRoute (GAMMA, parentRef kind Service) -> route entries: path, header, query and method
matches; the shared parts (filters, backends, timeouts, retry) are in `_routes.py`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, TypeVar

from nodemesh.controlplane.builder._routes import RouteModel, read_route
from nodemesh.controlplane.builder._util import Problems, as_list, as_map
from nodemesh.controlplane.builder.service import ServiceModel
from nodemesh.xds.translate import ir

__all__ = ["first_of_each_name", "parse_regex", "read_httproute"]

_Named = TypeVar("_Named", ir.HeaderMatch, ir.QueryMatch)

_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def parse_regex(value: str, path: str, p: Problems) -> str:
    """A regular expression that Python can compile (RE2 is stricter; Envoy reports the rest)."""
    try:
        re.compile(value)
    except re.error as exc:
        p.add(path, f"invalid regular expression {value!r}: {exc}")
    return value


def _kind(value: Any, allowed: tuple[str, ...], path: str, p: Problems) -> str:
    if value not in allowed:
        p.add(path, f"unsupported value {value!r}; allowed: {', '.join(allowed)}")
        return allowed[0]
    return str(value)


def first_of_each_name(matches: list[_Named]) -> list[_Named]:
    """Gateway API: of entries with equivalent names only the first counts; later ones are
    ignored (not ANDed: two values for one header would match no request). Names must
    already be in the form they compare in (header names lower-cased)."""
    seen: set[str] = set()
    out = []
    for m in matches:
        if m.name not in seen:
            seen.add(m.name)
            out.append(m)
    return out


def _precedence(m: ir.RouteMatch) -> tuple[Any, ...]:
    """Gateway API's HTTPRoute order: Exact, RegularExpression, then PathPrefix paths, longer
    first; then a method match; then more header matches; then more query matches."""
    rank = {"Exact": 0, "RegularExpression": 1, "PathPrefix": 2}[m.path.kind]
    path = m.path.value
    if m.path.kind == "PathPrefix":
        # As translate matches it: "/api/" is "/api", so it must not outrank "/api" + a method.
        path = path.rstrip("/")
    return (rank, -len(path), 0 if m.method else 1, -len(m.headers), -len(m.query))


def parse_http_match(
    m: Mapping[str, Any], path: str, p: Problems
) -> tuple[ir.RouteMatch, tuple[Any, ...]]:
    pm = as_map(m.get("path")) or {"type": "PathPrefix", "value": "/"}
    kind = _kind(
        pm.get("type", "PathPrefix"),
        ("PathPrefix", "Exact", "RegularExpression"),
        f"{path}.path.type",
        p,
    )
    value = str(pm.get("value", "/"))
    if kind == "RegularExpression":
        parse_regex(value, f"{path}.path.value", p)
    elif not value.startswith("/"):
        p.add(f"{path}.path.value", f"must start with '/', got {value!r}")
    headers = []
    for i, h in enumerate(as_list(m.get("headers"))):
        h = as_map(h)
        hk = _kind(
            h.get("type", "Exact"), ("Exact", "RegularExpression"), f"{path}.headers[{i}].type", p
        )
        if not h.get("name"):
            p.add(f"{path}.headers[{i}].name", "required")
        if hk == "RegularExpression":
            parse_regex(str(h.get("value", "")), f"{path}.headers[{i}].value", p)
        headers.append(ir.HeaderMatch(str(h.get("name", "")).lower(), str(h.get("value", "")), hk))  # type: ignore[arg-type]
    query: list[ir.QueryMatch] = []
    for i, q in enumerate(as_list(m.get("queryParams"))):
        q = as_map(q)
        qk = _kind(
            q.get("type", "Exact"),
            ("Exact", "RegularExpression"),
            f"{path}.queryParams[{i}].type",
            p,
        )
        if not q.get("name"):
            p.add(f"{path}.queryParams[{i}].name", "required")
        if qk == "RegularExpression":
            parse_regex(str(q.get("value", "")), f"{path}.queryParams[{i}].value", p)
        query.append(ir.QueryMatch(str(q.get("name", "")), str(q.get("value", "")), qk))  # type: ignore[arg-type]
    # Query param names compare exactly (case-sensitive), header names were lower-cased above.
    headers, query = first_of_each_name(headers), first_of_each_name(query)
    method = m.get("method", "")
    if method and method not in _METHODS:
        p.add(f"{path}.method", f"unsupported value {method!r}")
    match = ir.RouteMatch(
        path=ir.PathMatch(kind, value),  # type: ignore[arg-type]
        headers=tuple(headers),
        query=tuple(query),
        method=str(method),
    )
    return match, _precedence(match)


def read_httproute(
    obj: Mapping[str, Any], services: Mapping[tuple[str, str], ServiceModel]
) -> RouteModel:
    return read_route(obj, "HTTPRoute", services, parse_http_match, True)
