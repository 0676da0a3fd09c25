"""GRPCRoute (GAMMA) -> route entries. A method match becomes a path match on
"/package.Service/Method"; every match also requires a gRPC content type."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodemesh.controlplane.builder._routes import RouteModel, header_text, read_route
from nodemesh.controlplane.builder._util import Problems, as_list, as_map
from nodemesh.controlplane.builder.httproute import first_of_each_name, parse_regex
from nodemesh.controlplane.builder.service import ServiceModel
from nodemesh.xds.translate import ir

__all__ = ["read_grpcroute"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z_0-9.]*$")


def _part(expr: str) -> str:
    """`expr` as one part of the path expression (`/service/method`), which Envoy matches
    whole, so each part is matched whole already. Its anchors (`^`, `$`, `\\A`, `\\z`) are
    dropped: in the path they would anchor to the path's ends, and `^pkg\\.Svc$` never
    matched `/pkg.Svc/Get`. Escapes and character classes (`[^/]`) are kept as written."""
    out: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c == "\\":
            pair = expr[i : i + 2]
            if pair == "\\Q":  # literal text up to `\E`
                end = expr.find("\\E", i + 2)
                end = n if end < 0 else end + 2
                out.append(expr[i:end])
                i = end
                continue
            if pair not in ("\\A", "\\z"):
                out.append(pair)
            i += 2
        elif c == "[":
            # to the class's end: a `]` right after `[` or `[^` is a member, not the end
            j = i + 1
            if j < n and expr[j] == "^":
                j += 1
            if j < n and expr[j] == "]":
                j += 1
            while j < n and expr[j] != "]":
                j += 2 if expr[j] == "\\" else 1
            out.append(expr[i : j + 1])
            i = j + 1
        else:
            if c not in "^$":
                out.append(c)
            i += 1
    return "".join(out)


def parse_grpc_match(
    m: Mapping[str, Any], path: str, p: Problems
) -> tuple[ir.RouteMatch, tuple[Any, ...]]:
    """The match and its precedence: Gateway API orders GRPCRoute rules by the characters of
    a matching non-wildcard service, then of a non-wildcard method, then by more header
    matches. A RegularExpression service or method is a wildcard: it counts 0 characters."""
    method = as_map(m.get("method"))
    kind = method.get("type", "Exact")
    svc, meth = str(method.get("service", "")), str(method.get("method", ""))
    literal = kind == "Exact"
    if kind == "Exact" and svc.startswith("."):
        # Gateway API takes protobuf's fully-qualified form, `.pkg.Svc`; a request's path
        # has no leading dot (`/pkg.Svc/Get`), so the route could never match with it.
        svc = svc[1:]
    if kind == "Exact":
        for field, value in (("service", svc), ("method", meth)):
            if value and not _NAME.match(value):
                p.add(f"{path}.method.{field}", f"invalid gRPC name {value!r}")
        if svc and meth:
            pm = ir.PathMatch("Exact", f"/{svc}/{meth}")
        elif svc:
            pm = ir.PathMatch("PathPrefix", f"/{svc}")
        elif meth:
            pm = ir.PathMatch("RegularExpression", f"/[^/]+/{re.escape(meth)}")
        else:
            pm = ir.PathMatch("PathPrefix", "/")
    elif kind == "RegularExpression":
        # Grouped: the whole path is matched, so a bare "pkg.Foo|pkg.Bar" would split it.
        before = len(p)
        s = f"(?:{_part(parse_regex(svc, f'{path}.method.service', p))})" if svc else "[^/]+"
        mm = f"(?:{_part(parse_regex(meth, f'{path}.method.method', p))})" if meth else "[^/]+"
        pm = ir.PathMatch("RegularExpression", f"/{s}/{mm}")
        if len(p) == before:  # Envoy compiles the two as one path expression: its size counts
            parse_regex(pm.value, f"{path}.method", p)
    else:
        p.add(
            f"{path}.method.type", f"unsupported value {kind!r}; allowed: Exact, RegularExpression"
        )
        pm = ir.PathMatch("PathPrefix", "/")
    headers = []
    for i, h in enumerate(as_list(m.get("headers"))):
        h = as_map(h)
        hk = h.get("type", "Exact")
        if hk not in ("Exact", "RegularExpression"):
            p.add(f"{path}.headers[{i}].type", f"unsupported value {hk!r}")
            hk = "Exact"
        if hk == "RegularExpression":
            parse_regex(str(h.get("value", "")), f"{path}.headers[{i}].value", p)
        header_text(str(h.get("name", "")), f"{path}.headers[{i}].name", p)
        headers.append(ir.HeaderMatch(str(h.get("name", "")).lower(), str(h.get("value", "")), hk))
    headers = first_of_each_name(headers)
    precedence = (
        -len(svc) if literal else 0,
        -len(meth) if literal else 0,
        -len(headers),
    )
    return ir.RouteMatch(path=pm, headers=tuple(headers), grpc=True), precedence


def read_grpcroute(
    obj: Mapping[str, Any], services: Mapping[tuple[str, str], ServiceModel]
) -> RouteModel:
    return read_route(obj, "GRPCRoute", services, parse_grpc_match, False)
