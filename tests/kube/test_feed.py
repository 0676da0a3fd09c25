"""The operator mirrors the cluster into the store: create, change, delete, restart."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf
import pytest

from nodemesh.controlplane.conditions import CONTROLLER_NAME
from nodemesh.controlplane.kube import FINALIZER
from nodemesh.controlplane.kube import _feed as feed_module
from nodemesh.controlplane.kube._feed import Feed
from nodemesh.controlplane.store import ObjectKey, Store
from tests.kube.conftest import DEADLINE, Kube, eventually
from tests.kube.test_rbac import accepted, one_of_each


def endpoint_slice(service_name: str, ns: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service_name}-1",
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"]}],
        "ports": [{"name": "http", "port": 8080}],
    }


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


async def test_ready_means_the_store_holds_every_listed_object(
    kube: Kube, start_operator: Any
) -> None:
    """The CLI builds the first snapshot as soon as `ready` is set: every object listed at
    start must be in the store by then, not only those whose event handler ran first."""
    count = 300
    for i in range(count):
        await kube.create(service(f"web-{i}"))
    store = Store()
    handle = await start_operator(store, wait_ready=False)
    await asyncio.wait_for(handle.ready.wait(), 30)
    assert len(store.keys("Service")) == count


async def test_not_ready_while_a_kind_cannot_be_listed(kube: Kube, start_operator: Any) -> None:
    """An API server that does not answer the list of one kind (overloaded, restarting, a slow
    first page at scale) is no empty cluster: serving then would withdraw every route."""
    await kube.create(service("web"))
    await kube.create(endpoint_slice("web"))
    slices = "/apis/discovery.k8s.io/v1/endpointslices"
    kube.emulator.refused.add(slices)
    store = Store()
    handle = await start_operator(store, wait_ready=False, initial_sync_timeout=1.0)
    done, _ = await asyncio.wait({asyncio.create_task(handle.ready.wait())}, timeout=4)
    assert not done, f"ready without the EndpointSlices; the store held {store.keys()}"
    kube.emulator.refused.discard(slices)
    await asyncio.wait_for(handle.ready.wait(), DEADLINE)
    assert store.keys("EndpointSlice") == [ObjectKey("EndpointSlice", "shop", "web-1")]
    assert store.keys("Service") == [ObjectKey("Service", "shop", "web")]


async def test_an_empty_cluster_is_ready(kube: Kube, start_operator: Any) -> None:
    """kopf calls no handler in an empty cluster, so nothing says the listing is complete:
    the operator's own list of every kind (all empty) must make it ready, with an empty store."""
    store = Store()
    handle = await start_operator(store, wait_ready=False, initial_sync_timeout=0.5)
    done, _ = await asyncio.wait({asyncio.create_task(handle.ready.wait())}, timeout=DEADLINE)
    assert done, f"an empty cluster was not ready after {DEADLINE} s"
    assert store.keys() == []


async def test_objects_deleted_while_the_watch_was_down_leave_the_store(
    kube: Kube, start_operator: Any
) -> None:
    """After a 410 Gone kopf lists again, and that listing has no DELETED for the objects
    that went meanwhile: they must not stay in the store (an EndpointSlice's endpoints served
    forever, a deleted route still routing)."""
    store = Store()
    for name in ("web", "api"):
        await kube.create(service(name))
    await kube.create(endpoint_slice("api"))
    await start_operator(store)
    api = ObjectKey("Service", "shop", "api")
    api_slice = ObjectKey("EndpointSlice", "shop", "api-1")
    await eventually(lambda: store.get(api) and store.get(api_slice), "api in the store")
    await kube.delete_unseen("Service", "shop", "api")
    await kube.delete_unseen("EndpointSlice", "shop", "api-1")
    await kube.create(service("new"))  # the watch works again
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in the store")
    await eventually(lambda: store.get(api) is None, "api gone from the store")
    await eventually(lambda: store.get(api_slice) is None, "api-1 gone from the store")
    assert [k.name for k in store.keys("Service")] == ["new", "web"]


async def test_each_later_relisting_sweeps_too(kube: Kube, start_operator: Any) -> None:
    """Not only the first 410 Gone after the start: every listing after one is told apart
    from the listing before it."""
    store = Store()
    for name in ("web", "api", "old"):
        await kube.create(service(name))
    await start_operator(store)
    await eventually(lambda: len(store.keys("Service")) == 3, "the Services in the store")
    for name in ("api", "old"):
        await kube.delete_unseen("Service", "shop", name)
        key = ObjectKey("Service", "shop", name)
        await eventually(lambda key=key: store.get(key) is None, f"{name} gone from the store")
    assert [k.name for k in store.keys("Service")] == ["web"]


