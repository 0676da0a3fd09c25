"""EndpointSlices -> endpoints per (Service, port): ready ones serve, terminating ones drain."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import groupby, islice
from operator import eq
from typing import Any

from nodemesh.controlplane.builder._util import as_list, as_map
from nodemesh.controlplane.builder.service import ServiceModel
from nodemesh.xds.translate import ir

__all__ = [
    "SERVICE_NAME_LABEL",
    "merge_endpoints",
    "read_endpoints",
    "slice_endpoints",
    "slice_service",
]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

PortKey = tuple[str, str, int]


def slice_service(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, Service name) a slice belongs to."""
    meta = as_map(obj.get("metadata"))
    ns = str(meta.get("namespace", "default"))
    return ns, str(as_map(meta.get("labels")).get(SERVICE_NAME_LABEL))


def slice_endpoints(obj: Mapping[str, Any], svc: ServiceModel) -> dict[PortKey, list[ir.Endpoint]]:
    """The endpoints one slice contributes to each port of its Service."""
    found: dict[PortKey, list[ir.Endpoint]] = {}
    if obj.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
        return found
    # A slice port is matched to the Service port by name ("" for a single unnamed port).
    slice_ports: dict[str, int] = {}
    for p in as_list(obj.get("ports")):
        p = as_map(p)
        number = p.get("port")  # (files mode may hold what the API server refuses)
        if type(number) is int and 0 < number < 65536 and p.get("protocol", "TCP") == "TCP":
            slice_ports[str(p.get("name") or "")] = number
    targets = [(sp.port, slice_ports[sp.name]) for sp in svc.ports if sp.name in slice_ports]
    if not targets:
        return found
    # Made for the first target port, then copied with the other target ports (rare).
    endpoint, new, first_target = ir.Endpoint, tuple.__new__, targets[0][1]
    made: list[ir.Endpoint] = []
    append = made.append
    passed = False  # a port gets an entry (maybe empty) once one endpoint passes
    for e in as_list(obj.get("endpoints")):
        if type(e) is not dict:
            e = as_map(e)
        cond = e.get("conditions")
        if type(cond) is not dict:
            cond = as_map(cond)
        ready = cond.get("ready") is not False  # unset means ready
        if not ready:
            serving = cond.get("serving", ready) is not False
            if not (serving and cond.get("terminating") is True):
                continue
        passed = True
        # str() only for what is not a str already (a call per field and endpoint otherwise)
        zone = e.get("zone", "")
        if type(zone) is not str:
            zone = str(zone)
        node = e.get("nodeName", "")
        if type(node) is not str:
            node = str(node)
        addresses = e.get("addresses")
        if type(addresses) is not list:
            addresses = as_list(addresses)
        draining = not ready
        hints = e.get("hints")
        hinted = _NO_HINTS if hints is None else _hints(hints)
        for a in addresses:
            # tuple.__new__: the NamedTuple's own __new__ without its Python frame.
            append(new(endpoint, (str(a), first_target, draining, node, zone, hinted)))
    if passed:
        ns, name = svc.namespace, svc.name
        found[(ns, name, targets[0][0])] = made
        for port, target in targets[1:]:
            copies = [new(endpoint, (a, target, d, n, z, h)) for a, _, d, n, z, h in made]
            found.setdefault((ns, name, port), []).extend(copies)
    return found


_NO_HINTS: tuple[tuple[str, ...], ...] = ()


def _hints(hints: Any) -> tuple[tuple[str, ...], ...]:
    """An endpoint's `hints` as `ir.Endpoint.hints`: (forZones, forNodes) names, each sorted
    and once; () when it names none."""
    hints = as_map(hints)
    zones, nodes = (
        tuple(sorted({str(as_map(h).get("name", "")) for h in as_list(hints.get(k))} - {""}))
        for k in ("forZones", "forNodes")
    )
    return (zones, nodes) if zones or nodes else _NO_HINTS


def merge_endpoints(parts: Iterable[list[ir.Endpoint]]) -> tuple[ir.Endpoint, ...]:
    """Endpoints of one (Service, port) from all its slices: deduplicated, sorted (by address,
    port, draining, node, zone: the order of `ir.Endpoint`'s fields)."""
    merged: list[ir.Endpoint] = []
    n = 0
    for part in parts:
        merged += part
        n += 1
    merged.sort()
    if n > 1:
        # An address and port in two slices (the EndpointSlice controller moving it, with
        # other hints or conditions): once, its first (a ready one first), or Envoy would
        # get it twice, at double weight.
        once: list[ir.Endpoint] = []
        last: tuple[str, int] | None = None
        for e in merged:  # (sorted: an address and port's entries are neighbours)
            if (e[0], e[1]) != last:
                once.append(e)
                last = (e[0], e[1])
        merged = once
    # Equal endpoints are neighbours once sorted; usually there are none (no set to hash into).
    elif any(map(eq, merged, islice(merged, 1, None))):
        merged = [e for e, _ in groupby(merged)]
    return tuple(merged)


def read_endpoints(
    slices: Iterable[Mapping[str, Any]], services: Mapping[tuple[str, str], ServiceModel]
) -> dict[PortKey, tuple[ir.Endpoint, ...]]:
    """(namespace, service, service port) -> endpoints, sorted, deduplicated."""
    parts: dict[PortKey, list[list[ir.Endpoint]]] = {}
    for obj in slices:
        svc = services.get(slice_service(obj))
        if svc is None:
            continue
        for key, eps in slice_endpoints(obj, svc).items():
            parts.setdefault(key, []).append(eps)
    return {k: merge_endpoints(v) for k, v in parts.items()}
