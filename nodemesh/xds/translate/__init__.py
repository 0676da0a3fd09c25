"""Translate the mesh IR into Envoy resources, per node. Pure: no clock, no I/O.

`translate_messages(mesh)` is the plain function (used by golden tests). `Translator` wraps it
with memoization: an IR item that is identical (or equal) to the one it saw last time keeps its
previous `Resource`, so one endpoint change re-serializes one ClusterLoadAssignment only.

>>> t = Translator()                               # doctest: +SKIP
>>> result = t.translate(mesh)                     # doctest: +SKIP
>>> cache.set_fallback_snapshot(result.snapshot()) # doctest: +SKIP
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import chain, compress
from operator import attrgetter, is_not
from types import MappingProxyType
from typing import Generic, NamedTuple, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from nodemesh.xds import types
from nodemesh.xds.cache import Resource, Snapshot, TypeSet
from nodemesh.xds.translate import ir
from nodemesh.xds.translate.cluster import cluster, cluster_bytes
from nodemesh.xds.translate.endpoint import load_assignment, load_assignment_bytes
from nodemesh.xds.translate.listener import (
    ConsumerChain,
    Destination,
    consumer_chains_bytes,
    outbound_listener,
    outbound_listener_parts,
    outbound_listener_routes,
)
from nodemesh.xds.translate.route import (
    destination_route_configuration,
    destination_route_configuration_bytes,
    route_configuration,
    route_configuration_bytes,
    virtual_host,
    virtual_host_entry,
    virtual_host_routes,
)
from nodemesh.xds.translate.servicemap import NODE_TYPE_URL, SERVICE_TYPE_URL, ServiceMaps

__all__ = [
    "LISTENER_NAME",
    "Translation",
    "Translator",
    "ir",
    "node_listeners",
    "translate_messages",
]

LISTENER_NAME = "outbound"

Origins = frozenset[str]


Changes = Mapping[str, tuple[tuple[Resource, ...], tuple[str, ...]]]


class _SharedSnapshot:
    """The shared snapshot, made on first use: from the previous translation's snapshot plus
    the changes when the Translator knows them, else from scratch."""

    __slots__ = ("base", "changes", "value")

    def __init__(self, base: Snapshot | None, changes: Changes | None) -> None:
        self.base, self.changes = base, changes
        self.value: Snapshot | None = None


@dataclass(frozen=True, slots=True)
class Translation:
    """Envoy resources for the mesh. `shared` goes to every node; `per_node` replaces types of
    it for one node: each known node's `NodeServiceMap` under `NODE_TYPE_URL` (named after the
    node), and the outbound Listener of a node with clients of a consumer namespace (its
    consumer filter chains). `shared` also holds the agents' `MeshService` resources
    (`SERVICE_TYPE_URL`, one per Service; node Envoys never ask for that type) and an empty
    `NodeServiceMap` set (a node without a map of its own is told it has none).

    `origins` maps (type_url, resource name) to the user objects ("Kind/ns/name") it carries.
    `node_origins`: per node with a Listener of its own, the objects its consumer chains carry
    (the consumer routes of the namespaces with clients there): they take effect on that node
    only once it holds its own Listener.
    """

    shared: Mapping[str, tuple[Resource, ...]]
    per_node: Mapping[str, Mapping[str, tuple[Resource, ...]]]
    origins: Mapping[tuple[str, str], Origins]
    node_origins: Mapping[str, Origins] = field(default_factory=dict)
    # per object on nodes' own Listeners, the consumer namespaces whose chains carry it: a
    # consumer route's own, and for a policy (or a Service) that its routes carry, those of
    # the routes (not the object's namespace)
    consumer_carriers: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # per node with a Listener of its own: per consumer namespace with clients there, a
    # fingerprint of its chains (equal: that namespace's part of the Listener did not change)
    node_parts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # the parts of the outbound Listener every node has (a node's own adds consumer chains):
    # per destination route configuration, a fingerprint of the chains that use it, and under
    # "" one of the rest (address, port, the connection manager). What an object's traffic
    # goes through is "" and the chains of the destination routes that carry it.
    listener_chains: Mapping[str, int] = field(default_factory=dict)
    _snapshot: _SharedSnapshot = field(
        default_factory=lambda: _SharedSnapshot(None, None), compare=False, repr=False
    )

    def snapshot(self, node: str | None = None) -> Snapshot:
        """The snapshot for `node` (None: the shared one). Nodes without resources of their
        own get the same shared Snapshot object; the others share its TypeSets, with their own
        for the types they replace."""
        shared = self.shared_snapshot()
        extra = self.per_node.get(node, {}) if node is not None else {}
        if not extra:
            return shared
        type_sets = {t: ts for t in shared.type_urls if (ts := shared.type_set(t)) is not None}
        type_sets.update({t: TypeSet(rs) for t, rs in extra.items()})
        return Snapshot.of_type_sets(type_sets)

    def shared_snapshot(self) -> Snapshot:
        lazy = self._snapshot
        if lazy.value is None:
            if lazy.base is not None and lazy.changes is not None:
                lazy.value = lazy.base.updated(lazy.changes)
            else:
                lazy.value = Snapshot(self.shared)
            lazy.base = lazy.changes = None
        return lazy.value


def translate_messages(mesh: ir.Mesh) -> dict[str, list[Message]]:
    """The Envoy messages for `mesh`, by type URL, in a stable order (no memoization)."""
    clusters = [cluster(c) for c in mesh.clusters]
    eds = {c.name: c.eds_cluster_config.service_name for c in clusters}
    destinations, dest_vhosts = l7_destinations(mesh)
    return {
        types.CLUSTER: list(clusters),
        types.ENDPOINT: [load_assignment(e, eds[e.cluster]) for e in mesh.endpoints],
        types.LISTENER: [_listener(mesh, destinations)],  # node_listeners: per node
        types.ROUTE: [
            route_configuration(
                mesh.route_config_name, (virtual_host(v) for v in mesh.virtual_hosts)
            ),
            *(_destination_routes(v) for v in dest_vhosts),
        ],
    }


def node_listeners(mesh: ir.Mesh) -> dict[str, Message]:
    """The outbound Listener of each node that has one of its own (clients of a consumer
    namespace there), by node name (no memoization)."""
    destinations, dest_vhosts = l7_destinations(mesh)
    return {
        node: _listener(mesh, destinations, chains)
        for node, chains in consumer_chains(mesh, destinations, dest_vhosts).items()
    }


def consumer_chains(
    mesh: ir.Mesh, destinations: tuple[Destination, ...], dest_vhosts: tuple[ir.VirtualHost, ...]
) -> dict[str, tuple[ConsumerChain, ...]]:
    """Per node with clients of a consumer namespace: the filter chains that mark them, one for
    connections to the listener itself and one per L7 destination with routes of theirs."""
    if not mesh.consumers:
        return {}
    return _chains_per_node(mesh.consumers, consumer_destinations(destinations, dest_vhosts))


def consumer_destinations(
    destinations: tuple[Destination, ...], dest_vhosts: tuple[ir.VirtualHost, ...]
) -> dict[str, list[Destination]]:
    """Per consumer namespace, the L7 destinations it has routes for."""
    mine = {
        destination_route_name(v.name): cs
        for v in dest_vhosts
        if (cs := [c for c in dict.fromkeys(r.match.consumer for r in v.routes) if c])
    }
    out: dict[str, list[Destination]] = {}
    if mine:
        for d in destinations:
            for c in mine.get(d[2], ()):
                out.setdefault(c, []).append(d)
    return out


def _chains_per_node(
    consumers: tuple[ir.ConsumerSources, ...], overridden: Mapping[str, list[Destination]]
) -> dict[str, tuple[ConsumerChain, ...]]:
    out: dict[str, list[ConsumerChain]] = {}
    for cs in consumers:
        chains = out.setdefault(cs.node, [])
        mine = overridden.get(cs.namespace, ())
        for ip in cs.addresses:
            chains.append(ConsumerChain(cs.namespace, ip))
            chains += [ConsumerChain(cs.namespace, ip, d) for d in mine]
    return {node: tuple(chains) for node, chains in out.items()}


def consumer_origins(mesh: ir.Mesh) -> dict[str, Origins]:
    """Per consumer namespace, the objects whose routes match only its clients."""
    out: dict[str, set[str]] = {}
    for vh in mesh.virtual_hosts:
        for r in vh.routes:
            c = r.match.consumer
            if c:
                out.setdefault(c, set()).update(r.origins)
    return {c: frozenset(o) for c, o in out.items()}


def destination_route_name(vhost: str) -> str:
    """The route configuration that redirected connections to one Service port use."""
    return f"{LISTENER_NAME}/{vhost}"


def l7_destinations(mesh: ir.Mesh) -> tuple[tuple[Destination, ...], tuple[ir.VirtualHost, ...]]:
    """Every (ClusterIP, port) that the node agents send to Envoy (Services that need L7), with
    its route configuration name; and the virtual hosts those route configurations carry.
    A ClusterIP:port claimed by two Services goes to the first by name, as in the node maps."""
    vhosts = {v.name: v for v in mesh.virtual_hosts}
    seen: set[tuple[str, int]] = set()
    destinations: list[Destination] = []
    used: dict[str, ir.VirtualHost] = {}
    for svc in sorted([s for s in mesh.services if s.l7_ports], key=lambda s: s.name):
        for port in svc.l7_ports:
            vh = vhosts.get(f"{svc.name}:{port}")
            if vh is None:
                continue
            for ip in svc.cluster_ips:
                if (ip, port) in seen or not _is_ip(ip):
                    continue
                seen.add((ip, port))
                destinations.append((ip, port, destination_route_name(vh.name)))
                used[vh.name] = vh
    return tuple(destinations), tuple(used[n] for n in sorted(used))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _destination_routes(vh: ir.VirtualHost) -> Message:
    config: Message = destination_route_configuration(
        destination_route_name(vh.name), virtual_host(vh)
    )
    return config


def _listener(
    mesh: ir.Mesh,
    destinations: tuple[Destination, ...] = (),
    consumers: tuple[ConsumerChain, ...] = (),
) -> Message:
    listener: Message = outbound_listener(
        LISTENER_NAME,
        mesh.outbound_address,
        mesh.outbound_port,
        mesh.route_config_name,
        destinations,
        consumers,
        mesh.access_log,
    )
    return listener


_NodeListeners = Mapping[str, tuple[Resource, ...]]
# what a mesh without consumer clients has: the same objects every time (identity fast paths)
_NO_NODE_LISTENERS: _NodeListeners = MappingProxyType({})
_NO_NODE_ORIGINS: Mapping[str, Origins] = MappingProxyType({})
_Parts = Mapping[str, int]  # consumer namespace -> fingerprint of its chains on a node
_NO_NODE_PARTS: Mapping[str, _Parts] = MappingProxyType({})


def _parts(chains: tuple[ConsumerChain, ...]) -> _Parts:
    by_namespace: dict[str, list[ConsumerChain]] = {}
    for c in chains:
        by_namespace.setdefault(c.namespace, []).append(c)
    return {ns: hash(tuple(mine)) for ns, mine in by_namespace.items()}


class _ListenerParts(NamedTuple):
    """The shared outbound Listener, and its bytes in parts for the nodes' own listeners."""

    resource: Resource
    parts: tuple[bytes, bytes, bytes]
    references: tuple[str, ...]
    chains: Mapping[str, int]  # see `Translation.listener_chains`


