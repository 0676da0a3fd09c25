"""The store contract the sources rely on: keys, change detection, resync, notifications."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from nodemesh.controlplane.store import ObjectKey, Store


def svc(name: str, port: int = 80, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", **meta},
        "spec": {"ports": [{"port": port}]},
    }


def test_apply_reports_only_real_changes() -> None:
    store = Store()
    assert store.apply(svc("web")) is True
    assert store.apply(svc("web", resourceVersion="42", uid="x")) is False
    assert store.apply({**svc("web"), "status": {"loadBalancer": {}}}) is False
    assert store.apply(svc("web", port=81)) is True
    assert store.revision == 2


def _node(ready: str, heartbeat: str) -> dict[str, Any]:
    conditions = [
        {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": heartbeat},
        {"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat, "reason": "Kubelet"},
    ]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-1"},
        "status": {"addresses": [], "conditions": conditions, "images": [{"names": ["a"]}]},
    }


def test_a_node_status_report_is_a_change_only_when_readiness_changes() -> None:
    store = Store()
    assert store.apply(_node("True", "2026-11-22T10:00:00Z")) is True
    assert store.apply(_node("True", "2026-11-22T10:05:00Z")) is False  # a heartbeat
    assert store.apply(_node("Unknown", "2026-11-22T10:05:00Z")) is True
    node = store.get(ObjectKey("Node", "", "node-1"))
    assert node is not None
    assert node["status"] == {
        "addresses": [],
        "conditions": [{"type": "Ready", "status": "Unknown"}],
    }


def test_files_mode_objects_get_a_generation_that_counts_changes() -> None:
    store = Store()
    key = ObjectKey("Service", "shop", "web")
    store.apply(svc("web"))
    store.apply(svc("web"))
    store.apply(svc("web", port=81))
    obj = store.get(key)
    assert obj is not None and obj["metadata"]["generation"] == 2


def test_kubernetes_generation_is_kept() -> None:
    store = Store()
    store.apply(svc("web", generation=7))
    obj = store.get(ObjectKey("Service", "shop", "web"))
    assert obj is not None and obj["metadata"]["generation"] == 7


def test_wrong_api_group_is_refused_with_a_clear_message() -> None:
    store = Store()
    with pytest.raises(ValueError, match="not in group 'gateway.networking.k8s.io'"):
        store.apply({"apiVersion": "v1", "kind": "HTTPRoute", "metadata": {"name": "r"}})


def test_replace_all_deletes_missing_objects_of_the_given_kinds_only() -> None:
    store = Store()
    seen: list[frozenset[ObjectKey]] = []
    store.apply(svc("a"))
    store.apply(svc("b"))
    store.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    store.subscribe(lambda _rev, keys: seen.append(keys))
    assert store.replace_all([svc("b"), svc("c")], kinds=["Service"]) is True
    assert store.keys("Service") == [ObjectKey("Service", "shop", n) for n in ("b", "c")]
    assert store.keys("Node") == [ObjectKey("Node", "", "n1")]
    assert seen == [
        frozenset({ObjectKey("Service", "shop", "a"), ObjectKey("Service", "shop", "c")})
    ]
    assert store.replace_all([svc("b"), svc("c")], kinds=["Service"]) is False


def test_delete_and_view_are_consistent() -> None:
    store = Store()
    store.apply(svc("a"))
    view = store.view()
    assert store.delete(ObjectKey("Service", "shop", "a")) is True
    assert store.delete(ObjectKey("Service", "shop", "a")) is False
    assert ObjectKey("Service", "shop", "a") in view
    assert len(store.view()) == 0
    assert view.revision == 1 and store.revision == 2


def test_a_view_reports_the_keys_changed_since_an_earlier_revision() -> None:
    store = Store()
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "x"}}
    store.apply(svc)
    first = store.view()
    store.apply({**svc, "metadata": {"name": "b", "namespace": "x"}})
    store.delete(ObjectKey("Service", "x", "a"))
    second = store.view()
    assert second.changed_since(first.revision) == {
        ObjectKey("Service", "x", "a"),
        ObjectKey("Service", "x", "b"),
    }
    assert second.changed_since(second.revision) == frozenset()
    assert first.changed_since(second.revision) is None
    # Copy-on-write: the earlier view still sees its revision.
    assert set(first) == {ObjectKey("Service", "x", "a")}
    assert set(second) == {ObjectKey("Service", "x", "b")}


def test_the_store_keeps_its_own_copy_of_what_it_is_given() -> None:
    """A source may change or reuse an object after applying it (kopf's bodies are mappings
    it updates in place): the store's copy must not move with it, however deep."""

    class Body(Mapping[str, Any]):  # a read-only mapping over a dict that its owner changes
        def __init__(self, data: dict[str, Any]) -> None:
            self.data = data

        def __getitem__(self, key: str) -> Any:
            return self.data[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self.data)

        def __len__(self) -> int:
            return len(self.data)

    shared = {"port": 80, "appProtocol": "http"}  # a YAML anchor used twice gives one dict
    raw = svc("web")
    raw["spec"]["ports"] = [shared, shared]
    raw["status"] = {"podIP": "10.244.0.5"}
    store = Store()
    store.apply(Body(raw))
    shared["port"] = 81
    raw["spec"]["ports"].append({"port": 82})
    raw["metadata"]["labels"] = {"changed": "yes"}
    stored = store.get(ObjectKey("Service", "shop", "web"))
    assert stored is not None
    assert stored["spec"]["ports"] == [
        {"port": 80, "appProtocol": "http"},
        {"port": 80, "appProtocol": "http"},
    ]
    assert "labels" not in stored["metadata"] and "status" not in stored
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "shop"},
        "status": {"podIPs": [{"ip": "10.244.0.5"}], "phase": "Running"},
    }
    store.apply(pod)
    pod["status"]["podIPs"][0]["ip"] = "10.244.0.6"
    kept = store.get(ObjectKey("Pod", "shop", "p"))
    assert kept is not None and kept["status"]["podIPs"] == [{"ip": "10.244.0.5"}]
