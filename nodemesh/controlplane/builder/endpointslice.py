"""EndpointSlices -> endpoints per (Service, port): ready ones serve, terminating ones drain."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from nodemesh.controlplane.builder._util import as_list, as_map
from nodemesh.controlplane.builder.service import ServiceModel
from nodemesh.xds.translate import ir

__all__ = ["SERVICE_NAME_LABEL", "read_endpoints"]

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def read_endpoints(
    slices: Iterable[Mapping[str, Any]], services: Mapping[tuple[str, str], ServiceModel]
) -> dict[tuple[str, str, int], tuple[ir.Endpoint, ...]]:
    """(namespace, service, service port) -> endpoints, sorted, deduplicated."""
    found: dict[tuple[str, str, int], set[ir.Endpoint]] = {}
    for obj in slices:
        meta = as_map(obj.get("metadata"))
        ns = str(meta.get("namespace", "default"))
        svc_name = as_map(meta.get("labels")).get(SERVICE_NAME_LABEL)
        svc = services.get((ns, str(svc_name)))
        if svc is None or obj.get("addressType", "IPv4") not in ("IPv4", "IPv6"):
            continue
        # A slice port is matched to the Service port by name ("" for a single unnamed port).
        slice_ports: dict[str, int] = {}
        for p in as_list(obj.get("ports")):
            p = as_map(p)
            if isinstance(p.get("port"), int) and p.get("protocol", "TCP") == "TCP":
                slice_ports[str(p.get("name") or "")] = p["port"]
        for e in as_list(obj.get("endpoints")):
            e = as_map(e)
            cond = as_map(e.get("conditions"))
            ready = cond.get("ready") is not False  # unset means ready
            serving = cond.get("serving", ready) is not False
            terminating = cond.get("terminating") is True
            if not ready and not (serving and terminating):
                continue
            zone = str(e.get("zone", ""))
            node = str(e.get("nodeName", ""))
            for sp in svc.ports:
                target = slice_ports.get(sp.name)
                if target is None:
                    continue
                bucket = found.setdefault((ns, svc.name, sp.port), set())
                for addr in as_list(e.get("addresses")):
                    bucket.add(ir.Endpoint(str(addr), target, not ready, node, zone))
    return {
        k: tuple(sorted(v, key=lambda e: (e.address, e.port, e.draining))) for k, v in found.items()
    }
