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
    # A dual-stack Service has a slice per address family, and so a peer an address of each:
    # the IPv4 one is taken, whatever order the slices came in (an IPv6 one taken by chance
    # was not listened on by a peer whose --http-listen is 0.0.0.0, which never answered).
    found: dict[str, list[tuple[int, str, str]]] = {}  # peer -> (family, address, URL)
    for key, obj in sorted(store.view().of_kind("EndpointSlice").items()):
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
            version = _version(addresses[0])
            host = f"[{addresses[0]}]" if version == 6 else addresses[0]
            found.setdefault(pod or addresses[0], []).append(
                (version, addresses[0], f"http://{host}:{port}")
            )
    # IPv4 before IPv6 (before what is no address), then the lowest address
    return {peer: min(urls)[2] for peer, urls in sorted(found.items())}


def _version(address: str) -> int:
    """4 or 6, or 7 for what is not an address (sorted last)."""
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 7


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
