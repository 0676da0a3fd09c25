"""The Kubernetes resources the operator watches, and what it does with each.

One table drives the kopf handler registration, the status writers and the RBAC rules derived
for the chart, so the three cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LEASE", "RESOURCES", "WatchedResource", "by_kind"]


@dataclass(frozen=True, slots=True)
class WatchedResource:
    """A resource kind the operator lists and watches into the store.

    `status`: the operator writes conditions back to the objects' status subresource.
    `config`: users author these objects; accepting or rejecting one is logged at INFO
    (high-churn inventory kinds such as EndpointSlice log at DEBUG).
    """

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True
    status: bool = False
    config: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def index_id(self) -> str:
        """The kopf index name (a handler kwarg), e.g. `nm_endpointslices`."""
        return f"nm_{self.plural}"


RESOURCES: tuple[WatchedResource, ...] = (
    WatchedResource("Service", "", "v1", "services"),
    WatchedResource("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    WatchedResource("Pod", "", "v1", "pods"),
    WatchedResource("Node", "", "v1", "nodes", namespaced=False),
    WatchedResource(
        "HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes", status=True, config=True
    ),
    WatchedResource(
        "GRPCRoute", "gateway.networking.k8s.io", "v1", "grpcroutes", status=True, config=True
    ),
    WatchedResource(
        "TrafficPolicy", "nodemesh.io", "v1alpha1", "trafficpolicies", status=True, config=True
    ),
    # No ReferenceGrant: mesh routes reach Services in any namespace without one (GEP-1294).
)

# Leader election: one Lease in the operator's namespace (see `_lease.py`).
LEASE = WatchedResource("Lease", "coordination.k8s.io", "v1", "leases")


def by_kind(kind: str) -> WatchedResource:
    for r in RESOURCES:
        if r.kind == kind:
            return r
    raise KeyError(kind)
