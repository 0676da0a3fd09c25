"""HTTPRoute (GAMMA, parentRef kind Service) -> route entries: path, header, query and method
matches; the shared parts (filters, backends, timeouts, retry) are in `_routes.py`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import re2

from nodemesh.controlplane.builder._routes import RouteModel, header_text, read_route
from nodemesh.controlplane.builder._util import Problems, as_list, as_map
from nodemesh.controlplane.builder.service import ServiceModel
from nodemesh.xds.bootstrap import RE2_MAX_PROGRAM_SIZE
from nodemesh.xds.translate import ir

__all__ = ["first_of_each_name", "parse_regex", "read_httproute"]

_Named = TypeVar("_Named", ir.HeaderMatch, ir.QueryMatch)

_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


# Envoy compiles every regular expression with Google's RE2 (its default options, errors not
# logged), so the same library says here what Envoy would refuse. Python's `re` said it
# wrongly both ways: it took lookarounds and backreferences, whose NACK held back every route
# change in the mesh, and refused `(?i)` after the leading `/`, `\pL` and `\z`.
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


def parse_regex(value: str, path: str, p: Problems) -> str:
    """A regular expression a node Envoy takes: RE2 syntax, and a compiled program no larger
    than the limit the bootstrap sets. Otherwise a problem at `path`."""
    try:
        size = re2.compile(value, _RE2_OPTIONS).programsize
    except re2.error as exc:
        why = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        p.add(path, f"invalid regular expression {value!r} (RE2 syntax): {why}")
        return value
    if size > RE2_MAX_PROGRAM_SIZE:
        p.add(
            path,
            f"regular expression {value!r} is too large: its RE2 program size is {size}, "
            f"over the {RE2_MAX_PROGRAM_SIZE} the node Envoys take",
        )
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
    elif kind == "PathPrefix" and ("?" in value or "#" in value):
        # Envoy's path_separated_prefix refuses them (Gateway API's characters leave them out).
        p.add(f"{path}.path.value", f"a PathPrefix cannot contain '?' or '#', got {value!r}")
    else:
        # Gateway API's rules (files mode has no schema to apply them): `//` became the
        # prefix `/`, which matches every request.
        bad = [part for part in _PATH_FORBIDDEN if part in value]
        bad += [end for end in ("/..", "/.") if value.endswith(end)]
        if bad:
            p.add(f"{path}.path.value", f"must not contain {bad[0]!r}, got {value!r}")
    headers = []
    for i, h in enumerate(as_list(m.get("headers"))):
        h = as_map(h)
        hk = _kind(
            h.get("type", "Exact"), ("Exact", "RegularExpression"), f"{path}.headers[{i}].type", p
        )
        if not h.get("name"):
            p.add(f"{path}.headers[{i}].name", "required")
        header_text(str(h.get("name", "")), f"{path}.headers[{i}].name", p)
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
        elif len(str(q["name"])) > 256:  # Gateway API's limit; Envoy refuses above 1024 bytes
            p.add(f"{path}.queryParams[{i}].name", "longer than 256 characters")
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