async def test_an_object_made_again_while_the_watch_was_down_is_followed(
    kube: Kube, start_operator: Any
) -> None:
    """A Service deleted and created again under its name while the watch was down (a
    StatefulSet's pod rescheduled during an API server outage is the same): kopf's index keeps
    the deleted object's entry, under its old uid, next to the new one's. The store got the
    deleted object's content back and kept it, every later change of the new one ignored,
    until the control plane restarted; and when the new one was deleted, the deleted one came
    back."""
    store = Store()
    for name in ("web", "old", "other"):
        await kube.create(service(name, port=80))
    await start_operator(store)
    key = ObjectKey("Service", "shop", "web")
    await eventually(lambda: store.get(key), "web in the store")

    def port() -> Any:
        got = store.get(key)
        return got["spec"]["ports"][0]["port"] if got is not None else None

    await kube.delete_unseen("Service", "shop", "web")
    await kube.delete_unseen("Service", "shop", "old")
    await kube.create(service("web", port=8080))  # same name, new uid
    await eventually(lambda: port() == 8080, "the new web's port in the store")
    old = ObjectKey("Service", "shop", "old")
    await eventually(lambda: store.get(old) is None, "the sweep after the relisting done")
    patch = {"spec": {"ports": [{"name": "http", "port": 9090}]}}
    await kube.patch("Service", "shop", "web", patch)
    await eventually(lambda: port() == 9090, "the new web's change in the store")
    # deleted as usual now: gone, and the object deleted unseen does not come back with it
    await kube.delete("Service", "shop", "web")
    await eventually(lambda: store.get(key) is None, "web gone from the store")
    await kube.create(service("web", port=7070))  # and made again: the newest is followed
    await eventually(lambda: port() == 7070, "the third web in the store")
    assert [k.name for k in store.keys("Service")] == ["other", "web"]


async def test_an_object_deleted_and_made_again_at_once_stays_in_the_store(
    kube: Kube, start_operator: Any
) -> None:
    """kopf runs one worker per object (uid): the old object's last events (a burst of
    changes, then its DELETED) can come after the new object's ADDED. The feed took the last
    event's word for the name, so the DELETED of the old one took the new one out of the
    store, until its next change."""
    store = Store()
    await kube.create(service("web", port=80))
    handle = await start_operator(store)
    key = ObjectKey("Service", "shop", "web")
    await eventually(lambda: store.get(key), "web in the store")
    await asyncio.gather(
        *(
            kube.patch("Service", "shop", "web", {"metadata": {"labels": {"n": str(i)}}})
            for i in range(10)
        )
    )
    await kube.delete("Service", "shop", "web")
    new = await kube.create(service("web", port=8080))
    index = handle.operator.feed._indexes["Service"]

    def held() -> list[Any]:
        return [v["metadata"]["uid"] for v in index.get(key) or ()]

    # kopf is done with the old web (its DELETED handled), then a later event is flushed
    await eventually(lambda: held() == [new["metadata"]["uid"]], "only the new web indexed")
    await kube.create(service("marker"))
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "marker")), "the marker")
    got = store.get(key)
    assert got is not None and got["spec"]["ports"][0]["port"] == 8080, got


def _slow_sweep_list(kube: Kube, plural: str) -> tuple[asyncio.Event, asyncio.Event]:
    """The sweep's list of `plural` (the operator's own metadata list) is answered only once
    `release` is set (a slow list, as of a big kind); `started` is set when it arrives."""
    started, release = asyncio.Event(), asyncio.Event()
    handle = kube.emulator._handle

    async def slow(request: Any) -> Any:
        sweep = "PartialObjectMetadataList" in request.headers.get("Accept", "")
        if not (sweep and request.url.path.endswith("/" + plural)):
            return await handle(request)
        response = await handle(request)
        started.set()
        await release.wait()
        return response

    kube.emulator._handle = slow
    return started, release


