"""The JSON shape of the Gateway API routes: which fields are objects, lists and strings.

In Kubernetes the API server checks this against the Gateway API CRDs before nodemesh sees an
object. In files mode nothing did, and the builder reads a field of the wrong type as absent:
`matches:` written as an object instead of a list (one indentation slip) made a header canary
rule a catch-all that sent every request to the canary, with `Accepted=True`. Files mode checks
each route against these shapes (`shape_problems`) and treats a mismatch like invalid YAML.

Only shapes are checked here (the CRD's types of containers and strings), and the two rule
fields an HTTPRoute has and a GRPCRoute does not (`timeouts`, `retry`), which the builder, sharing
its rule reader between the kinds, would apply; values, patterns and cross-field rules are the
builder's, which reports them as conditions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["shape_problems"]

# A shape: a dict (an object, with the shapes of the fields that matter), a one-element list
# (a list, with the shape of its items), `str` (a string), or None (not checked).
Shape = Any

_MODIFIER = {"set": [{}], "add": [{}], "remove": [str]}
_FILTER = {
    "type": str,
    "requestHeaderModifier": _MODIFIER,
    "responseHeaderModifier": _MODIFIER,
    "urlRewrite": {"hostname": str, "path": {"type": str}},
    "requestRedirect": {"scheme": str, "hostname": str, "path": {"type": str}},
    "requestMirror": {"backendRef": {"name": str}, "fraction": {}},
}
_BACKEND = {"name": str, "namespace": str, "filters": [_FILTER]}
_PARENT = {"kind": str, "name": str, "namespace": str, "sectionName": str}
_HTTP_MATCH = {
    "path": {"type": str, "value": str},
    "headers": [{"name": str, "value": str}],
    "queryParams": [{"name": str, "value": str}],
    "method": str,
}
_GRPC_MATCH = {
    "method": {"type": str, "service": str, "method": str},
    "headers": [{"name": str, "value": str}],
}


def _route(match: Shape, rule_extra: Mapping[str, Shape]) -> Shape:
    rule = {"matches": [match], "filters": [_FILTER], "backendRefs": [_BACKEND], **rule_extra}
    return {
        "metadata": {},
        "spec": {"parentRefs": [_PARENT], "hostnames": [str], "rules": [rule]},
    }


class _NotInGrpcRoute:
    """A field HTTPRoute rules have and GRPCRoute rules do not (Gateway API v1): the API server
    refuses it (kubectl's strict field validation) or drops it, so the route would not do in
    a cluster what files mode did with it."""

    def __init__(self, instead: str) -> None:
        self.instead = instead


_SHAPES: Mapping[str, Shape] = {
    "HTTPRoute": _route(
        _HTTP_MATCH,
        {"timeouts": {"request": str, "backendRequest": str}, "retry": {"codes": [None]}},
    ),
    "GRPCRoute": _route(
        _GRPC_MATCH,
        {
            "timeouts": _NotInGrpcRoute("a TrafficPolicy's timeouts on the Service"),
            "retry": _NotInGrpcRoute("a TrafficPolicy's retry on the Service"),
        },
    ),
}


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    return f"{type(value).__name__} {value!r}"


def _check(value: Any, shape: Shape, path: str, out: list[str]) -> None:
    if value is None or shape is None:
        return  # absent (or null): the builder's defaults apply
    if isinstance(shape, _NotInGrpcRoute):
        out.append(f"{path}: GRPCRoute has no such field (HTTPRoute has); use {shape.instead}")
        return
    if isinstance(shape, dict):
        if not isinstance(value, Mapping):
            out.append(f"{path}: must be an object, not {_describe(value)}")
            return
        for field, inner in shape.items():
            _check(value.get(field), inner, f"{path}.{field}" if path else field, out)
    elif isinstance(shape, list):
        if not isinstance(value, list):
            out.append(f"{path}: must be a list, not {_describe(value)}")
            return
        for i, item in enumerate(value):
            _check(item, shape[0], f"{path}[{i}]", out)
    elif shape is str and not isinstance(value, str):
        out.append(f"{path}: must be a string, not {_describe(value)}")


def shape_problems(obj: Mapping[str, Any]) -> list[str]:
    """Where `obj` (a route) does not have the Gateway API's shape; [] for other kinds."""
    shape = _SHAPES.get(str(obj.get("kind", "")))
    out: list[str] = []
    if shape is not None:
        _check(obj, shape, "", out)
    return out
