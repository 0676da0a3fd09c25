"""The other control-plane replicas, for `Programmed` across replicas: the ready endpoints of
the control plane's own Service, read from the EndpointSlices the operator watches anyway (no
API call, no RBAC of its own)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from nodemesh.controlplane.builder.endpointslice import SERVICE_NAME_LABEL
from nodemesh.controlplane.store import Store

__all__ = ["peer_targets"]


def peer_targets(
    store: Store, namespace: str, service: str, port_name: str, identity: str
) -> dict[str, str]:
    """{peer name: base URL} of the serving endpoints of Service `namespace/service` on its
    port named `port_name`, but this replica's (`targetRef.name == identity`). A peer is named
    by its Pod (`targetRef.name`), else by its address.

    Serving, not ready: a replica shutting down (its Pod terminating: `ready` false, `serving`
    true while its readiness probe passes) still has node Envoys connected while it drains;
    left out at once, their nodes would count as connected nowhere, and every object they
    carry would go Pending (and its status be written twice) on each rolling update."""
    out: dict[str, str] = {}
    for key, obj in store.view().of_kind("EndpointSlice").items():
        if key.namespace != namespace:
            continue
        labels = _map(_map(obj.get("metadata")).get("labels"))
        if labels.get(SERVICE_NAME_LABEL) != service:
            continue
        port = next(
            (
                p.get("port")
                for p in _list(obj.get("ports"))
                if _map(p).get("name", "") == port_name and isinstance(_map(p).get("port"), int)
            ),
            None,
        )
        if port is None:
            continue
        for e in _list(obj.get("endpoints")):
            e = _map(e)
            conditions = _map(e.get("conditions"))
            # (`serving` is unset before Kubernetes 1.20: `ready` then)
            if conditions.get("serving", conditions.get("ready")) is False:
                continue
            addresses = [str(a) for a in _list(e.get("addresses"))]
            pod = str(_map(e.get("targetRef")).get("name") or "")
            if not addresses or pod == identity:
                continue
            out[pod or addresses[0]] = f"http://{_host(addresses[0])}:{port}"
    return dict(sorted(out.items()))


def _host(address: str) -> str:
    try:
        return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    except ValueError:
        return address


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