def _listener_parts(mesh: ir.Mesh, destinations: tuple[Destination, ...]) -> _ListenerParts:
    """`Resource.from_message(_listener(mesh, destinations))`, encoded without the message."""
    parts = outbound_listener_parts(
        LISTENER_NAME,
        mesh.outbound_address,
        mesh.outbound_port,
        mesh.route_config_name,
        destinations,
        mesh.access_log,
    )
    references = outbound_listener_routes(mesh.route_config_name, destinations)
    resource = Resource.from_payload(
        types.LISTENER, LISTENER_NAME, b"".join(parts), _decode_listener, references=references
    )
    by_route: dict[str, list[Destination]] = {}
    for d in destinations:
        by_route.setdefault(d[2], []).append(d)
    chains = {name: hash(tuple(sorted(ds))) for name, ds in by_route.items()}
    chains[""] = hash(
        (mesh.outbound_address, mesh.outbound_port, mesh.route_config_name, mesh.access_log)
    )
    return _ListenerParts(resource, parts, references, chains)


def _node_listener(
    mesh: ir.Mesh,
    shared: _ListenerParts,
    chains: tuple[ConsumerChain, ...],
    made: dict[ConsumerChain, bytes] | None = None,
) -> Resource:
    """`_listener(mesh, destinations, chains)` as a Resource: the shared listener's bytes with
    the node's consumer chains spliced in after the destinations'. `made`: each chain's bytes
    from before (for this listener port and route configuration), and gets the new ones."""
    head, destination_chains, tail = shared.parts
    if made is None:
        made = {}
    pieces = []
    for c in chains:
        b = made.get(c)
        if b is None:
            b = made[c] = consumer_chains_bytes(
                LISTENER_NAME, mesh.outbound_port, mesh.route_config_name, (c,), mesh.access_log
            )
        pieces.append(b)
    mine = b"".join(pieces)
    # The route configurations its chains were encoded with, as the snapshot check reads them:
    # the shared listener's, and each consumer chain's own.
    references = set(shared.references)
    for c in chains:
        references.add(mesh.route_config_name if c.destination is None else c.destination[2])
    return Resource.from_payload(
        types.LISTENER,
        LISTENER_NAME,
        head + destination_chains + mine + tail,
        _decode_listener,
        references=tuple(sorted(references)),
    )


