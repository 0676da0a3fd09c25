"""Incremental rebuilds: a warm memo gives the same result as a cold build, and one endpoint
change re-serializes exactly one ClusterLoadAssignment while sharing every other Resource."""

from __future__ import annotations

from typing import Any

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.store import Store
from nodemesh.xds import types
from nodemesh.xds.translate import Translator
from tests.e2e.mesh import endpoint_slice, service
from tests.e2e.objects import http_route, policy, to


def mesh_objects() -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i in range(20):
        objs += [service(f"s{i}"), endpoint_slice(f"s{i}", 8000 + i, address=f"10.0.0.{i + 1}")]
    objs.append(http_route("r", "s0", [{"backendRefs": [to("s1", 90), to("s2", 10)]}]))
    objs.append(policy("p", "s1", outlierDetection={"consecutive5xx": 3}))
    return objs


def test_one_endpoint_change_reserializes_one_load_assignment() -> None:
    store, memo, translator = Store(), BuildMemo(), Translator()
    for obj in mesh_objects():
        store.apply(obj)
    before = translator.translate(build(store.view(), memo=memo).mesh)
    made = translator.serialized
    store.apply(endpoint_slice("s7", 8007, address="10.0.1.7"))
    warm = build(store.view(), memo=memo)
    after = translator.translate(warm.mesh)
    assert translator.serialized - made == 1
    changed = {
        t: [r.name for a, r in zip(before.shared[t], after.shared[t], strict=True) if a is not r]
        for t in (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)
    }
    assert changed[types.CLUSTER] == changed[types.LISTENER] == changed[types.ROUTE] == []
    assert [n.split("@")[0] for n in changed[types.ENDPOINT]] == ["shop/s7:80"]
    assert warm == build(store.view())  # a warm memo changes speed, never the result
