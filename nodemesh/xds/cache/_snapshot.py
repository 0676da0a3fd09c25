"""`Snapshot`: the immutable set of resources, per type, that one node Envoy should hold."""

from __future__ import annotations

import hashlib
import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from nodemesh.xds import types
from nodemesh.xds.cache._resource import Resource, content_version

__all__ = ["Snapshot", "TypeSet"]

_HCM_TYPE = types.TYPE_PREFIX + hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name

# How many `updated()` steps back a TypeSet can still say which names changed (`changed_since`).
# A watch whose client is further behind is answered by comparing every resource instead.
LINEAGE = 16


class _Step:
    """One `updated()` step: the names it added, replaced or removed, and the step before.

    Steps hold names only, never resources, so remembering `LINEAGE` of them costs little."""

    __slots__ = ("changed", "parent")

    def __init__(self, parent: _Step | None, changed: frozenset[str]) -> None:
        self.parent = parent
        self.changed = changed


class TypeSet:
    """The resources of one type in a snapshot, by name, and the version of the whole set.

    A TypeSet made by `updated()` remembers which names changed from its parent, for up to
    `LINEAGE` steps back: `changed_since(token)` says what differs from an earlier set at a cost
    in the changes, which is what lets a delta watch be answered without comparing every name.
    """

    __slots__ = (
        "_buckets",
        "_checked",
        "_digests",
        "_items",
        "_order",
        "_step",
        "items",
        "version",
    )

    def __init__(self, resources: Iterable[Resource]) -> None:
        items: dict[str, Resource] = {}
        for r in resources:
            if r.name in items:
                raise ValueError(f"duplicate {types.short_name(r.type_url)} resource {r.name!r}")
            items[r.name] = r
        self._items = items
        self.items: Mapping[str, Resource] = MappingProxyType(items)
        # The type version hashes the (name, version) pairs: equal content gives an equal
        # version in any process, which is what lets a restarted control plane match Envoy.
        # The pairs are hashed in _BUCKETS buckets (by a stable hash of the name), then the
        # buckets' digests: `updated` hashes again only the buckets it touched, not 10,000
        # lines per change.
        self._order = sorted(items)
        buckets: list[dict[str, bytes]] = [{} for _ in range(_BUCKETS)]
        for name, r in items.items():
            buckets[_bucket(name)][name] = _line(r)
        self._buckets = buckets
        self._digests = [_digest(b) for b in buckets]
        self.version = content_version(b"".join(self._digests))
        # Snapshot.consistent()'s answer for this set against another type's names (see there)
        self._checked: tuple[list[str], list[str]] | None = None
        self._step = _Step(None, frozenset())

    @property
    def token(self) -> object:
        """An opaque token for this set, to hand to `changed_since` of a later set. It keeps
        no resources alive."""
        return self._step

    def changed_since(self, token: object, limit: int) -> set[str] | None:
        """The names added, replaced or removed between the set `token` came from and this one
        (a superset: a name changed and changed back is included). None when that set is not
        this one or an ancestor within `LINEAGE` steps, or when more than `limit` names changed.
        """
        names: set[str] = set()
        step: _Step | None = self._step
        while step is not None:
            if step is token:
                return names
            names |= step.changed
            if len(names) > limit:
                return None
            step = step.parent
        return None

    def updated(self, upserts: Iterable[Resource], removed: Iterable[str] = ()) -> TypeSet:
        """A new TypeSet: this one with `upserts` added or replaced (by name) and `removed`
        left out. Equal to building it from the full list, at a cost in the changes."""
        items = self._items.copy()
        # The sorted names are copied only when a name comes or goes, so the same list object
        # means the same names (Snapshot.consistent() relies on that).
        order = self._order
        buckets = list(self._buckets)
        touched: set[int] = set()  # buckets copied for this set (the parent keeps its own)
        same_names = True
        seen: set[str] = set()
        for r in upserts:
            if r.name in seen:
                raise ValueError(f"duplicate {types.short_name(r.type_url)} resource {r.name!r}")
            seen.add(r.name)
            if r.name not in items:
                if same_names:
                    order, same_names = list(order), False
                order.insert(bisect_left(order, r.name), r.name)
            items[r.name] = r
            b = _bucket(r.name)
            if b not in touched:
                buckets[b] = dict(buckets[b])
                touched.add(b)
            buckets[b][r.name] = _line(r)
        for name in removed:
            if name in items and name not in seen:
                if same_names:
                    order, same_names = list(order), False
                del items[name]
                del order[bisect_left(order, name)]
                seen.add(name)
                b = _bucket(name)
                if b not in touched:
                    buckets[b] = dict(buckets[b])
                    touched.add(b)
                del buckets[b][name]
        digests = list(self._digests)
        for b in touched:
            digests[b] = _digest(buckets[b])
        out = TypeSet.__new__(TypeSet)
        out._items = items
        out.items = MappingProxyType(items)
        out._order, out._buckets, out._digests = order, buckets, digests
        out.version = content_version(b"".join(digests))
        out._checked = None
        out._step = _Step(self._step, frozenset(seen))
        _forget_beyond_lineage(out._step)
        return out


def _forget_beyond_lineage(step: _Step) -> None:
    """Cut the chain `LINEAGE` steps above `step`, so that a long-lived chain of updates keeps
    a bounded number of steps alive. A set on another branch of the cut step sees a shorter
    lineage: its watches fall back to the full comparison, which gives the same answers."""
    above: _Step | None = step
    for _ in range(LINEAGE):
        above = above.parent if above is not None else None
    if above is not None:
        above.parent = None


def _line(r: Resource) -> bytes:
    return f"{r.name}\0{r.version}\n".encode()


_BUCKETS = 64