@pytest.mark.parametrize("when", ["changed during the sweep", "made after the sweep's list"])
async def test_an_object_deleted_unseen_stays_gone_when_the_next_of_its_name_goes(
    kube: Kube, start_operator: Any, when: str
) -> None:
    """web deleted while the watch was down, and made again. An event of the new web while
    the sweep ran (its change, or its creation after the sweep's list) made the sweep skip
    the name, so nothing marked the deleted web gone: when the new web was deleted in turn,
    the deleted one came back into the store."""
    store = Store()
    for name in ("web", "other"):
        await kube.create(service(name, port=80))
    handle = await start_operator(store)
    feed = handle.operator.feed
    key = ObjectKey("Service", "shop", "web")
    await eventually(lambda: store.get(key), "web in the store")
    started, release = _slow_sweep_list(kube, "services")
    await kube.delete_unseen("Service", "shop", "web")
    if when == "changed during the sweep":
        await kube.create(service("web", port=8080))
        await asyncio.wait_for(started.wait(), 20)
        await kube.patch("Service", "shop", "web", {"metadata": {"labels": {"x": "1"}}})
    else:
        await asyncio.wait_for(started.wait(), 20)
        await kube.create(service("web", port=8080))
    await eventually(lambda: feed._touched is not None and key in feed._touched, "its event")
    release.set()
    await eventually(lambda: feed._touched is None, "the sweep done")
    got = store.get(key)
    assert got is not None and got["spec"]["ports"][0]["port"] == 8080, got
    await kube.delete("Service", "shop", "web")
    await eventually(lambda: store.get(key) is None, "web gone from the store")


async def test_a_relisting_after_a_rollout_through_the_watch_is_swept(
    kube: Kube, start_operator: Any
) -> None:
    """Every object of a kind replaced through the watch since kopf's last listing (a
    rollout's pods): the next listing repeated no key of the last one, so the feed never knew
    it was a new listing, and what went while the watch was down stayed in the store."""
    store = Store()
    for name in ("a", "b"):
        await kube.create(service(name))
    await start_operator(store)
    await eventually(lambda: len(store.keys("Service")) == 2, "a and b in the store")
    for name in ("a", "b"):
        await kube.delete("Service", "shop", name)
    for name in ("c", "d"):
        await kube.create(service(name))
    await eventually(lambda: [k.name for k in store.keys("Service")] == ["c", "d"], "c and d")
    await kube.delete_unseen("Service", "shop", "c")  # kopf lists Services again
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "c")) is None, "c swept")
    assert [k.name for k in store.keys("Service")] == ["d"]


