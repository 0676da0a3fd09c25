"""Clusters removed after the routes (`nodemesh/controlplane/_linger.py`), as the pipeline serves
them to the cache. The node's answers are scripted through the status tracker, as the ADS
server records them (the Envoy end is in tests/e2e/test_routing.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.translate import endpoint_slice
from nodemesh.controlplane._linger import LINGER_MAX
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker

NODE = "node-1"
SERVICES = 200


def _service(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc{i}", "namespace": f"ns{i % 100}"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }


def _slice(i: int, salt: int = 0) -> dict[str, Any]:
    return endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt)


async def _lingering_mesh() -> tuple[Store, SnapshotCache, Pipeline]:
    """A mesh of `SERVICES` Services, one node Envoy connected that has not ACKed the routes
    of the change that deleted svc0 (its cluster lingers)."""
    store, cache, status = Store(), SnapshotCache(), StatusTracker()
    for i in range(SERVICES):
        store.apply(_service(i))
        store.apply(_slice(i))
    p = Pipeline(store, cache, status)
    await p.rebuild()
    status.stream_opened(NODE)
    envoy = object()  # its stream: it asked for Clusters, and holds no routes we know of
    for t in (types.CLUSTER, types.ROUTE):
        status.resumed(NODE, t, "", {}, stream=envoy)
    store.delete(ObjectKey("Service", "ns0", "svc0"))
    await p.rebuild()
    assert "ns0/svc0:80" in p.lingering.kept
    return store, cache, p


async def test_an_endpoint_change_while_a_cluster_lingers_is_served_as_that_change() -> None:
    """One endpoint change while a removed cluster lingers gives the node the same Clusters
    (the same set: nothing for a delta stream to compare) and Endpoints that say which one
    changed, so each delta stream sends it without comparing every cluster and endpoint.
    Before, each rebuild while a cluster lingered made new sets from scratch: the pipeline
    looked at every cluster (1.2 ms of the 5 ms an endpoint change may take at 10,000
    Services), and every delta stream compared all 10,000 Clusters and Endpoints again."""
    store, cache, p = await _lingering_mesh()
    before = cache.get_snapshot(NODE)
    assert before is not None
    store.apply(_slice(7, salt=1))
    await p.rebuild()
    after = cache.get_snapshot(NODE)
    assert after is not None and after is not before
    assert "ns0/svc0:80" in after.resources(types.CLUSTER), "stopped lingering"
    assert after.type_set(types.CLUSTER) is before.type_set(types.CLUSTER)
    eds_before, eds_after = before.type_set(types.ENDPOINT), after.type_set(types.ENDPOINT)
    assert eds_before is not None and eds_after is not None
    changed = eds_after.changed_since(eds_before.token, SERVICES)
    assert changed is not None, "the served Endpoints do not follow from the ones served before"
    assert [n.split("@")[0] for n in changed] == ["ns7/svc7:80"]
    assert set(eds_after.items) == set(eds_before.items) - set(changed) | {*changed}


async def test_the_served_clusters_are_the_built_ones_and_the_lingering_one() -> None:
    """While svc0's cluster lingers, a Service added and another one deleted: the node is
    served exactly the built Clusters and Endpoints plus those of the two removed ones."""
    store, cache, p = await _lingering_mesh()
    store.apply(_service(SERVICES))
    store.apply(_slice(SERVICES))
    store.delete(ObjectKey("Service", "ns3", "svc3"))
    store.apply(_slice(9, salt=2))
    await p.rebuild()
    served, built = cache.get_snapshot(NODE), p.snapshot
    assert served is not None and built is not None
    for t in (types.CLUSTER, types.ENDPOINT):
        extra = {n.split("@")[0] for n in served.resources(t)} - {
            n.split("@")[0] for n in built.resources(t)
        }
        assert extra == {"ns0/svc0:80", "ns3/svc3:80"}, t
        for name, r in built.resources(t).items():
            assert served.resources(t)[name].version == r.version
    assert served.consistent() == []


async def test_a_cluster_that_lingered_its_time_is_not_kept_again() -> None:
    """svc0's cluster has lingered `LINGER_MAX` seconds (the node never ACKed), and a rebuild
    comes before the timer that lets it go: the node is served the Clusters without it. Before,
    that rebuild found it in what was served and not in what was built, and kept it as newly
    removed, for another `LINGER_MAX` seconds."""
    store, cache, p = await _lingering_mesh()  # (not started: no timer)
    p.lingering.kept = {
        n: dataclasses.replace(k, since=k.since - LINGER_MAX) for n, k in p.lingering.kept.items()
    }
    store.apply(_slice(7, salt=1))
    await p.rebuild()
    served = cache.get_snapshot(NODE)
    assert served is not None
    assert "ns0/svc0:80" not in served.resources(types.CLUSTER)
    assert not any(n.startswith("ns0/svc0:80@") for n in served.resources(types.ENDPOINT))


async def test_a_cluster_that_lingered_its_time_goes_alone() -> None:
    """svc0's cluster has lingered `LINGER_MAX` seconds, svc3's was removed a moment ago, and
    the node has ACKed the routes of neither change: when the timer fires, only svc0's goes;
    svc3's still waits for the routes that stopped naming it. Before, the first expiry let
    every lingering cluster go at once."""
    store, cache, p = await _lingering_mesh()  # (not started: the test fires the timer)
    store.delete(ObjectKey("Service", "ns3", "svc3"))
    await p.rebuild()
    assert set(p.lingering.kept) == {"ns0/svc0:80", "ns3/svc3:80"}
    p.lingering.kept["ns0/svc0:80"] = dataclasses.replace(
        p.lingering.kept["ns0/svc0:80"], since=p.lingering.kept["ns0/svc0:80"].since - LINGER_MAX
    )
    p._check_lingering()  # what the timer calls at the oldest one's expiry
    served = cache.get_snapshot(NODE)
    assert served is not None
    clusters = served.resources(types.CLUSTER)
    assert "ns0/svc0:80" not in clusters
    assert "ns3/svc3:80" in clusters
    assert served.consistent() == []


async def test_status_shows_the_lingering_cluster_and_the_versions_served() -> None:
    """`/status` says which removed cluster is still served, and its `snapshot` versions are
    those the nodes are served (with the lingering cluster), the ones their ACKs name."""
    _, cache, p = await _lingering_mesh()
    status = p.status_json()
    assert [c["name"] for c in status["lingering_clusters"]] == ["ns0/svc0:80"]
    served = cache.get_snapshot(NODE)
    assert served is not None
    assert status["snapshot"]["cds"] == served.version(types.CLUSTER)
    assert p.snapshot is not None and p.snapshot.version(types.CLUSTER) != served.version(
        types.CLUSTER
    )