def _bucket(name: str) -> int:
    """A stable bucket for a name (the same in every process, unlike `hash()`)."""
    return zlib.crc32(name.encode()) & (_BUCKETS - 1)


def _digest(bucket: dict[str, bytes]) -> bytes:
    """A bucket's lines, in name order, hashed."""
    if not bucket:
        return _EMPTY  # most buckets of a small set (a node's one NodeServiceMap)
    if len(bucket) == 1:
        (line,) = bucket.values()
        return hashlib.blake2b(line, digest_size=16).digest()
    return hashlib.blake2b(b"".join(bucket[n] for n in sorted(bucket)), digest_size=16).digest()


_EMPTY = hashlib.blake2b(b"", digest_size=16).digest()


class Snapshot:
    """Resources per type URL for one node. Immutable once built; share freely between nodes.

    Types absent from the snapshot are simply not served; an empty type is served as empty.
    """

    __slots__ = ("_types",)

    def __init__(self, resources: Mapping[str, Iterable[Resource]]) -> None:
        self._types: Mapping[str, TypeSet] = MappingProxyType(
            {type_url: TypeSet(rs) for type_url, rs in resources.items()}
        )

    @classmethod
    def of_type_sets(cls, type_sets: Mapping[str, TypeSet]) -> Snapshot:
        """A snapshot made of existing TypeSets (shared, not copied)."""
        out = cls.__new__(cls)
        out._types = MappingProxyType(dict(type_sets))
        return out

    def updated(self, changes: Mapping[str, tuple[Iterable[Resource], Iterable[str]]]) -> Snapshot:
        """A new snapshot: per type URL in `changes`, (resources added or replaced, names
        removed); every other type's TypeSet is shared. Equal to a snapshot built from the
        full resource lists, at a cost in the changes rather than in the snapshot's size."""
        type_sets = dict(self._types)
        for type_url, (upserts, removed) in changes.items():
            old = type_sets.get(type_url)
            type_sets[type_url] = (
                old.updated(upserts, removed) if old is not None else TypeSet(upserts)
            )
        return Snapshot.of_type_sets(type_sets)

    def type_set(self, type_url: str) -> TypeSet | None:
        return self._types.get(type_url)

    @classmethod
    def from_messages(cls, messages: Iterable[Message]) -> Snapshot:
        """Convenience for tests and the demo: serialize each message and group by type."""
        core = (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)
        grouped: dict[str, list[Resource]] = {t: [] for t in core}
        for m in messages:
            r = Resource.from_message(m)
            grouped.setdefault(r.type_url, []).append(r)
        return cls(grouped)

    @property
    def type_urls(self) -> tuple[str, ...]:
        return tuple(sorted(self._types, key=types.order_key))

    def version(self, type_url: str) -> str | None:
        ts = self._types.get(type_url)
        return ts.version if ts is not None else None

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        ts = self._types.get(type_url)
        return ts.items if ts is not None else MappingProxyType({})

    def has_type(self, type_url: str) -> bool:
        return type_url in self._types

    def consistent(self) -> list[str]:
        """Every EDS and RDS name referenced from CDS and LDS exists. Returns the problems found.

        Each resource's references are computed once (decoding it) and kept on the Resource.
        The answer for a set of Clusters (Listeners) is kept on its TypeSet together with the
        list of endpoint (route) names it was checked against: a TypeSet made by `updated()`
        shares that list when no name came or went, so a snapshot that changed only some
        endpoints' contents is checked in constant time."""
        clusters, endpoints = self._types.get(types.CLUSTER), self._types.get(types.ENDPOINT)
        listeners, routes = self._types.get(types.LISTENER), self._types.get(types.ROUTE)
        return _checked(clusters, endpoints, _cluster_problems) + _checked(
            listeners, routes, _listener_problems
        )


def _checked(
    referring: TypeSet | None,
    referred: TypeSet | None,
    check: Callable[[Iterable[Resource], Mapping[str, Resource]], list[str]],
) -> list[str]:
    if referring is None:
        return []
    names = referred._order if referred is not None else []
    last = referring._checked
    if last is not None and last[0] is names:
        return list(last[1])
    problems = check(referring.items.values(), referred.items if referred is not None else {})
    referring._checked = (names, problems)
    return list(problems)


def _cluster_problems(clusters: Iterable[Resource], endpoints: Mapping[str, Resource]) -> list[str]:
    problems = []
    for c in clusters:
        refs = c.references
        if refs is None:
            refs = c.references = _cluster_references(c)
        for wanted in refs:
            if wanted not in endpoints:
                problems.append(f"cluster {c.name!r} needs endpoints {wanted!r}")
    return problems


def _listener_problems(listeners: Iterable[Resource], routes: Mapping[str, Resource]) -> list[str]:
    needed: set[str] = set()
    for r in listeners:
        refs = r.references
        if refs is None:
            refs = r.references = tuple(sorted(_route_names((r,))))
        needed.update(refs)
    return [
        f"a listener needs route configuration {n!r}" for n in sorted(needed) if n not in routes
    ]


def _cluster_references(resource: Resource) -> tuple[str, ...]:
    cluster = resource.message
    assert isinstance(cluster, cluster_pb2.Cluster)
    if cluster.type != cluster_pb2.Cluster.EDS:
        return ()
    return (cluster.eds_cluster_config.service_name or cluster.name,)


def _route_names(listeners: Iterable[Resource]) -> set[str]:
    names: set[str] = set()
    for r in listeners:
        listener = r.message
        assert isinstance(listener, listener_pb2.Listener)
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.type_url != _HCM_TYPE:
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                if hcm.HasField("rds"):
                    names.add(hcm.rds.route_config_name)
    return names
