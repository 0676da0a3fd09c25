"""A Service's `sessionAffinity: ClientIP` in the node Envoy: its clusters hash, and every route
that sends to them hashes on the connection's source address (the client pod's), so that a
client's requests go to one endpoint. A TrafficPolicy's loadBalancer wins where it applies.
(The kernel path: tests/ebpf/test_controlplane_feed.py.)"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from nodemesh.xds import types
from nodemesh.xds.translate import translate_messages
from tests.controlplane.test_routes import parent, route, run, to
from tests.e2e.mesh import service


def sticky(**spec: Any) -> dict[str, Any]:
    svc = service("sticky")
    svc["spec"].update(sessionAffinity="ClientIP", **spec)
    return svc


def envoy(*objs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Clusters by name, and per virtual host its routes' hash policies."""
    messages = translate_messages(run(*objs).mesh)
    clusters = {c.name: c for c in messages[types.CLUSTER]}
    hashes: dict[str, list[Any]] = {}
    for rc in messages[types.ROUTE]:
        for vh in rc.virtual_hosts:
            hashes.setdefault(vh.name, []).extend(list(r.route.hash_policy) for r in vh.routes)
    return clusters, hashes


def source_ip_only(policies: list[Any]) -> bool:
    return len(policies) == 1 and policies[0].connection_properties.source_ip


def test_a_client_ip_affinity_service_hashes_on_the_source_address() -> None:
    clusters, hashes = envoy(sticky(), service("plain"))
    assert clusters["shop/sticky:80"].lb_policy == cluster_pb2.Cluster.RING_HASH
    assert clusters["shop/plain:80"].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    (default,) = hashes["shop/sticky:80"]
    assert source_ip_only(default), default
    assert hashes["shop/plain:80"] == [[]]


def test_a_route_of_another_service_that_sends_to_it_hashes_too() -> None:
    """The hash policy is the route's, the ring the cluster's: a route to the sticky Service
    without it would pick a random endpoint of the ring for each request."""
    rules = [{"backendRefs": to("sticky")}]
    _, hashes = envoy(sticky(), service("front"), route("r", [parent("front")], rules))
    (to_sticky,) = hashes["shop/front:80"]
    assert source_ip_only(to_sticky), to_sticky


def test_a_traffic_policys_load_balancer_wins_where_it_applies() -> None:
    policy = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "lb", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": "sticky"}],
            "loadBalancer": {"type": "RingHash", "hashOn": {"header": "x-user"}},
        },
    }
    clusters, hashes = envoy(sticky(), policy)
    assert clusters["shop/sticky:80"].lb_policy == cluster_pb2.Cluster.RING_HASH
    ((by_header,),) = hashes["shop/sticky:80"]
    assert by_header.header.header_name == "x-user"
    policy["spec"]["loadBalancer"] = {"type": "LeastRequest"}
    clusters, hashes = envoy(sticky(), policy)
    assert clusters["shop/sticky:80"].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert hashes["shop/sticky:80"] == [[]]
    # a policy without a loadBalancer leaves the affinity as it is
    del policy["spec"]["loadBalancer"]
    policy["spec"]["timeouts"] = {"request": "5s"}
    clusters, hashes = envoy(sticky(), policy)
    assert clusters["shop/sticky:80"].lb_policy == cluster_pb2.Cluster.RING_HASH
    (default,) = hashes["shop/sticky:80"]
    assert source_ip_only(default), default
