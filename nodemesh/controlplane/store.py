"""The store: every input object the control plane knows, keyed by `ObjectKey`, with a revision.

Sources (the files watcher, the kopf operator) write here; the pipeline reads a consistent
`StoreView` and rebuilds. The store owns no translation logic.

Contract for writers (files source, `nodemesh.controlplane.kube`):

- `ObjectKey(kind, namespace, name)`: `kind` is the bare Kubernetes kind ("Service",
  "EndpointSlice", "Pod", "Node", "HTTPRoute", "GRPCRoute", "TrafficPolicy", ...). nodemesh reads
  exactly one API group per kind (see `KINDS`), so the group is not part of the key; objects whose
  apiVersion group does not match `KINDS` are refused by `apply` (ValueError). Cluster-scoped
  objects (Node) use namespace "".
- `apply(obj)` inserts or replaces; returns True when the content changed. Metadata noise
  (resourceVersion, managedFields, uid, creationTimestamp, ...) and `status` are dropped before
  comparing and storing, so a status patch echoed back by the API server is not a change;
  only the status fields that are input are kept (Node `addresses`; Pod `podIP`, `podIPs`,
  `phase`).
  Objects without `metadata.generation` (files mode) get one: 1 on insert, +1 on each change.
- `delete(key)` returns True when the key was present.
- `replace_all(objs, kinds=None)`: a full resync of the given kinds (all kinds of the objects
  when None): objects of those kinds that are not in `objs` are deleted. Returns whether
  anything changed, and notifies subscribers once.
- The store is thread-safe (a lock around every write); subscribers are called in the writer's
  thread after the lock is released, with the new revision and the set of changed keys.
- Stored objects are deep copies and must not be mutated by readers.

Usage::

    store = Store()
    store.subscribe(lambda revision, changed: print(revision, changed))
    store.apply({"apiVersion": "v1", "kind": "Service",
                 "metadata": {"name": "web", "namespace": "shop"}, "spec": {...}})
    view = store.view()          # immutable, consistent snapshot for one rebuild
    view.get(ObjectKey("Service", "shop", "web"))
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

__all__ = ["KINDS", "ObjectKey", "Store", "StoreView", "Subscriber", "key_of"]

# kind -> the API group nodemesh reads it from ("" is the core group).
KINDS: Mapping[str, str] = MappingProxyType(
    {
        "Service": "",
        "Pod": "",
        "Node": "",
        "Namespace": "",
        "EndpointSlice": "discovery.k8s.io",
        "HTTPRoute": "gateway.networking.k8s.io",
        "GRPCRoute": "gateway.networking.k8s.io",
        "ReferenceGrant": "gateway.networking.k8s.io",
        "TrafficPolicy": "nodemesh.io",
        "AccessPolicy": "nodemesh.io",
    }
)
_CLUSTER_SCOPED = frozenset({"Node", "Namespace"})

# Metadata fields that change without the object's meaning changing.
_METADATA_NOISE = frozenset(
    {
        "resourceVersion",
        "managedFields",
        "uid",
        "selfLink",
        "generateName",
        "ownerReferences",
        "finalizers",
        "deletionGracePeriodSeconds",
    }
)
_ANNOTATION_NOISE = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})
# The status fields that are input (the node agents' service maps); every other status is dropped.
_INPUT_STATUS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"Node": ("addresses",), "Pod": ("podIP", "podIPs", "phase")}
)

Subscriber = Callable[[int, frozenset["ObjectKey"]], None]


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        if self.namespace:
            return f"{self.kind}/{self.namespace}/{self.name}"
        return f"{self.kind}/{self.name}"


def _group(api_version: str) -> str:
    return api_version.rsplit("/", 1)[0] if "/" in api_version else ""


def key_of(obj: Mapping[str, Any]) -> ObjectKey:
    """The key of an object; raises ValueError with a precise message for malformed objects."""
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError("object has no kind")
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        raise ValueError(f"{kind} has no metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} has no metadata.name")
    if kind in _CLUSTER_SCOPED:
        namespace = ""
    else:
        ns = meta.get("namespace", "default")
        if not isinstance(ns, str) or not ns:
            raise ValueError(f"{kind} {name}: metadata.namespace must be a non-empty string")
        namespace = ns
    return ObjectKey(kind, namespace, name)


def _normalize(obj: Mapping[str, Any], key: ObjectKey) -> dict[str, Any]:
    out = copy.deepcopy(dict(obj))
    status = out.pop("status", None)
    if key.kind in _INPUT_STATUS and isinstance(status, Mapping):
        kept = {f: status[f] for f in _INPUT_STATUS[key.kind] if f in status}
        if kept:
            out["status"] = kept
    meta = dict(out.get("metadata") or {})
    for field in _METADATA_NOISE:
        meta.pop(field, None)
    annotations = meta.get("annotations")
    if isinstance(annotations, Mapping):
        kept = {k: v for k, v in annotations.items() if k not in _ANNOTATION_NOISE}
        if kept:
            meta["annotations"] = kept
        else:
            meta.pop("annotations")
    if key.namespace:
        meta["namespace"] = key.namespace
    out["metadata"] = meta
    return out


def _without_generation(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = {k: v for k, v in obj["metadata"].items() if k != "generation"}
    return {**obj, "metadata": meta}


class StoreView(Mapping[ObjectKey, Mapping[str, Any]]):
    """An immutable, consistent view of the store at one revision."""

    __slots__ = ("_by_kind", "_objects", "revision")

    def __init__(
        self,
        revision: int,
        objects: Mapping[ObjectKey, Mapping[str, Any]],
        by_kind: Mapping[str, Mapping[ObjectKey, Mapping[str, Any]]],
    ) -> None:
        self.revision = revision
        self._objects = objects
        self._by_kind = by_kind

    def __getitem__(self, key: ObjectKey) -> Mapping[str, Any]:
        return self._objects[key]

    def __iter__(self) -> Iterator[ObjectKey]:
        return iter(self._objects)

    def __len__(self) -> int:
        return len(self._objects)

    def of_kind(self, kind: str) -> Mapping[ObjectKey, Mapping[str, Any]]:
        """Objects of one kind, by key."""
        return self._by_kind.get(kind, MappingProxyType({}))


class Store:
    """In-memory objects by key, a monotonically increasing `revision`, and change callbacks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kind: dict[str, dict[ObjectKey, dict[str, Any]]] = {}
        self._revision = 0
        self._subscribers: list[Subscriber] = []

    # -- reading ---------------------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._revision

    def get(self, key: ObjectKey) -> Mapping[str, Any] | None:
        return self._by_kind.get(key.kind, {}).get(key)

    def keys(self, kind: str | None = None) -> list[ObjectKey]:
        with self._lock:
            if kind is not None:
                return sorted(self._by_kind.get(kind, {}))
            return sorted(k for objs in self._by_kind.values() for k in objs)

    def view(self) -> StoreView:
        """A consistent snapshot for one rebuild (shallow copies; objects are shared, read-only)."""
        with self._lock:
            by_kind = {kind: MappingProxyType(dict(objs)) for kind, objs in self._by_kind.items()}
            merged: dict[ObjectKey, Mapping[str, Any]] = {}
            for objs in by_kind.values():
                merged.update(objs)
            return StoreView(self._revision, MappingProxyType(merged), MappingProxyType(by_kind))

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(revision, changed_keys)` after every change. Returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # -- writing ---------------------------------------------------------------------------
    def apply(self, obj: Mapping[str, Any]) -> bool:
        key = key_of(obj)
        self._check_group(obj, key)
        with self._lock:
            changed = self._apply_locked(key, obj)
            revision = self._bump() if changed else self._revision
        if changed:
            self._notify(revision, frozenset({key}))
        return changed

    def delete(self, key: ObjectKey) -> bool:
        with self._lock:
            objs = self._by_kind.get(key.kind, {})
            present = objs.pop(key, None) is not None
            revision = self._bump() if present else self._revision
        if present:
            self._notify(revision, frozenset({key}))
        return present

    def replace_all(
        self, objs: Iterable[Mapping[str, Any]], kinds: Iterable[str] | None = None
    ) -> bool:
        incoming: dict[ObjectKey, Mapping[str, Any]] = {}
        for obj in objs:
            key = key_of(obj)
            self._check_group(obj, key)
            incoming[key] = obj
        scope = set(kinds) if kinds is not None else {k.kind for k in incoming}
        changed: set[ObjectKey] = set()
        with self._lock:
            for kind in scope:
                for key in list(self._by_kind.get(kind, {})):
                    if key not in incoming:
                        del self._by_kind[kind][key]
                        changed.add(key)
            for key, obj in incoming.items():
                if key.kind in scope and self._apply_locked(key, obj):
                    changed.add(key)
            revision = self._bump() if changed else self._revision
        if changed:
            self._notify(revision, frozenset(changed))
        return bool(changed)

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _check_group(obj: Mapping[str, Any], key: ObjectKey) -> None:
        want = KINDS.get(key.kind)
        if want is None:
            return  # unknown kinds are stored as-is; build ignores them
        got = _group(str(obj.get("apiVersion", "")))
        if got != want:
            raise ValueError(
                f"{key}: apiVersion {obj.get('apiVersion')!r} is not in group {want or 'core'!r}"
            )

    def _apply_locked(self, key: ObjectKey, obj: Mapping[str, Any]) -> bool:
        new = _normalize(obj, key)
        objs = self._by_kind.setdefault(key.kind, {})
        old = objs.get(key)
        has_generation = "generation" in new["metadata"]
        if old is not None:
            if has_generation:
                if old == new:
                    return False
            elif _without_generation(old) == new:
                return False
        if not has_generation:
            previous = old["metadata"].get("generation", 0) if old is not None else 0
            new["metadata"]["generation"] = int(previous) + 1
        objs[key] = new
        return True

    def _bump(self) -> int:
        self._revision += 1
        return self._revision

    def _notify(self, revision: int, changed: frozenset[ObjectKey]) -> None:
        for callback in list(self._subscribers):
            callback(revision, changed)
