"""Translate the mesh IR into Envoy resources, per node. Pure: no clock, no I/O.

`translate_messages(mesh)` is the plain function (used by golden tests). `Translator` wraps it
with memoization: an IR item that is identical (or equal) to the one it saw last time keeps its
previous `Resource`, so one endpoint change re-serializes one ClusterLoadAssignment only.

>>> t = Translator()                               # doctest: +SKIP
>>> result = t.translate(mesh)                     # doctest: +SKIP
>>> cache.set_fallback_snapshot(result.snapshot()) # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf.message import Message

from nodemesh.xds import types
from nodemesh.xds.cache import Resource, Snapshot
from nodemesh.xds.translate import ir
from nodemesh.xds.translate.cluster import cluster
from nodemesh.xds.translate.endpoint import load_assignment
from nodemesh.xds.translate.listener import outbound_listener
from nodemesh.xds.translate.route import route_configuration, virtual_host
from nodemesh.xds.translate.servicemap import TYPE_URL as SERVICE_MAP_TYPE_URL
from nodemesh.xds.translate.servicemap import ServiceMaps

__all__ = ["Translation", "Translator", "ir", "translate_messages"]

LISTENER_NAME = "outbound"

Origins = frozenset[str]


@dataclass(frozen=True, slots=True)
class Translation:
    """Envoy resources for the mesh. `shared` goes to every node; `per_node` adds to it (today:
    each known node's agent service map under `SERVICE_MAP_TYPE_URL`, named after the node).

    `origins` maps (type_url, resource name) to the user objects ("Kind/ns/name") it carries.
    """

    shared: Mapping[str, tuple[Resource, ...]]
    per_node: Mapping[str, Mapping[str, tuple[Resource, ...]]]
    origins: Mapping[tuple[str, str], Origins]

    def snapshot(self, node: str | None = None) -> Snapshot:
        extra = self.per_node.get(node, {}) if node is not None else {}
        if not extra:
            return Snapshot(self.shared)
        merged = {t: (*self.shared.get(t, ()), *extra.get(t, ())) for t in {*self.shared, *extra}}
        return Snapshot(merged)


def translate_messages(mesh: ir.Mesh) -> dict[str, list[Message]]:
    """The Envoy messages for `mesh`, by type URL, in a stable order (no memoization)."""
    clusters = [cluster(c) for c in mesh.clusters]
    eds = {c.name: c.eds_cluster_config.service_name for c in clusters}
    return {
        types.CLUSTER: list(clusters),
        types.ENDPOINT: [load_assignment(e, eds[e.cluster]) for e in mesh.endpoints],
        types.LISTENER: [_listener(mesh)],
        types.ROUTE: [
            route_configuration(
                mesh.route_config_name, (virtual_host(v) for v in mesh.virtual_hosts)
            )
        ],
    }


def _listener(mesh: ir.Mesh) -> Message:
    listener: Message = outbound_listener(
        LISTENER_NAME, mesh.outbound_address, mesh.outbound_port, mesh.route_config_name
    )
    return listener


K = TypeVar("K")
V = TypeVar("V")
Out = TypeVar("Out")


class _Memo(Generic[K, V, Out]):
    """name -> (last IR value, output); reused when the IR value is the same object or equal."""

    def __init__(self, make: Callable[[V], Out]) -> None:
        self._make = make
        self._last: dict[K, tuple[V, Out]] = {}
        self.made = 0

    def get(self, key: K, value: V, into: dict[K, tuple[V, Out]]) -> Out:
        last = self._last.get(key)
        if last is not None and (last[0] is value or last[0] == value):
            into[key] = last
            return last[1]
        out = self._make(value)
        self.made += 1
        into[key] = (value, out)
        return out

    def swap(self, new: dict[K, tuple[V, Out]]) -> None:
        self._last = new


class Translator:
    """Memoizing translator. Not thread-safe; one per pipeline."""

    def __init__(self) -> None:
        self._clusters: _Memo[str, ir.Cluster, Resource] = _Memo(
            lambda c: Resource.from_message(cluster(c))
        )
        self._endpoints: _Memo[str, tuple[ir.ClusterEndpoints, str], Resource] = _Memo(
            lambda pair: Resource.from_message(load_assignment(*pair))
        )
        self._vhosts: _Memo[str, ir.VirtualHost, Message] = _Memo(virtual_host)
        self._route: tuple[str, tuple[ir.VirtualHost, ...], Resource] | None = None
        self._listener: tuple[tuple[str, int, str], Resource] | None = None
        self._service_maps = ServiceMaps()

    def translate(self, mesh: ir.Mesh) -> Translation:
        origins: dict[tuple[str, str], Origins] = {}

        new_clusters: dict[str, tuple[ir.Cluster, Resource]] = {}
        clusters = tuple(self._clusters.get(c.name, c, new_clusters) for c in mesh.clusters)
        self._clusters.swap(new_clusters)
        cluster_origins: dict[str, Origins] = {}
        eds_names: dict[str, str] = {}
        for c, r in zip(mesh.clusters, clusters, strict=True):
            cluster_origins[c.name] = frozenset(c.origins)
            origins[(types.CLUSTER, c.name)] = cluster_origins[c.name]
            message = r.message
            assert isinstance(message, cluster_pb2.Cluster)
            eds_names[c.name] = message.eds_cluster_config.service_name

        new_eps: dict[str, tuple[tuple[ir.ClusterEndpoints, str], Resource]] = {}
        endpoints = tuple(
            self._endpoints.get(e.cluster, (e, eds_names[e.cluster]), new_eps)
            for e in mesh.endpoints
        )
        self._endpoints.swap(new_eps)
        for e in mesh.endpoints:
            origins[(types.ENDPOINT, eds_names[e.cluster])] = cluster_origins.get(
                e.cluster, frozenset()
            )

        route = self._route_resource(mesh)
        route_origins: set[str] = set()
        for v in mesh.virtual_hosts:
            route_origins.update(v.origins)
            for rt in v.routes:
                route_origins.update(rt.origins)
        origins[(types.ROUTE, route.name)] = frozenset(route_origins)

        key = (mesh.outbound_address, mesh.outbound_port, mesh.route_config_name)
        if self._listener is None or self._listener[0] != key:
            self._listener = (key, Resource.from_message(_listener(mesh)))
        shared = {
            types.CLUSTER: clusters,
            types.ENDPOINT: endpoints,
            types.LISTENER: (self._listener[1],),
            types.ROUTE: (route,),
        }
        per_node = {
            node: {SERVICE_MAP_TYPE_URL: (r,)}
            for node, r in self._service_maps.resources(mesh).items()
        }
        return Translation(shared=shared, per_node=per_node, origins=origins)

    def _route_resource(self, mesh: ir.Mesh) -> Resource:
        last = self._route
        vhosts = mesh.virtual_hosts
        if (
            last is not None
            and last[0] == mesh.route_config_name
            and len(last[1]) == len(vhosts)
            and all(a is b or a == b for a, b in zip(last[1], vhosts, strict=True))
        ):
            return last[2]
        new: dict[str, tuple[ir.VirtualHost, Message]] = {}
        protos = [self._vhosts.get(v.name, v, new) for v in vhosts]
        self._vhosts.swap(new)
        resource = Resource.from_message(route_configuration(mesh.route_config_name, protos))
        self._route = (mesh.route_config_name, vhosts, resource)
        return resource

    @property
    def serialized(self) -> int:
        """How many cluster and endpoint resources were serialized so far (for tests, bench)."""
        return self._clusters.made + self._endpoints.made