def _decode_listener(payload: bytes) -> Message:
    message: Message = listener_pb2.Listener.FromString(payload)
    return message


def _decode_route_configuration(payload: bytes) -> Message:
    message: Message = route_pb2.RouteConfiguration.FromString(payload)
    return message


def _vhost_bytes(vh: ir.VirtualHost) -> tuple[bytes, bytes]:
    routes = virtual_host_routes(vh)
    return routes, virtual_host_entry(vh, routes)


def _cluster_resource(c: ir.Cluster) -> tuple[Resource, str]:
    """The Cluster resource and its EDS service name."""
    encoded = cluster_bytes(c)
    if encoded is None:
        message = cluster(c)
        resource = Resource.from_message(message, name=c.name, type_url=types.CLUSTER)
        return resource, message.eds_cluster_config.service_name
    payload, eds_name = encoded
    # hand-encoded Clusters are EDS clusters with this service name (tests/xds/test_cluster_bytes)
    resource = Resource.from_payload(
        types.CLUSTER, c.name, payload, _decode_cluster, references=(eds_name,)
    )
    return resource, eds_name


def _decode_cluster(payload: bytes) -> Message:
    message: Message = cluster_pb2.Cluster.FromString(payload)
    return message


def _decode_cla(payload: bytes) -> Message:
    message: Message = endpoint_pb2.ClusterLoadAssignment.FromString(payload)
    return message


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


