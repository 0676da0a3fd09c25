"""The operator mirrors the cluster into the store: create, change, delete, restart."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import kopf

from nodemesh.controlplane.store import ObjectKey, Store
from tests.kube.conftest import Kube, eventually


def service(name: str, ns: str = "shop", port: int = 80) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": port}]},
    }


async def test_created_objects_reach_the_store(kube: Kube, start_operator: Any) -> None:
    store = Store()
    await kube.create(service("web"))
    await start_operator(store)
    web = await eventually(lambda: store.get(ObjectKey("Service", "shop", "web")), "web in store")
    assert web["spec"]["ports"][0]["port"] == 80  # created before the operator started
    await kube.create(service("api", port=8080))
    api = await eventually(lambda: store.get(ObjectKey("Service", "shop", "api")), "api in store")
    assert api["spec"]["ports"][0]["port"] == 8080  # created while it ran


async def test_changes_and_deletions_follow(kube: Kube, start_operator: Any) -> None:
    store = Store()
    await kube.create(service("web"))
    await start_operator(store)
    key = ObjectKey("Service", "shop", "web")
    await eventually(lambda: store.get(key), "web in store")
    await kube.patch("Service", "shop", "web", {"spec": {"ports": [{"name": "http", "port": 81}]}})

    def port() -> Any:
        obj = store.get(key)
        return obj is not None and obj["spec"]["ports"][0]["port"] == 81

    await eventually(port, "port 81 in store")
    changed = store.get(key)
    assert changed is not None and changed["spec"]["ports"] == [{"name": "http", "port": 81}]
    await kube.delete("Service", "shop", "web")
    await eventually(lambda: store.get(key) is None, "web gone from store")
    assert key not in store.keys("Service")


async def test_stopping_the_operator_leaves_other_servers_tasks_running(
    kube: Kube, start_operator: Any
) -> None:
    """kopf's own exit sweep cancels every task born after it started; ours must survive."""
    await kube.create(service("web"))
    handle = await start_operator(Store())
    # Stop only after the initial discovery: kopf leaves its discovery sub-tasks to its 5s sweep.
    await eventually(lambda: handle.operator.feed.synced, "initial listing indexed")
    sibling = asyncio.create_task(asyncio.Event().wait(), name="an ADS stream")
    await handle.stop()
    assert not sibling.done(), "stopping the operator cancelled another server's task"
    kopf_dir = os.path.dirname(kopf.__file__)
    left = [
        t
        for t in asyncio.all_tasks()
        if kopf_dir in getattr(getattr(t.get_coro(), "cr_code", None), "co_filename", "")
    ]
    sibling.cancel()
    assert not left, f"kopf tasks left running: {left}"


async def test_namespace_scoping_ignores_other_namespaces(kube: Kube, start_operator: Any) -> None:
    store = Store()
    await kube.create(service("web", ns="shop"))
    await kube.create(service("web", ns="other"))
    await kube.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})
    await start_operator(store, namespaces=("shop",))
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "web")), "shop/web in store")
    await kube.create(service("api", ns="other"))
    await kube.create(service("api", ns="shop"))
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "api")), "shop/api in store")
    assert [k for k in store.keys() if k.namespace == "other"] == []
    # Nodes are cluster-scoped: still watched in namespaced mode (the mesh needs them).
    assert store.keys("Node") == [ObjectKey("Node", "", "node-1")]