async def test_every_object_of_a_kind_gone_while_the_watch_was_down_is_swept_in_time(
    kube: Kube, start_operator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Service kopf had listed went while the watch was down: its listing again repeats
    no key, so nothing told the feed a new listing happened, and they stayed in the store for
    good. Every kind is now swept at least every 15 minutes (1 s here)."""
    monkeypatch.setattr(feed_module, "_SWEEP_EVERY", 1.0)
    store = Store()
    for name in ("a", "b"):
        await kube.create(service(name))
    await start_operator(store)
    await eventually(lambda: len(store.keys("Service")) == 2, "a and b in the store")
    emulator = kube.emulator
    async with emulator._lock:  # both go, then one 410 Gone: kopf lists Services again
        bus = None
        for (resource, ns, name), obj in list(emulator.objects.items()):
            if resource.plural == "services" and ns == "shop" and name in ("a", "b"):
                obj.delete()
                bus = emulator._buses[resource]
        assert bus is not None
        await bus.put({"type": "ERROR", "object": {"kind": "Status", "code": 410}})
    await eventually(lambda: store.keys("Service") == [], "a and b swept")


async def test_a_new_kopf_starts_with_no_object_marked_gone(
    kube: Kube, start_operator: Any
) -> None:
    """The sweep marks gone what kopf's index still holds of an object deleted while the
    watch was down. A kopf started again (after a watch stream's error) has new indexes
    without those objects, but the marks stayed, one per such object, for the process's
    life."""
    store = Store()
    for name in ("keep", "gone"):
        await kube.create(service(name))
    handle = await start_operator(store)
    feed = handle.operator.feed
    gone = ObjectKey("Service", "shop", "gone")
    await eventually(lambda: store.get(gone), "gone in the store")
    await kube.delete_unseen("Service", "shop", "gone")
    await eventually(lambda: store.get(gone) is None, "gone swept")
    assert gone in feed._dead  # (kopf's index still holds it)
    index = feed._indexes["Service"]
    await kube.fail_watches("Service")
    await eventually(lambda: feed._indexes["Service"] is not index, "a new kopf's indexes")
    assert feed._dead == {}


async def test_a_watch_stream_error_restarts_kopf_and_the_store_keeps_following(
    kube: Kube, start_operator: Any
) -> None:
    """An API server's watch stream can end with an ERROR event that is not 410 Gone (a 500
    when etcd fails). kopf stops on it, and with it the operator: the control plane exited,
    every replica at once (they watch the same API server), and listed the cluster again.
    kopf is started again instead, alone; it lists again, so what went meanwhile goes."""
    store = Store()
    for name in ("web", "api"):
        await kube.create(service(name))
    handle = await start_operator(store)
    await eventually(lambda: len(store.keys("Service")) == 2, "the Services in the store")
    await kube.fail_watches("Service", delete_unseen=("shop", "api"))
    await kube.create(service("new"))
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in the store")
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "api")) is None, "api gone")
    assert not handle.task.done(), "the operator stopped"
    # the failed kopf's other watch streams were stopped: one watcher per kind
    watchers = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("watcher")]
    assert sorted(watchers) == sorted(set(watchers)), watchers
    await kube.delete("Service", "shop", "web")
    await eventually(lambda: store.keys("Service") == [ObjectKey("Service", "shop", "new")], "web")


def route(name: str, parent: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"parentRefs": [parent], "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]},
    }


async def test_no_object_waits_for_nodemesh_to_be_deleted(kube: Kube, start_operator: Any) -> None:
    """Deleting a route or policy never needs nodemesh running: no finalizer is put on any,
    and the one an older nodemesh's status timers left is removed. Before, every mesh route
    and policy carried one, so with nodemesh uninstalled or scaled to 0 their deletion (and
    their namespace's) hung until someone removed it by hand."""
    ours = route("ours", {"group": "", "kind": "Service", "name": "web"})
    await kube.create(ours)
    await kube.create(route("theirs", {"name": "public"}))  # kind defaults to Gateway
    old = route("old", {"group": "", "kind": "Service", "name": "web"})
    old["metadata"]["finalizers"] = [FINALIZER]  # from an older nodemesh
    await kube.create(old)

    def status(key: ObjectKey) -> dict[str, Any]:
        return {"parents": [{"controllerName": CONTROLLER_NAME, "parentRef": {"name": "web"}}]}

    handle = await start_operator(Store(), status)

    async def meta(name: str) -> dict[str, Any]:
        obj = await kube.get("HTTPRoute", "shop", name)
        return dict((obj or {}).get("metadata") or {})

    async def written(name: str) -> bool:
        obj = await kube.get("HTTPRoute", "shop", name)
        return bool(((obj or {}).get("status") or {}).get("parents"))

    await eventually(lambda: written("ours"), "status written for the mesh route")
    await eventually(lambda: written("old"), "status written for the older route")
    await eventually(lambda: _no_finalizers(kube, "old"), "the old finalizer removed")
    for name in ("ours", "theirs"):
        assert not (await meta(name)).get("finalizers")
    await handle.stop()  # nodemesh not running
    for name in ("ours", "theirs", "old"):
        await kube.delete("HTTPRoute", "shop", name)
        assert await kube.get("HTTPRoute", "shop", name) is None, name


async def test_an_object_deleted_while_nodemesh_was_away_goes_once_it_starts(
    kube: Kube, start_operator: Any
) -> None:
    """Routes and policies an older nodemesh left its finalizer on, deleted while no replica
    ran (deletionTimestamp set, waiting): the operator's start releases every kind of them.
    Passes as it is (kopf removes the finalizer it is configured with from every object it
    sees); it guards the finalizer's name in kopf's settings."""
    kinds = ("HTTPRoute", "GRPCRoute", "TrafficPolicy")
    for obj in one_of_each():
        if obj["kind"] in kinds:
            obj = {**obj, "metadata": {**obj["metadata"], "finalizers": [FINALIZER]}}
        await kube.create(obj)
    for kind in kinds:
        await kube.delete(kind, "shop", "web")
        assert ((await kube.get(kind, "shop", "web")) or {})["metadata"]["deletionTimestamp"]
    await start_operator(Store(), accepted)
    for kind in kinds:

        async def gone(kind: str = kind) -> bool:
            return await kube.get(kind, "shop", "web") is None

        await eventually(gone, f"the {kind} deleted")


async def _no_finalizers(kube: Kube, name: str) -> bool:
    obj = await kube.get("HTTPRoute", "shop", name)
    return obj is not None and not (obj.get("metadata") or {}).get("finalizers")


async def test_pods_and_nodes_keep_only_what_the_build_reads(
    kube: Kube, start_operator: Any
) -> None:
    containers = [{"name": "app", "image": "app:1", "env": [{"name": "A", "value": "x" * 500}]}]
    await kube.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                     "annotations": {"nodemesh.io/socket-redirect": "on"}},
        "spec": {"nodeName": "node-1", "containers": containers, "volumes": [{"name": "v"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}],
                   "containerStatuses": [{"name": "app", "ready": True}]},
    })  # fmt: skip
    await kube.create({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "spec": {"podCIDR": "10.0.0.0/24"},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}],
                   "images": [{"names": ["app:1"], "sizeBytes": 1}],
                   "conditions": [
                       {"type": "MemoryPressure", "status": "False"},
                       {"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-11-22T10:00:00Z",
                        "lastTransitionTime": "2026-11-22T09:00:00Z"},
                   ]},
    })  # fmt: skip
    store = Store()
    await start_operator(store)
    pod = await eventually(lambda: store.get(ObjectKey("Pod", "shop", "web-0")), "the Pod")
    assert pod["spec"] == {"nodeName": "node-1"}
    assert pod["status"] == {
        "phase": "Running",
        "podIP": "10.0.0.5",
        "podIPs": [{"ip": "10.0.0.5"}],
    }
    assert pod["metadata"]["labels"] == {"app": "web"}
    assert pod["metadata"]["annotations"] == {"nodemesh.io/socket-redirect": "on"}
    node = await eventually(lambda: store.get(ObjectKey("Node", "", "node-1")), "the Node")
    # the Ready condition's status only: its heartbeat time changes with every status report
    assert node["status"] == {
        "addresses": [{"type": "InternalIP", "address": "192.168.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    assert node.get("spec") in (None, {})


async def test_a_kind_the_api_server_does_not_serve_for_a_moment_is_not_swept(
    kube: Kube, start_operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """An API server that is starting up (an upgrade) answers 404 for a CRD's objects until it
    serves the CRD. The sweep after a relisting took that 404 for "nothing of this kind", and
    removed every HTTPRoute from the store: every node Envoy lost its routes."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    store = Store()
    for name in ("web", "old"):
        await kube.create(service(name))
    await kube.create(route("web", {"group": "", "kind": "Service", "name": "web"}))
    await start_operator(store)
    web_route = ObjectKey("HTTPRoute", "shop", "web")
    await eventually(lambda: store.get(web_route), "the route in the store")
    kube.emulator.unserved.add("/apis/gateway.networking.k8s.io/v1/httproutes")
    await kube.delete_unseen("Service", "shop", "old")  # kopf lists Services again: a sweep
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "old")) is None, "old gone")

    def swept_or_said() -> bool:
        said = any("sweep: list httproutes: HTTP 404" in r.getMessage() for r in caplog.records)
        return said or store.get(web_route) is None

    await eventually(swept_or_said, "the sweep past HTTPRoutes")
    assert store.get(web_route) is not None, "the route was swept"


async def test_a_kind_whose_sweep_list_failed_is_swept_again(
    kube: Kube, start_operator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The sweep after a relisting lists each kind once; an API server that has just come back
    answers many lists 429 (every client lists again). A kind whose list failed was checked
    again only at the next relisting, maybe days later: a Service deleted while the watch was
    down stayed in the store, and in every node Envoy, until then."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    store = Store()
    for name in ("web", "api"):
        await kube.create(service(name))
    await start_operator(store)
    api = ObjectKey("Service", "shop", "api")
    await eventually(lambda: store.get(api), "api in the store")
    kube.emulator.throttled["/api/v1/services"] = 2
    await kube.delete_unseen("Service", "shop", "api")
    await eventually(lambda: store.get(api) is None, "api gone from the store")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sweep: ")]
    assert len([m for m in said if "HTTP 429" in m]) == 1, said


def test_a_deletion_that_fails_downstream_leaves_the_rest_of_the_batch_stored() -> None:
    """The feed writes every dirty key in one batch. A failure while deleting one (a bug
    downstream of the store: here a subscriber that raises) ended the batch: the feed's task
    failed, and once started again (`Operator._supervise`) the keys after it were gone from
    the batch, their objects never stored until their next event. A failure while storing one
    was already said and skipped; a deletion is the same now."""
    store = Store()
    for name in ("a", "b"):
        store.apply(service(name))
    feed = Feed(store)
    index = {ObjectKey("Service", "shop", "b"): [{**service("b", port=8080)}],
             ObjectKey("Service", "shop", "c"): [service("c")]}  # fmt: skip
    feed.attach({"nm_services": index})

    def downstream(revision: int, changed: frozenset[ObjectKey]) -> None:
        if ObjectKey("Service", "shop", "a") in changed:
            raise RuntimeError("a bug downstream")

    store.subscribe(downstream)
    for name in ("a", "b", "c"):  # a deleted, b changed, c created
        feed.touch(ObjectKey("Service", "shop", name))
    feed.flush()
    assert store.get(ObjectKey("Service", "shop", "a")) is None
    b = store.get(ObjectKey("Service", "shop", "b"))
    assert b is not None and b["spec"]["ports"][0]["port"] == 8080, b
    assert store.get(ObjectKey("Service", "shop", "c")) is not None