@dataclass(slots=True)
class _Last:
    """What the previous `translate` saw and made, for the identity fast paths."""

    mesh: ir.Mesh
    translation: Translation
    eds_names: dict[str, str]
    cluster_origins: dict[str, Origins]
    node_listeners: _NodeListeners


_routes_of = attrgetter("routes")
_origins_of = attrgetter("origins")


def _changed_positions(old: tuple[object, ...], new: tuple[object, ...]) -> list[int] | None:
    """Positions whose item is not the same object, or None when the lengths differ."""
    if len(old) != len(new):
        return None
    return list(compress(range(len(new)), map(is_not, old, new)))


def _same_l7(a: ir.ServiceInfo, b: ir.ServiceInfo) -> bool:
    """The same facts for the L7 destinations: name, L7 ports, and for a Service with L7
    ports its ClusterIPs."""
    return (
        a.name == b.name
        and a.l7_ports == b.l7_ports
        and (not a.l7_ports or a.cluster_ips == b.cluster_ips)
    )


def _delta(
    old: tuple[Resource, ...], new: tuple[Resource, ...]
) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
    """(resources new or replaced, names gone) from `old` to `new`."""
    positions = _changed_positions(old, new)
    if positions is not None and all(old[i].name == new[i].name for i in positions):
        return tuple(new[i] for i in positions), ()
    before = {r.name: r for r in old}
    names = {r.name for r in new}
    upserts = tuple(r for r in new if before.get(r.name) is not r)
    return upserts, tuple(n for n in before if n not in names)


