"""The JSON shape of the Gateway API routes (which fields are objects, lists and strings) and of
TrafficPolicy (every field and its type), and the values of Services, EndpointSlices, Nodes and
Pods that the API server would refuse.

In Kubernetes the API server checks this against the Gateway API CRDs before nodemesh sees an
object. In files mode nothing did, and the builder reads a field of the wrong type as absent:
`matches:` written as an object instead of a list (one indentation slip) made a header canary
rule a catch-all that sent every request to the canary, with `Accepted=True`. Files mode checks
each route against these shapes (`shape_problems`) and treats a mismatch like invalid YAML.

Only shapes are checked here (the CRD's types of containers and strings), and the two rule
fields an HTTPRoute has and a GRPCRoute does not (`timeouts`, `retry`), which the builder, sharing
its rule reader between the kinds, would apply; values, patterns and cross-field rules are the
builder's, which reports them as conditions. TrafficPolicy's shape is its CRD's whole tree of
fields and types, other fields refused (kubectl's strict field validation): nodemesh owns that
schema, and a misspelled field did nothing without a word. Services and EndpointSlices get no
conditions, so the values of theirs that the API server would refuse and the mesh builds on
(ports, addresses) are checked here too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nodemesh._ip import ip_version

__all__ = ["shape_problems"]

# A shape: a dict (an object, with the shapes of the fields that matter), a `_Closed` dict (an
# object with every field it may have), a one-element list (a list, with the shape of its
# items), `str`, `int`, `float` (a number), `bool`, or None (not checked).
Shape = Any


class _Closed(dict):  # type: ignore[type-arg]
    """An object whose fields are all listed: another one is refused, as kubectl's strict field
    validation does (the API server alone would drop it, for the CRD's structural schema)."""


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


# TrafficPolicy's spec, the chart's CRD in full (a test holds the two equal). A field misspelled
# (`timeouts: {requestTimeout: 5s}`) or of the wrong type (`backoff: 2s`) was read as absent:
# the policy did nothing there and still won the section over a newer policy that set it, with
# Accepted=True; `targetRefs[].namespace` (a field it does not have) pointed at another
# namespace's Service and got the policy's own namespace's. In a cluster kubectl refuses each.
_DURATION, _PERCENT = str, float
_TRAFFIC_POLICY = {
    "metadata": {},
    "spec": _Closed(
        targetRefs=[_Closed(group=str, kind=str, name=str, sectionName=str)],
        retry=_Closed(
            retryOn=[str],
            retriableStatusCodes=[int],
            attempts=int,
            perTryTimeout=_DURATION,
            backoff=_Closed(baseInterval=_DURATION, maxInterval=_DURATION),
            budget=_Closed(percent=_PERCENT, minConcurrency=int),
            skipPreviousHosts=bool,
        ),
        timeouts=_Closed(connect=_DURATION, request=_DURATION, idle=_DURATION),
        circuitBreaker=_Closed(
            maxConnections=int, maxPendingRequests=int, maxRequests=int, maxRetries=int
        ),
        outlierDetection=_Closed(
            consecutive5xx=int,
            consecutiveGatewayErrors=int,
            interval=_DURATION,
            baseEjectionTime=_DURATION,
            maxEjectionPercent=int,
        ),
        loadBalancer=_Closed(
            type=str, hashOn=_Closed(header=str, cookie=_Closed(name=str, ttl=_DURATION))
        ),
        faultInjection=_Closed(
            delay=_Closed(fixedDelay=_DURATION, percent=_PERCENT),
            abort=_Closed(httpStatus=int, percent=_PERCENT),
        ),
    ),
}

_SHAPES: Mapping[str, Shape] = {
    "TrafficPolicy": _TRAFFIC_POLICY,
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
        if isinstance(shape, _Closed):
            for field in value:
                if field not in shape:
                    out.append(
                        f"{path}.{field}: no such field (there are {', '.join(shape)})"
                        if path
                        else f"{field}: no such field"
                    )
    elif isinstance(shape, list):
        if not isinstance(value, list):
            out.append(f"{path}: must be a list, not {_describe(value)}")
            return
        for i, item in enumerate(value):
            _check(item, shape[0], f"{path}[{i}]", out)
    elif shape is str and not isinstance(value, str):
        out.append(f"{path}: must be a string, not {_describe(value)}")
    elif shape is int and type(value) is not int:
        out.append(f"{path}: must be an integer, not {_describe(value)}")
    elif shape is float and type(value) not in (int, float):
        out.append(f"{path}: must be a number, not {_describe(value)}")
    elif shape is bool and type(value) is not bool:
        out.append(f"{path}: must be true or false, not {_describe(value)}")


def _port_number(value: Any) -> bool:
    return type(value) is int and 0 < value < 65536


def _ip(value: Any, version: int | None = None) -> bool:
    """An IPv4 or IPv6 address (`version` 4 or 6: that one)."""
    found = ip_version(value) if type(value) is str else 0
    return found != 0 and (version is None or found == version)


def _service(obj: Mapping[str, Any], out: list[str]) -> None:
    """The values the API server checks in a Service that the mesh builds on: ports in range
    and each (port, protocol) once (a port twice gave Envoy a domain twice, and that NACK held
    back every route), ClusterIPs that are addresses (one is a Host the node Envoy routes)."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return
    ports = spec.get("ports")
    seen: dict[tuple[Any, Any], int] = {}
    for i, port in enumerate(ports if isinstance(ports, list) else ()):
        if not isinstance(port, Mapping):
            out.append(f"spec.ports[{i}]: must be an object, not {_describe(port)}")
            continue
        number = port.get("port")
        if not _port_number(number):
            out.append(f"spec.ports[{i}].port: must be a number from 1 to 65535, not {number!r}")
            continue
        key = (number, port.get("protocol", "TCP"))
        if key in seen:
            out.append(f"spec.ports[{i}].port: {number}/{key[1]} is spec.ports[{seen[key]}]'s too")
        seen.setdefault(key, i)
    ips = spec.get("clusterIPs")
    named = [("clusterIP", spec.get("clusterIP"))] + [
        (f"clusterIPs[{i}]", ip) for i, ip in enumerate(ips if isinstance(ips, list) else ())
    ]
    for field, ip in named:
        if ip not in (None, "", "None") and not _ip(ip):
            out.append(f"spec.{field}: must be an IP address or None, not {ip!r}")


def _endpoint_slice(obj: Mapping[str, Any], out: list[str]) -> None:
    """Ports in range and addresses of the slice's type: Envoy refuses an endpoint of
    another, and a port out of range failed the whole translation."""
    ports = obj.get("ports")
    for i, port in enumerate(ports if isinstance(ports, list) else ()):
        number = port.get("port") if isinstance(port, Mapping) else port
        if number is not None and not _port_number(number):
            out.append(f"ports[{i}].port: must be a number from 1 to 65535, not {number!r}")
    version = {"IPv4": 4, "IPv6": 6}.get(str(obj.get("addressType", "IPv4")))
    endpoints = obj.get("endpoints")
    if version is None or not isinstance(endpoints, list):
        return
    for i, endpoint in enumerate(endpoints):
        hints = endpoint.get("hints") if isinstance(endpoint, Mapping) else None
        if hints is not None:
            _hints(hints, f"endpoints[{i}].hints", out)
        addresses = endpoint.get("addresses") if isinstance(endpoint, Mapping) else None
        for j, address in enumerate(addresses if isinstance(addresses, list) else ()):
            if not _ip(address, version):
                out.append(
                    f"endpoints[{i}].addresses[{j}]: must be an IPv{version} address "
                    f"(addressType {obj.get('addressType', 'IPv4')}), not {address!r}"
                )


def _hints(hints: Any, where: str, out: list[str]) -> None:
    """Topology hints as the API server takes them (`forZones`/`forNodes`: lists of
    `{name: ...}`): the node agents follow them, and a hint read as absent makes every node
    ignore the hints of the whole Service."""
    if not isinstance(hints, Mapping):
        out.append(f"{where}: must be a mapping with forZones and forNodes, not {hints!r}")
        return
    for field in hints.keys() - {"forZones", "forNodes"}:
        out.append(f"{where}.{field}: unknown field (forZones or forNodes)")
    for field in ("forZones", "forNodes"):
        listed = hints.get(field)
        if listed is None:
            continue
        if not isinstance(listed, list):
            out.append(f"{where}.{field}: must be a list of {{name: ...}}, not {listed!r}")
            continue
        for j, h in enumerate(listed):
            if not (isinstance(h, Mapping) and isinstance(h.get("name"), str) and h["name"]):
                out.append(f"{where}.{field}[{j}]: must be {{name: <a name>}}, not {h!r}")


def _node(obj: Mapping[str, Any], out: list[str]) -> None:
    """An InternalIP or ExternalIP that is an address: the first IPv4 InternalIP is where the
    node's agent sends L7 connections, and a typo left the node with none (every L7
    connection there refused) without a word."""
    status = obj.get("status")
    addresses = status.get("addresses") if isinstance(status, Mapping) else None
    for i, a in enumerate(addresses if isinstance(addresses, list) else ()):
        if isinstance(a, Mapping) and a.get("type") in ("InternalIP", "ExternalIP"):
            if not _ip(a.get("address")):
                out.append(
                    f"status.addresses[{i}].address: must be an IP address "
                    f"(type {a.get('type')}), not {a.get('address')!r}"
                )


def _pod(obj: Mapping[str, Any], out: list[str]) -> None:
    """Pod IPs that are addresses: a typo dropped the pod from its node's map and from the
    clients of its namespace's consumer routes, without a word."""
    status = obj.get("status")
    if not isinstance(status, Mapping):
        return
    ip = status.get("podIP")
    if ip not in (None, "") and not _ip(ip):
        out.append(f"status.podIP: must be an IP address, not {ip!r}")
    ips = status.get("podIPs")
    for i, entry in enumerate(ips if isinstance(ips, list) else ()):
        if not isinstance(entry, Mapping):  # (the builder reads `ip` of each, as Kubernetes has)
            out.append(f"status.podIPs[{i}]: must be an object {{ip: ...}}, not {entry!r}")
        elif not _ip(entry.get("ip")):
            out.append(f"status.podIPs[{i}].ip: must be an IP address, not {entry.get('ip')!r}")


_VALUES = {"Service": _service, "EndpointSlice": _endpoint_slice, "Node": _node, "Pod": _pod}

# The API server's rules for names: a DNS-1123 subdomain for most objects, a DNS-1123 label for
# a namespace, a DNS-1035 label (a letter first) for a Service, whose name is a DNS label.
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _names(kind: str, obj: Mapping[str, Any], out: list[str]) -> None:
    """A name (and namespace) the API server takes: one it refuses (`Web`, `two\nlines`) made
    host names Envoy never sees and broke `nodemesh status`'s table."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return
    name, namespace = meta.get("name"), meta.get("namespace")
    if isinstance(name, str) and name:
        if kind in ("Service", "Namespace"):
            rule, limit = (_LABEL_1035, 63) if kind == "Service" else (_LABEL, 63)
            what = "an RFC 1035 label" if kind == "Service" else "an RFC 1123 label"
        else:
            rule, limit, what = _SUBDOMAIN, 253, "an RFC 1123 subdomain"
        if len(name) > limit or rule.fullmatch(name) is None:
            out.append(f"metadata.name: {name!r} is not {what} (lower case, at most {limit})")
    if isinstance(namespace, str) and namespace:
        if len(namespace) > 63 or _LABEL.fullmatch(namespace) is None:
            out.append(
                f"metadata.namespace: {namespace!r} is not an RFC 1123 label (lower case, at "
                "most 63)"
            )


def shape_problems(obj: Mapping[str, Any]) -> list[str]:
    """Where `obj` does not have the shape (routes) or values (names; Services, EndpointSlices,
    Nodes, Pods) the API server would take."""
    kind = str(obj.get("kind", ""))
    shape = _SHAPES.get(kind)
    out: list[str] = []
    _names(kind, obj, out)
    if shape is not None:
        _check(obj, shape, "", out)
    values = _VALUES.get(kind)
    if values is not None:
        values(obj, out)
    return out