class Translator:
    """Memoizing translator. Not thread-safe; one per pipeline.

    Fast paths rely on the build keeping unchanged IR objects (and unchanged tuples of them) by
    identity: an unchanged tuple is not looked at, and a changed one is compared position by
    position with `is`, so one endpoint change costs one ClusterLoadAssignment."""

    def __init__(self) -> None:
        self._clusters: _Memo[str, ir.Cluster, tuple[Resource, str]] = _Memo(_cluster_resource)
        self._endpoints: _Memo[str, tuple[ir.ClusterEndpoints, str], Resource] = _Memo(
            lambda pair: Resource.from_payload(
                types.ENDPOINT, pair[1], load_assignment_bytes(*pair), _decode_cla
            )
        )
        # Per virtual host: (its routes' bytes, its entry in the outbound configuration). The
        # routes' bytes are shared with its destination route configuration, if it has one.
        self._vhosts: _Memo[str, ir.VirtualHost, tuple[bytes, bytes]] = _Memo(_vhost_bytes)
        self._route: tuple[str, tuple[ir.VirtualHost, ...], Resource] | None = None
        self._listener: (
            tuple[tuple[str, int, str, str, tuple[Destination, ...]], _ListenerParts] | None
        ) = None
        # the nodes' own listeners: (what they were made from, by node, their origins, their
        # parts per namespace)
        self._node_listeners: tuple[
            tuple[object, ...], _NodeListeners, Mapping[str, Origins], Mapping[str, _Parts]
        ] = ((), _NO_NODE_LISTENERS, _NO_NODE_ORIGINS, _NO_NODE_PARTS)
        self._dest_routes: _Memo[str, ir.VirtualHost, Resource] = _Memo(self._destination_route)
        self._destinations: (
            tuple[
                tuple[object, tuple[ir.VirtualHost, ...]],
                tuple[tuple[Destination, ...], tuple[ir.VirtualHost, ...]],
                tuple[Resource, ...],
            ]
            | None
        ) = None
        self._node_chains: dict[str, tuple[tuple[ConsumerChain, ...], tuple[Resource, ...]]] = {}
        self._chain_bytes: dict[ConsumerChain, bytes] = {}
        self._chain_bytes_key: tuple[int, str, str] | None = None
        # (what they were made from, consumer_destinations, consumer_origins, and those
        # inverted: per object, the consumer namespaces that carry it)
        self._consumer_routes: tuple[
            tuple[object, ...],
            Mapping[str, list[Destination]],
            Mapping[str, Origins],
            Mapping[str, frozenset[str]],
        ] = ((), {}, {}, {})
        self._service_maps = ServiceMaps()
        self._dest_services: tuple[ir.ServiceInfo, ...] = ()  # what _destinations was made from
        # (the Services before, where they changed): computed once per translation
        self._services_changed: tuple[tuple[ir.ServiceInfo, ...], list[int] | None] = ((), None)
        self._last: _Last | None = None

    def translate(self, mesh: ir.Mesh) -> Translation:
        last = self._last
        if last is not None and last.mesh is mesh:
            return last.translation
        same_clusters = last is not None and last.mesh.clusters is mesh.clusters
        if last is not None and same_clusters:
            clusters = last.translation.shared[types.CLUSTER]
            eds_names, cluster_origins = last.eds_names, last.cluster_origins
        else:
            new_clusters: dict[str, tuple[ir.Cluster, tuple[Resource, str]]] = {}
            made = [self._clusters.get(c.name, c, new_clusters) for c in mesh.clusters]
            self._clusters.swap(new_clusters)
            clusters = tuple([r for r, _ in made])
            cluster_origins, eds_names = {}, {}
            for c, (_, eds_name) in zip(mesh.clusters, made, strict=True):
                cluster_origins[c.name] = frozenset(c.origins)
                eds_names[c.name] = eds_name

        endpoints, endpoint_upserts = self._endpoint_resources(
            mesh, last if same_clusters else None, eds_names
        )
        route = self._route_resource(mesh)
        prev = self._destinations
        (destinations, dest_vhosts), dest_routes = self._destination_resources(mesh)
        same_destinations = prev is not None and prev[1][1] is dest_vhosts
        key = (
            mesh.outbound_address,
            mesh.outbound_port,
            mesh.route_config_name,
            mesh.access_log,
            destinations,
        )
        if self._listener is None or self._listener[0] != key:
            self._listener = (key, _listener_parts(mesh, destinations))
        listener = self._listener[1]
        node_listeners, node_origins, node_parts = self._node_listener_resources(
            mesh, listener, destinations, dest_vhosts
        )
        shared = {
            types.CLUSTER: clusters,
            types.ENDPOINT: endpoints,
            types.LISTENER: (listener.resource,),
            types.ROUTE: (route, *dest_routes),
        }

        # Same clusters and the same endpoint names (patched in place): the origins stand.
        if (
            last is not None
            and endpoint_upserts is not None
            and last.mesh.virtual_hosts is mesh.virtual_hosts
            and same_destinations
        ):
            origins = last.translation.origins
        else:
            origins = self._origins(mesh, cluster_origins, eds_names, route, dest_vhosts)

        service_upserts: tuple[Resource, ...] | None = None
        # The node agents' feed. Every node's own NodeServiceMap is in per_node; the shared
        # set is empty, so a node without one (a Node deleted, one --node-selector leaves out,
        # or any node while the mesh has no Node at all) is told it has none. Its agent still
        # follows the MeshServices, made whether or not the mesh has nodes: it balances L4
        # Services and refuses connections to L7 ones, which need a node Envoy it does not
        # know (fail closed, never past the mesh's routes and policies).
        shared[NODE_TYPE_URL] = ()
        if last is not None and last.mesh.services is mesh.services:
            shared[SERVICE_TYPE_URL] = last.translation.shared[SERVICE_TYPE_URL]
        else:
            shared[SERVICE_TYPE_URL] = self._service_maps.service_resources(
                mesh.services, *self._services_changed
            )
            service_upserts = self._service_maps.upserts
        if last is not None and (
            last.mesh.node_infos is mesh.node_infos
            and last.mesh.socket_redirect is mesh.socket_redirect
            and last.mesh.outbound_port == mesh.outbound_port
            and last.node_listeners is node_listeners
        ):
            per_node = last.translation.per_node
        else:
            mine: dict[str, dict[str, tuple[Resource, ...]]] = {
                node: {NODE_TYPE_URL: (r,)}
                for node, r in self._service_maps.node_resources(
                    mesh.node_infos, mesh.outbound_port, mesh.socket_redirect
                ).items()
            }
            for node, resources in node_listeners.items():
                mine.setdefault(node, {})[types.LISTENER] = resources
            per_node = mine

        lazy = _SharedSnapshot(None, None)
        if last is not None and (base := last.translation._snapshot.value) is not None:
            old = last.translation.shared
            changes = {
                t: d
                for t in shared
                if old.get(t) is not shared[t]
                and (
                    d := (endpoint_upserts, ())
                    if t == types.ENDPOINT and endpoint_upserts is not None
                    else (service_upserts, ())
                    if t == SERVICE_TYPE_URL and service_upserts is not None
                    else _delta(old.get(t, ()), shared[t])
                )
                != ((), ())
            }
            if shared.keys() == old.keys():
                lazy = _SharedSnapshot(base, changes)
        translation = Translation(
            shared=shared,
            per_node=per_node,
            origins=origins,
            node_origins=node_origins,
            consumer_carriers=self._consumer_routes[3] if node_origins else {},
            node_parts=node_parts,
            listener_chains=listener.chains,
            _snapshot=lazy,
        )
        self._last = _Last(mesh, translation, eds_names, cluster_origins, node_listeners)
        return translation

    def _node_listener_resources(
        self,
        mesh: ir.Mesh,
        shared: _ListenerParts,
        destinations: tuple[Destination, ...],
        dest_vhosts: tuple[ir.VirtualHost, ...],
    ) -> tuple[_NodeListeners, Mapping[str, Origins], Mapping[str, _Parts]]:
        """The listeners of nodes with consumer clients, the objects each carries and its
        parts per namespace (the same objects while what they are made from is the same; each
        node's Resource kept while its chains are, each chain's bytes while it is made)."""
        made_from, last, last_origins, last_parts = self._node_listeners
        key = (mesh.consumers, shared, dest_vhosts, mesh.virtual_hosts)
        if made_from and all(a is b for a, b in zip(made_from, key, strict=True)):
            return last, last_origins, last_parts
        if not mesh.consumers:
            self._node_chains, self._chain_bytes = {}, {}
            self._node_listeners = (key, _NO_NODE_LISTENERS, _NO_NODE_ORIGINS, _NO_NODE_PARTS)
            return _NO_NODE_LISTENERS, _NO_NODE_ORIGINS, _NO_NODE_PARTS
        # what depends on the routes only: made again when they change (not for a pod)
        routes_key = (destinations, dest_vhosts, mesh.virtual_hosts)
        was_made_from = self._consumer_routes[0]
        if not was_made_from or not all(
            a is b for a, b in zip(was_made_from, routes_key, strict=True)
        ):
            found = consumer_origins(mesh)
            carriers: dict[str, set[str]] = {}
            for namespace, carried in found.items():
                for origin in carried:
                    carriers.setdefault(origin, set()).add(namespace)
            self._consumer_routes = (
                routes_key,
                consumer_destinations(destinations, dest_vhosts),
                found,
                {o: frozenset(c) for o, c in carriers.items()},
            )
        _, overridden, by_namespace, _ = self._consumer_routes
        chains = _chains_per_node(mesh.consumers, overridden)
        # a chain's bytes depend on the listener port and route configuration name too
        bytes_key = (mesh.outbound_port, mesh.route_config_name, mesh.access_log)
        if self._chain_bytes_key != bytes_key:
            self._chain_bytes, self._chain_bytes_key = {}, bytes_key
        made = dict(self._chain_bytes)
        out: dict[str, tuple[Resource, ...]] = {}
        for node, mine in chains.items():
            was = self._node_chains.get(node)
            if was is not None and was[0] == mine and made_from and made_from[1] is shared:
                out[node] = was[1]
            else:
                out[node] = (_node_listener(mesh, shared, mine, made),)
        self._node_chains = {node: (chains[node], out[node]) for node in out}
        self._chain_bytes = {c: made[c] for mine in chains.values() for c in mine if c in made}
        origins = {
            node: frozenset().union(*(by_namespace.get(c.namespace, ()) for c in mine))
            for node, mine in chains.items()
        }
        parts = {node: _parts(mine) for node, mine in chains.items()}
        self._node_listeners = (key, out, origins, parts)
        return out, origins, parts

    def _endpoint_resources(
        self, mesh: ir.Mesh, last: _Last | None, eds_names: Mapping[str, str]
    ) -> tuple[tuple[Resource, ...], tuple[Resource, ...] | None]:
        """The ClusterLoadAssignments, and which of them are new when the names are the same
        as last time (None when that is not known)."""
        if last is not None:
            old_ir, old = last.mesh.endpoints, last.translation.shared[types.ENDPOINT]
            if old_ir is mesh.endpoints:
                return old, ()
            positions = _changed_positions(old_ir, mesh.endpoints)
            if positions is not None and all(
                old_ir[i].cluster == mesh.endpoints[i].cluster for i in positions
            ):
                out = list(old)
                memo = self._endpoints
                upserts = []
                for i in positions:
                    e = mesh.endpoints[i]
                    r = memo.get(e.cluster, (e, eds_names[e.cluster]), memo._last)
                    if r is not out[i]:
                        out[i] = r
                        upserts.append(r)
                return tuple(out), tuple(upserts)
        new_eps: dict[str, tuple[tuple[ir.ClusterEndpoints, str], Resource]] = {}
        endpoints = tuple(
            self._endpoints.get(e.cluster, (e, eds_names[e.cluster]), new_eps)
            for e in mesh.endpoints
        )
        self._endpoints.swap(new_eps)
        return endpoints, None

    @staticmethod
    def _origins(
        mesh: ir.Mesh,
        cluster_origins: Mapping[str, Origins],
        eds_names: Mapping[str, str],
        route: Resource,
        dest_vhosts: tuple[ir.VirtualHost, ...] = (),
    ) -> dict[tuple[str, str], Origins]:
        origins: dict[tuple[str, str], Origins] = {}
        for name, o in cluster_origins.items():
            origins[(types.CLUSTER, name)] = o
        for e in mesh.endpoints:
            origins[(types.ENDPOINT, eds_names[e.cluster])] = cluster_origins.get(
                e.cluster, frozenset()
            )
        # chained iterators, not loops: 10,000 virtual hosts and their routes
        vhosts = mesh.virtual_hosts
        routes = chain.from_iterable(map(_routes_of, vhosts))
        origins[(types.ROUTE, route.name)] = frozenset(
            chain(
                chain.from_iterable(map(_origins_of, vhosts)),
                chain.from_iterable(map(_origins_of, routes)),
            )
        )
        for v in dest_vhosts:
            origins[(types.ROUTE, destination_route_name(v.name))] = frozenset(
                {*v.origins, *(o for rt in v.routes for o in rt.origins)}
            )
        return origins

    def _destination_resources(
        self, mesh: ir.Mesh
    ) -> tuple[tuple[tuple[Destination, ...], tuple[ir.VirtualHost, ...]], tuple[Resource, ...]]:
        """The L7 destinations and their route configurations, recomputed only when the virtual
        hosts changed (identity) or the name, ClusterIPs or ports of a Service that needs L7
        did (an endpoint change replaces a ServiceInfo but changes none of these); each route
        configuration is memoized per virtual host."""
        last = self._destinations
        services, self._dest_services = self._dest_services, mesh.services
        positions = _changed_positions(services, mesh.services)
        self._services_changed = (services, positions)  # for the agent feed, same question
        if last is not None and last[0][1] is mesh.virtual_hosts:
            # Services replaced at a few positions (an endpoint change): the same L7 facts
            # there mean the same destinations, without looking at the 10,000 others
            if positions is not None and all(
                _same_l7(services[i], mesh.services[i]) for i in positions
            ):
                return last[1], last[2]
        l7 = tuple((s.name, s.cluster_ips, s.l7_ports) for s in mesh.services if s.l7_ports)
        if last is not None and last[0][1] is mesh.virtual_hosts and last[0][0] == l7:
            return last[1], last[2]
        key = (l7, mesh.virtual_hosts)
        found = l7_destinations(mesh)
        new: dict[str, tuple[ir.VirtualHost, Resource]] = {}
        resources = tuple(self._dest_routes.get(v.name, v, new) for v in found[1])
        self._dest_routes.swap(new)
        self._destinations = (key, found, resources)
        return found, resources

    def _route_resource(self, mesh: ir.Mesh) -> Resource:
        last = self._route
        vhosts = mesh.virtual_hosts
        if last is not None and last[1] is vhosts and last[0] == mesh.route_config_name:
            return last[2]
        if (
            last is not None
            and last[0] == mesh.route_config_name
            and len(last[1]) == len(vhosts)
            and all(a is b or a == b for a, b in zip(last[1], vhosts, strict=True))
        ):
            return last[2]
        new: dict[str, tuple[ir.VirtualHost, tuple[bytes, bytes]]] = {}
        entries = [self._vhosts.get(v.name, v, new)[1] for v in vhosts]
        self._vhosts.swap(new)
        resource = Resource.from_payload(
            types.ROUTE,
            mesh.route_config_name,
            route_configuration_bytes(mesh.route_config_name, entries),
            _decode_route_configuration,
        )
        self._route = (mesh.route_config_name, vhosts, resource)
        return resource

    def _destination_route(self, vh: ir.VirtualHost) -> Resource:
        name = destination_route_name(vh.name)
        last = self._vhosts._last.get(vh.name)  # made by _route_resource for this translation
        routes = last[1][0] if last is not None and (last[0] is vh or last[0] == vh) else None
        return Resource.from_payload(
            types.ROUTE,
            name,
            destination_route_configuration_bytes(name, vh, routes),
            _decode_route_configuration,
        )

    @property
    def serialized(self) -> int:
        """How many cluster and endpoint resources were serialized so far (for tests, bench)."""
        return self._clusters.made + self._endpoints.made

    @property
    def service_maps_made(self) -> int:
        """How many agent feed resources (MeshService, NodeServiceMap) were made so far."""
        return self._service_maps.made
