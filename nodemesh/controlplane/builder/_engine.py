"""The build engine: per-object results and a dependency index, so that a build after a change
recomputes only what the changed objects affect and reuses every other IR object by identity.

A cold engine treats every object as changed; a warm one takes the changed keys from the store
view (`StoreView.changed_since`) or, for other inputs, from an identity diff per kind. What a
route or a policy depends on is recorded while it is read (the Services it looked up, found
or not), so that a Service that appears, changes or goes away re-reads exactly
the routes and policies that asked for it.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from nodemesh.controlplane.builder._routes import RouteEntry, RouteModel
from nodemesh.controlplane.builder._selector import LabelSelector
from nodemesh.controlplane.builder._util import as_map, generation
from nodemesh.controlplane.builder.endpointslice import (
    merge_endpoints,
    slice_endpoints,
    slice_service,
)
from nodemesh.controlplane.builder.grpcroute import read_grpcroute
from nodemesh.controlplane.builder.httproute import read_httproute
from nodemesh.controlplane.builder.node import ConsumerIndex, NodeIndex
from nodemesh.controlplane.builder.service import (
    CLUSTER_DOMAIN,
    ServiceModel,
    Unhonoured,
    affinity_overridden,
    local_unhonoured,
    read_service,
    unhonoured_message,
    zone_setting,
    zones_unhonoured,
)
from nodemesh.controlplane.builder.socketredirect import SocketRedirectIndex
from nodemesh.controlplane.builder.trafficpolicy import (
    PolicySettings,
    RetrySpec,
    TrafficPolicyModel,
    read_traffic_policy,
    settings_for,
)
from nodemesh.controlplane.conditions import Condition
from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds.translate import ir

__all__ = ["BuildResult", "Engine", "Objects"]

Objects = Mapping[ObjectKey, Mapping[str, Any]]
Ref = tuple[str, str]  # (namespace, Service name)
PortKey = tuple[str, str, int]  # (namespace, Service name, port)
VhostKey = tuple[str, str, int]  # (namespace, Service name, index in the Service's ports)

_ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
_READERS: Mapping[str, Callable[[Mapping[str, Any], Mapping[Ref, ServiceModel]], Any]] = {
    "HTTPRoute": read_httproute,
    "GRPCRoute": read_grpcroute,
}
_INPUT_KINDS = (
    "Service",
    "EndpointSlice",
    "Pod",
    "Node",
    "HTTPRoute",
    "GRPCRoute",
    "TrafficPolicy",
)
_ANY: Any = ("*", "*")  # recorded when a reader iterates a whole mapping


@dataclass(frozen=True, slots=True)
class BuildResult:
    mesh: ir.Mesh
    conditions: Mapping[ObjectKey, tuple[Condition, ...]]


K = TypeVar("K")
V = TypeVar("V")


class _Lookups(Mapping[K, V]):
    """A read-only mapping that records every key asked for (hits and misses)."""

    __slots__ = ("_data", "seen")

    def __init__(self, data: Mapping[K, V]) -> None:
        self._data = data
        self.seen: set[K] = set()

    def __getitem__(self, key: K) -> V:
        self.seen.add(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)  # type: ignore[arg-type]
        return key in self._data

    def get(self, key: K, default: Any = None) -> Any:
        self.seen.add(key)
        return self._data.get(key, default)

    def __iter__(self) -> Iterator[K]:
        self.seen.add(_ANY)
        return iter(self._data)

    def __len__(self) -> int:
        self.seen.add(_ANY)
        return len(self._data)


class _Ordered(Generic[K, V]):
    """Items kept in key order; `result()` gives them as a tuple, the same tuple object while
    nothing changed, and patches positions in place when only values changed."""

    def __init__(self) -> None:
        self._items: dict[K, V] = {}
        self._keys: list[Any] = []  # sorted; K is a tuple of str/int
        self._pos: dict[K, int] = {}
        self._tuple: tuple[V, ...] = ()
        self._pending: set[K] = set()

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def set(self, key: K, value: V) -> None:
        if self._items.get(key) is not value:
            self._items[key] = value
            self._pending.add(key)

    def put(self, key: K, value: V) -> None:
        """`set`, keeping the item already there when it is equal to `value` (its identity is
        what the translator's fast paths compare)."""
        old = self._items.get(key)
        if old is None or (old is not value and old != value):
            self._items[key] = value
            self._pending.add(key)

    def remove(self, key: K) -> None:
        if self._items.pop(key, None) is not None:
            self._pending.add(key)

    def result(self) -> tuple[V, ...]:
        pending, items = self._pending, self._items
        if not pending:
            return self._tuple
        # Nothing placed yet (a cold build): sort, without looking for moves one by one.
        moved = [k for k in pending if (k in items) != (k in self._pos)] if self._pos else None
        if moved is not None and not moved:
            values = list(self._tuple)
            for k in pending:
                values[self._pos[k]] = items[k]
        else:
            if moved is None or len(moved) > 64:
                self._keys = sorted(items)
            else:
                for k in moved:
                    if k in items:
                        insort(self._keys, k)
                    else:
                        del self._keys[bisect_left(self._keys, k)]
            self._pos = dict(zip(self._keys, range(len(self._keys)), strict=True))
            values = [items[k] for k in self._keys]
        pending.clear()
        self._tuple = tuple(values)
        return self._tuple


@dataclass(frozen=True, slots=True)
class _Conflict:
    """Where one parentRef of an HTTPRoute lost to GRPCRoutes on a Service: the ports, the
    GRPCRoutes that took them, and whether it kept any port of that Service."""

    ports: frozenset[int]
    winners: frozenset[str]
    kept: bool


def _one_kind_each(
    pairs: list[tuple[ObjectKey, RouteEntry]],
    port: int,
    conflicts: dict[ObjectKey, dict[str, _Conflict]],
) -> list[RouteEntry]:
    """One Service port's entries (sorted), but where GRPCRoutes and HTTPRoutes both attach
    (among the producer's routes, or one consumer namespace's), the GRPCRoutes' only: GEP-1294
    says a Service port takes one route kind, GRPCRoute first. Each HTTPRoute parentRef's
    lost and kept ports are added to `conflicts` (its `repeat` entries too, which are not
    returned); the caller drops the routes that lost nothing once every port is done."""
    grpc: dict[str, set[str]] = {}  # consumer ("" for the producer) -> its GRPCRoutes
    for k, e in pairs:
        if k.kind == "GRPCRoute":
            grpc.setdefault(e.route.match.consumer, set()).add(f"{k.kind}/{k.namespace}/{k.name}")
    out = []
    for k, e in pairs:
        if k.kind != "HTTPRoute":
            if not e.repeat:
                out.append(e)
            continue
        winners = grpc.get(e.route.match.consumer)
        mine = conflicts.setdefault(k, {})
        was = mine.get(e.label, _Conflict(frozenset(), frozenset(), False))
        if winners:
            mine[e.label] = replace(was, ports=was.ports | {port}, winners=was.winners | winners)
        else:
            mine[e.label] = replace(was, kept=True)
            if not e.repeat:
                out.append(e)
    return out


def _finish(
    entry: RouteEntry, policy: PolicySettings | None, lbs: Mapping[str, ir.LoadBalancer]
) -> ir.Route:
    """Apply policy defaults under the route's own settings (route wins, field by field)."""
    r = entry.route
    if (
        policy is None
        and entry.retry is None
        and entry.timeout_ms is None
        and entry.backend_timeout_ms is None
        and (
            r.redirect is not None
            or not r.backends
            or (
                r.retry is None
                and r.timeout_ms is None
                and r.idle_timeout_ms is None
                and r.fault is None
                and not r.hash_header
                and not r.hash_cookie
                and r.hash_cookie_ttl_ms is None
                and not r.hash_source_ip
                and not any(b.cluster in lbs for b in r.backends)
            )
        )
    ):
        return r  # nothing to apply: what the general path below would give, equal
    policy = policy or _NO_POLICY
    retry: RetrySpec | None = entry.retry.over(policy.retry) if entry.retry else policy.retry
    if entry.backend_timeout_ms is not None:
        base = retry if retry is not None else RetrySpec(attempts=0)
        retry = RetrySpec(per_try_timeout_ms=entry.backend_timeout_ms).over(base)
    hash_lb = next((lbs[b.cluster] for b in r.backends if b.cluster in lbs), None)
    origins = r.origins + tuple(
        o for o in policy.origins if policy.route_level and o not in r.origins
    )
    if r.redirect is not None or not r.backends:
        return replace(r, origins=origins)
    return replace(
        r,
        retry=retry.to_ir() if retry is not None else None,
        timeout_ms=entry.timeout_ms if entry.timeout_ms is not None else policy.request_timeout_ms,
        idle_timeout_ms=policy.idle_timeout_ms,
        fault=policy.fault,
        hash_header=hash_lb.hash_header if hash_lb else "",
        hash_cookie=hash_lb.hash_cookie if hash_lb else "",
        hash_cookie_ttl_ms=hash_lb.hash_cookie_ttl_ms if hash_lb else None,
        hash_source_ip=hash_lb.hash_source_ip if hash_lb else False,
        origins=origins,
    )


def _ip_ports(svc: ServiceModel | None) -> tuple[tuple[str, int], ...]:
    """A Service's (ClusterIP, port)s, in its order (so equal models give equal tuples)."""
    if svc is None or not svc.cluster_ips:
        return ()
    if len(svc.cluster_ips) == 1 and len(svc.ports) == 1:  # most Services: no generator
        return ((svc.cluster_ips[0], svc.ports[0].port),)
    return tuple((ip, p.port) for ip in svc.cluster_ips for p in svc.ports)


def _redirect_port(r: ir.Route, port: int) -> ir.Route:
    """Gateway API's port for a redirect that sets none, on Service port `port`: the scheme's
    well-known port when it sets a scheme, and otherwise the listener's (for a Service, its
    port; left out for 80). Envoy kept the request's port for a scheme change
    (https://web.shop:8080/), dropped it for a new hostname, and for a new path or status
    code alone kept the Host as the client wrote it: `web.shop`, which a client may write for
    a Service whose one port is 8080, was sent to port 80."""
    rd = r.redirect
    if rd is None or rd.port is not None:
        return r
    if rd.scheme:
        well_known = {"http": 80, "https": 443}.get(rd.scheme.lower())
        return replace(r, redirect=replace(rd, port=well_known)) if well_known else r
    if port != 80:
        return replace(r, redirect=replace(rd, port=port))
    return r


_NO_POLICY = PolicySettings()
_NO_KEYS: frozenset[Any] = frozenset()


def _policy_conditions(pol: TrafficPolicyModel, gen: int) -> tuple[Condition, ...]:
    if pol.problems:
        return (
            Condition("Accepted", "False", "Invalid", "; ".join(pol.problems), gen),
            Condition("ResolvedRefs", "Unknown", "Invalid", "policy is invalid", gen),
        )
    message = "Policy is accepted"
    if pol.overridden:
        # Where, too: a section that lost on one port (to a policy naming that port) still
        # applies on the others.
        message += "; overridden by older or more specific policies: " + ", ".join(
            f"{section} on {', '.join(f'{ns}/{name}:{port}' for ns, name, port in sorted(where))}"
            f" by {winner}"
            for (section, winner), where in sorted(pol.overridden.items())
        )
    if pol.headless and any(s.route_level for s in pol.sections.values()):
        # as a route's parentRef there would be (NoMatchingParent): its clients connect to
        # its pods, not through a ClusterIP the node agents send to Envoy
        message += (
            f"; headless (clusterIP: None): {', '.join(pol.headless)}: its clients connect to "
            "its pods directly, so retry, request and idle timeouts and fault injection do not "
            "apply to them; the cluster settings apply where it is a route's backend"
        )
    resolved = (
        Condition("ResolvedRefs", "False", "TargetNotFound", "; ".join(pol.unresolved), gen)
        if pol.unresolved
        else Condition("ResolvedRefs", "True", "ResolvedRefs", "All targets resolved", gen)
    )
    return (Condition("Accepted", "True", "Accepted", message, gen), resolved)


# A Service's sessionAffinity ClientIP, on the ports the node Envoy takes (unless a
# TrafficPolicy's loadBalancer applies there): a ring hash on the client's address, so that a
# client pod's requests go to one endpoint while the endpoints stay.
AFFINITY_LB = ir.LoadBalancer("RingHash", hash_source_ip=True)


def _lb(svc: ServiceModel, s: PolicySettings | None) -> ir.LoadBalancer | None:
    """A port's load balancer: its policy's, else the Service's affinity's, else none."""
    if s is not None and s.lb is not None:
        return s.lb
    return AFFINITY_LB if svc.client_ip_affinity else None


class _Lbs(Mapping[str, ir.LoadBalancer]):
    """Cluster name -> its hashing load balancer (what `_finish` reads)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def _lb(self, name: object) -> ir.LoadBalancer | None:
        engine = self._engine
        pk = engine.cluster_keys.get(name)  # type: ignore[call-overload]
        svc = engine.services.get(pk[:2]) if pk is not None else None
        if svc is None:
            return None
        lb = _lb(svc, engine.settings.get(pk))
        hashing = lb is not None and (lb.hash_header or lb.hash_cookie or lb.hash_source_ip)
        return lb if hashing else None

    def __getitem__(self, name: str) -> ir.LoadBalancer:
        lb = self._lb(name)
        if lb is None:
            raise KeyError(name)
        return lb

    def __contains__(self, name: object) -> bool:
        return self._lb(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (n for n in self._engine.cluster_keys if self._lb(n) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class Engine:
    """The state one `BuildMemo` carries from build to build. Not thread-safe."""

    def __init__(self, cluster_domain: str = CLUSTER_DOMAIN) -> None:
        # the cluster's DNS domain (kubelet's --cluster-domain): in every Service's FQDN, so a
        # memo is for one domain (`build` starts again from scratch for another)
        self.cluster_domain = cluster_domain
        self.source: object = None
        self.revision = -1
        self.last: dict[str, Mapping[ObjectKey, Mapping[str, Any]]] = {}
        self.services: dict[Ref, ServiceModel] = {}
        self.name_ns: dict[str, set[str]] = {}
        # (ClusterIP, port) -> the Services that give it (more than one only in files mode)
        self.ip_refs: dict[tuple[str, int], set[Ref]] = {}
        # EndpointSlices
        self.slice_ref: dict[ObjectKey, Ref] = {}
        self.slices_of: dict[Ref, set[ObjectKey]] = {}
        self.slice_read: dict[
            ObjectKey, tuple[Mapping[str, Any], ServiceModel, dict[Any, Any]]
        ] = {}
        self.eps: dict[PortKey, tuple[ir.Endpoint, ...]] = {}
        self.eps_ports: dict[Ref, tuple[PortKey, ...]] = {}
        # TrafficPolicies
        self.policies: dict[ObjectKey, tuple[TrafficPolicyModel, int]] = {}
        self.settings: dict[PortKey, PolicySettings] = {}
        self.policy_deps: set[Ref] = set()
        # Routes
        self.routes: dict[ObjectKey, RouteModel] = {}
        self.route_parents: dict[ObjectKey, set[Ref]] = {}
        self.route_deps: dict[ObjectKey, set[Ref]] = {}
        self.svc_dependents: dict[Ref, set[ObjectKey]] = {}
        self.attached: dict[Ref, dict[ObjectKey, list[RouteEntry]]] = {}
        # HTTPRoutes left out where a GRPCRoute takes the same Service port (GEP-1294), per
        # Service: route -> parentRef label -> what `_Conflict` says
        self.conflicts: dict[Ref, dict[ObjectKey, dict[str, _Conflict]]] = {}
        self.conflicts_changed: set[ObjectKey] = set()
        self.route_used: dict[PortKey, int] = {}
        self.cluster_users: dict[PortKey, set[ObjectKey]] = {}
        self.cluster_keys: dict[str, PortKey] = {}  # cluster name -> (ns, name, port)
        self.lbs = _Lbs(self)
        # Every port of a Service keeps its own cluster, used by a route or not: a route that
        # takes a port over from its default route would otherwise remove that cluster in the
        # same update, and Envoy, which applies CDS before the new routes, would answer the
        # requests of that moment 503 (no cluster). Clusters go only with their Service port.
        self.own_ports: dict[Ref, set[PortKey]] = {}
        # consumer routes: namespace -> its routes with a parent in another namespace
        self.consumer_routes: dict[str, set[ObjectKey]] = {}
        self.consumer_index = ConsumerIndex()
        self.port_clusters: set[PortKey] = set()
        # Services the mesh carries with Local, ClientIP or a request for topology-aware
        # routing (the node agents honour them, the node Envoy not all): what their notice is
        # made from (their key, the zone setting's name, their generation)
        self.service_notes: dict[Ref, tuple[ObjectKey, str, int]] = {}
        # Outputs
        self.conditions: dict[ObjectKey, tuple[Condition, ...]] = {}
        self.vhosts: _Ordered[VhostKey, ir.VirtualHost] = _Ordered()
        self.vhost_keys: dict[Ref, tuple[VhostKey, ...]] = {}
        self.clusters: _Ordered[PortKey, ir.Cluster] = _Ordered()
        self.cla: _Ordered[PortKey, ir.ClusterEndpoints] = _Ordered()
        self.infos: _Ordered[Ref, ir.ServiceInfo] = _Ordered()
        self.nodes = NodeIndex()
        self.socket_redirect = SocketRedirectIndex()
        self.mesh: ir.Mesh | None = None
        self.node_selector: LabelSelector | None = None

    # -- change detection ------------------------------------------------------------------
    def _current(self, objects: Objects) -> dict[str, Mapping[ObjectKey, Mapping[str, Any]]]:
        of_kind = getattr(objects, "of_kind", None)
        if of_kind is not None:
            return {kind: of_kind(kind) for kind in _INPUT_KINDS}
        out: dict[str, dict[ObjectKey, Mapping[str, Any]]] = {k: {} for k in _INPUT_KINDS}
        for key, obj in objects.items():
            if key.kind in out:
                out[key.kind][key] = obj
        return dict(out)

    def _changed(
        self, objects: Objects, current: Mapping[str, Mapping[ObjectKey, Mapping[str, Any]]]
    ) -> dict[str, set[ObjectKey]]:
        by_kind: dict[str, set[ObjectKey]] = {k: set() for k in _INPUT_KINDS}
        source = getattr(objects, "source", None)
        keys = None
        if self.mesh is not None and source is not None and source is self.source:
            keys = objects.changed_since(self.revision)  # type: ignore[attr-defined]
        if keys is not None:
            for key in keys:
                if key.kind in by_kind:
                    by_kind[key.kind].add(key)
            return by_kind
        for kind in _INPUT_KINDS:
            new, old = current[kind], self.last.get(kind, {})
            if new is old:
                continue
            out = by_kind[kind]
            if not old:  # a cold build: every key is new
                out.update(new)
                continue
            for key, obj in new.items():
                if old.get(key) is not obj:
                    out.add(key)
            out.update(key for key in old if key not in new)
        return by_kind

    # -- the build -------------------------------------------------------------------------
    def build(
        self,
        objects: Objects,
        outbound_address: str,
        outbound_port: int,
        node_selector: LabelSelector | None = None,
        access_log: str = "",
    ) -> BuildResult:
        current = self._current(objects)
        changed = self._changed(objects, current)
        self.source = getattr(objects, "source", None)
        self.revision = getattr(objects, "revision", -1)
        self.last = dict(current)

        svc_changed, short_flips = self._services(changed["Service"], current["Service"])
        route_dirty: set[ObjectKey] = set()
        ep_changed = self._endpoints(
            changed["EndpointSlice"], current["EndpointSlice"], svc_changed
        )
        settings_changed = self._policies(changed["TrafficPolicy"], current, svc_changed)

        for kind in _ROUTE_KINDS:
            route_dirty |= changed[kind]
        for ref in svc_changed:
            dependents = self.svc_dependents.get(ref)
            if dependents:
                route_dirty |= dependents
        if svc_changed:
            route_dirty |= self.svc_dependents.get(_ANY, set())
        vh_dirty: set[Ref] = set(svc_changed) | short_flips
        usage_changed: set[PortKey] = set()
        for key in route_dirty:
            vh_dirty |= self._route(key, current[key.kind].get(key), usage_changed)

        for pk in settings_changed:
            vh_dirty.add(pk[:2])
            for route in self.cluster_users.get(pk, ()):
                vh_dirty |= self.route_parents.get(route, set())
        # Visited in key order, so that the outputs (`_Ordered`) of a cold build are made in
        # the order they are sorted in, which sorting then only checks: two sorts, not four.
        vh_order = sorted(vh_dirty)
        for ref in vh_order:
            self._virtual_hosts(ref, usage_changed)
        for key in self.conflicts_changed | route_dirty:
            model = self.routes.get(key)
            if model is not None:
                self.conditions[key] = self._route_conditions(key, model)
        self.conflicts_changed = set()

        cluster_dirty = usage_changed | settings_changed | ep_changed
        services = self.services
        for ref in svc_changed:
            svc = services.get(ref)
            if svc is not None:
                ns, name = ref
                for p in svc.ports:
                    cluster_dirty.add((ns, name, p.port))
        for pk in sorted(cluster_dirty):
            self._cluster(pk)

        info_extra = {pk[:2] for pk in settings_changed} | {pk[:2] for pk in ep_changed}
        for ref in vh_order:
            self._info(ref)
        for ref in sorted(info_extra - vh_dirty):
            self._info(ref)

        node_keys = changed["Pod"] | changed["EndpointSlice"]
        node_objects: Iterable[tuple[ObjectKey, Mapping[str, Any]]] | None = None
        if changed["Node"] or self.mesh is None or node_selector != self.node_selector:
            node_objects = current["Node"].items()
            if node_selector is not None:  # the Nodes that run nodemesh
                node_objects = [
                    (k, o) for k, o in node_objects if node_selector.matches(_labels(o))
                ]
        self.node_selector = node_selector
        node_infos = self.nodes.update_changed(
            ((k, current[k.kind].get(k)) for k in node_keys), node_objects
        )
        consumers = self.consumer_index.update(
            frozenset(self.consumer_routes),
            ((k, current["Pod"].get(k)) for k in changed["Pod"]),
            lambda: current["Pod"].items(),
        )
        socket_redirect = self.socket_redirect.update(
            (k, current["Pod"].get(k)) for k in changed["Pod"]
        )
        for key in changed["Pod"]:  # (the generation may change while the message does not)
            message = self.socket_redirect.unusable.get(key)
            if message is None:
                self.conditions.pop(key, None)
            else:
                pod = current["Pod"][key]
                self.conditions[key] = (
                    Condition("SocketRedirect", "False", "UnknownValue", message, generation(pod)),
                )
        mesh = ir.Mesh(
            virtual_hosts=self.vhosts.result(),
            clusters=self.clusters.result(),
            endpoints=self.cla.result(),
            services=self.infos.result(),
            nodes=tuple(n.name for n in node_infos)
            if self.mesh is None or node_infos is not self.mesh.node_infos
            else self.mesh.nodes,
            node_infos=node_infos,
            consumers=consumers,
            socket_redirect=socket_redirect,
            outbound_address=outbound_address,
            outbound_port=outbound_port,
            access_log=access_log,
        )
        last = self.mesh
        if last is not None and all(
            getattr(mesh, f) is getattr(last, f)
            for f in (
                "virtual_hosts",
                "clusters",
                "endpoints",
                "services",
                "node_infos",
                "consumers",
                "socket_redirect",
            )
        ):
            if (last.outbound_address, last.outbound_port, last.access_log) == (
                outbound_address,
                outbound_port,
                access_log,
            ):
                mesh = last
        self.mesh = mesh
        return BuildResult(mesh, dict(self.conditions))

    # -- Services --------------------------------------------------------------------------
    def _services(
        self, keys: set[ObjectKey], objs: Mapping[ObjectKey, Mapping[str, Any]]
    ) -> tuple[set[Ref], set[Ref]]:
        changed: set[Ref] = set()
        counts: dict[str, int] = {}
        services, name_ns, ip_refs = self.services, self.name_ns, self.ip_refs
        shared_ips: set[tuple[str, int]] = set()
        for key in keys:
            _, ns, name = key
            ref = (ns, name)
            obj = objs.get(key)
            # A short name is shared when Services of that name are in two namespaces, whatever
            # they are: Kubernetes DNS answers `db` in namespace `other` for an ExternalName or
            # UDP-only Service `other/db` too, which the mesh does not carry.
            namespaces = name_ns.get(name)
            if name not in counts:
                counts[name] = len(namespaces) if namespaces is not None else 0
            if obj is None:
                if namespaces is not None:
                    namespaces.discard(ns)
            elif namespaces is None:
                name_ns[name] = {ns}
            else:
                namespaces.add(ns)
            model = read_service(obj) if obj is not None else None
            # what kube-proxy would do with a Service the mesh carries, and the mesh does not
            # (said on the ports the node Envoy takes, or policies' load balancers apply to)
            zones = ""
            notable = False
            if obj is not None and model is not None and not model.headless and model.ports:
                zones = zone_setting(obj)
                notable = bool(zones) or model.node_local or model.client_ip_affinity
            if obj is not None and notable:
                self.service_notes[ref] = (key, zones, generation(obj))
                self._service_notice(ref, model)
            else:
                self.service_notes.pop(ref, None)
                self.conditions.pop(key, None)
            old = services.get(ref)
            if model is old or (old is not None and model == old):
                continue
            changed.add(ref)
            old_ips = _ip_ports(old)
            new_ips = _ip_ports(model)
            if old_ips != new_ips:
                for ip in old_ips:
                    claims = ip_refs[ip]
                    claims.discard(ref)
                    if claims:
                        shared_ips.add(ip)
                    else:
                        del ip_refs[ip]
                for ip in new_ips:
                    claims = ip_refs.setdefault(ip, set())
                    if claims:
                        shared_ips.add(ip)
                    claims.add(ref)
            if model is None:
                del services[ref]
            else:
                services[ref] = model
        # Short names ("web") are served only while unique across namespaces.
        # Only the Services that did not change themselves are returned (in a cold build, none).
        flips: set[Ref] = set()
        for name, before in counts.items():
            now = name_ns.get(name)
            if not now:
                name_ns.pop(name, None)
                continue
            if (before == 1) != (len(now) == 1):
                for ns in now:
                    if (ns, name) not in changed:
                        flips.add((ns, name))
        # A ClusterIP and port two Services give (files mode; Kubernetes allocates each
        # ClusterIP once) are domains of one of them, the first by name; Envoy refuses a
        # RouteConfiguration with a domain twice, and that NACK held back every route. Who
        # has them may have changed.
        for ip in shared_ips:
            flips.update(r for r in ip_refs.get(ip, ()) if r not in changed)
        return changed, flips

    def _ip_owner(self, ip_port: tuple[str, int]) -> Ref:
        """Of the Services that give a ClusterIP and port, the one that gets it: the first by
        "namespace/name", as the node agents' service maps and `l7_destinations` choose."""
        return min(self.ip_refs[ip_port], key=lambda r: f"{r[0]}/{r[1]}")

    # -- EndpointSlices --------------------------------------------------------------------
    def _endpoints(
        self,
        keys: set[ObjectKey],
        objs: Mapping[ObjectKey, Mapping[str, Any]],
        svc_changed: set[Ref],
    ) -> set[PortKey]:
        dirty = set(svc_changed)
        services, slices_of, slice_read, slice_ref, eps_of = (
            self.services,
            self.slices_of,
            self.slice_read,
            self.slice_ref,
            self.eps,
        )
        for key in keys:
            old_ref = slice_ref.pop(key, None)
            if old_ref is not None:
                slices_of[old_ref].discard(key)
                dirty.add(old_ref)
                slice_read.pop(key, None)
            obj = objs.get(key)
            if obj is not None:
                ref = slice_service(obj)
                slice_ref[key] = ref
                of_ref = slices_of.get(ref)
                if of_ref is None:
                    slices_of[ref] = {key}
                else:
                    of_ref.add(key)
                dirty.add(ref)
        changed: set[PortKey] = set()
        for ref in dirty:
            svc = services.get(ref)
            skeys = slices_of.get(ref)
            parts: dict[PortKey, list[list[ir.Endpoint]]] = {}
            if not skeys:
                slices_of.pop(ref, None)
            elif svc is not None and len(skeys) == 1:
                # A Service's only slice is read again whenever it or the Service changes
                # (caching it would never hit, and 100,000s of cached objects make the garbage
                # collector slower).
                for skey in skeys:
                    for pk, eps in slice_endpoints(objs[skey], svc).items():
                        parts[pk] = [eps]
            elif svc is not None:
                for skey in sorted(skeys):
                    obj = objs[skey]
                    cached = slice_read.get(skey)
                    if cached is not None and cached[0] is obj and cached[1] is svc:
                        contributed = cached[2]
                    else:
                        contributed = slice_endpoints(obj, svc)
                        slice_read[skey] = (obj, svc, contributed)
                    for pk, eps in contributed.items():
                        parts.setdefault(pk, []).append(eps)
            old_ports = self.eps_ports.pop(ref, ())
            if parts:
                self.eps_ports[ref] = tuple(parts)  # a tuple of atomic tuples: not GC-tracked
            for pk in old_ports:
                if pk not in parts:
                    del eps_of[pk]
                    changed.add(pk)
            for pk, part in parts.items():
                new = merge_endpoints(part)
                old = eps_of.get(pk)
                if old is None or old != new:
                    eps_of[pk] = new
                    changed.add(pk)
        return changed

    # -- TrafficPolicies -------------------------------------------------------------------
    def _policies(
        self,
        keys: set[ObjectKey],
        current: Mapping[str, Mapping[ObjectKey, Mapping[str, Any]]],
        svc_changed: set[Ref],
    ) -> set[PortKey]:
        deps = self.policy_deps
        if not keys and not (svc_changed & deps or (svc_changed and _ANY in deps)):
            return set()
        objs = current["TrafficPolicy"]
        for key in keys:
            obj = objs.get(key)
            if obj is None:
                self.policies.pop(key, None)
                self.conditions.pop(key, None)
            else:
                self.policies[key] = (read_traffic_policy(obj), generation(obj))
        # Overrides and unresolved targets span policies: settle them all (policies are few;
        # settings_for records on the models, so it gets fresh copies).
        fresh = [
            (key, replace(model, unresolved=[], overridden={}, headless=[]), gen)
            for key, (model, gen) in sorted(self.policies.items())
        ]
        lookups: _Lookups[Ref, ServiceModel] = _Lookups(self.services)
        settings = settings_for((m for _, m, _ in fresh), lookups)
        self.policy_deps = lookups.seen
        for key, model, gen in fresh:
            self.conditions[key] = _policy_conditions(model, gen)
        changed: set[PortKey] = set()
        for pk in self.settings.keys() | settings.keys():
            old, new = self.settings.get(pk), settings.get(pk)
            if old == new:
                if old is not None:
                    settings[pk] = old
                continue
            changed.add(pk)
        self.settings = settings
        return changed

    # -- Routes ----------------------------------------------------------------------------
    def _route(
        self, key: ObjectKey, obj: Mapping[str, Any] | None, usage_changed: set[PortKey]
    ) -> set[Ref]:
        """Re-read one route (or drop it). Returns the Services whose virtual hosts it touched."""
        touched = self.route_parents.pop(key, set())
        old = self.routes.pop(key, None)
        if old is not None:
            for ref in touched:
                entries = self.attached[ref]
                entries.pop(key, None)
                if not entries:
                    del self.attached[ref]
            for pk in old.clusters:
                self.route_used[pk] -= 1
                if not self.route_used[pk]:
                    del self.route_used[pk]
                    usage_changed.add(pk)
                users = self.cluster_users[pk]
                users.discard(key)
                if not users:
                    del self.cluster_users[pk]
        if old is not None and key in self.consumer_routes.get(key.namespace, ()):
            mine = self.consumer_routes[key.namespace]
            mine.discard(key)
            if not mine:
                del self.consumer_routes[key.namespace]
        for ref in self.route_deps.pop(key, set()):
            self.svc_dependents[ref].discard(key)
        if obj is None:
            self.conditions.pop(key, None)
            return touched

        services: _Lookups[Ref, ServiceModel] = _Lookups(self.services)
        model: RouteModel = _READERS[key.kind](obj, services)
        self.routes[key] = model
        self.conditions[key] = tuple(model.conditions)
        self.route_deps[key] = services.seen
        for ref in services.seen:
            self.svc_dependents.setdefault(ref, set()).add(key)
        parents: set[Ref] = set()
        for e in model.entries:
            ref = (e.parent[0], e.parent[1])
            parents.add(ref)
            self.attached.setdefault(ref, {}).setdefault(key, []).append(e)
            if e.route.match.consumer:
                self.consumer_routes.setdefault(key.namespace, set()).add(key)
        if parents:
            self.route_parents[key] = parents
        for pk in model.clusters:
            count = self.route_used.get(pk, 0)
            self.route_used[pk] = count + 1
            if not count:
                usage_changed.add(pk)
            self.cluster_users.setdefault(pk, set()).add(key)
            self.cluster_keys[self.services[pk[:2]].cluster_name(pk[2])] = pk
        return touched | parents

    # -- per Service: virtual hosts, clusters, ServiceInfo ---------------------------------
    def _virtual_hosts(self, ref: Ref, usage_changed: set[PortKey]) -> None:
        svc = self.services.get(ref)
        old_keys = self.vhost_keys.pop(ref, ())
        old_own = self.own_ports.pop(ref, _NO_KEYS)
        new_keys: list[VhostKey] = []
        own: set[PortKey] = set()
        conflicts: dict[ObjectKey, dict[str, _Conflict]] = {}
        if svc is not None:
            ns, name = ref
            attached = self.attached.get(ref)
            # The order a full build would attach them in: HTTPRoutes, then GRPCRoutes, by key.
            entries = (
                [
                    (rkey, e)
                    for rkey in sorted(attached, key=lambda k: (_ROUTE_KINDS.index(k.kind), k))
                    for e in attached[rkey]
                ]
                if attached
                else None
            )
            # Only a Service with GRPCRoutes can have conflicts (most have none: no bookkeeping)
            mixed = entries is not None and any(k.kind == "GRPCRoute" for k, _ in entries)
            short = len(self.name_ns.get(name, ())) == 1
            hosts = svc.hostnames(short_name=short, domain=self.cluster_domain)
            # As a Host header carries them: an IPv6 address is bracketed, with or without ":port".
            ip_refs = self.ip_refs
            ips = tuple(f"[{ip}]" if ":" in ip else ip for ip in svc.cluster_ips)
            default_port = svc.default_port
            origins = (f"Service/{ns}/{name}",)
            settings, vhosts, cluster_keys = self.settings, self.vhosts, self.cluster_keys
            for index, sp in enumerate(svc.ports):
                port = sp.port
                pk = (ns, name, port)
                suffix = f":{port}"
                cname = svc.cluster_name(port)
                own.add(pk)
                cluster_keys[cname] = pk
                here = None
                if entries:
                    # a route for every port applies to the HTTP ones (not a database port)
                    for_all = port if sp.not_http else None
                    here = sorted(
                        ((k, e) for k, e in entries if e.parent[2] in (for_all, port)),
                        key=lambda ke: ke[1].sort_key,
                    )
                mine: list[RouteEntry] | None = None
                if here:
                    mine = (
                        _one_kind_each(here, port, conflicts)
                        if mixed
                        else [e for _, e in here if not e.repeat]
                    )
                policy = settings.get(pk) if settings else None
                consumer_routes: tuple[ir.Route, ...] = ()
                if mine and any(e.route.match.consumer for e in mine):
                    mine, consumer_routes = self._consumer_routes(
                        mine, policy, f"{ns}/{name}{suffix}", port
                    )
                if mine:
                    lbs = self.lbs
                    routes = tuple(_redirect_port(_finish(e, policy, lbs), port) for e in mine)
                else:
                    default = ir.Route(
                        f"Service/{ns}/{name}{suffix}/default",
                        backends=(ir.Backend(cname),),
                        grpc_calls=sp.grpc,
                        origins=origins,
                    )
                    # Without a policy or affinity, _finish would give the route as it is (its
                    # one cluster is this port's, which then has no hashing load balancer).
                    routes = (
                        (default,)
                        if policy is None and not svc.client_ip_affinity
                        else (_finish(RouteEntry(pk, (), default), policy, self.lbs),)
                    )
                domains = [h + suffix for h in hosts]
                mine_ips = (
                    [
                        host
                        for ip, host in zip(svc.cluster_ips, ips, strict=True)
                        if len(ip_refs[ip, port]) == 1 or self._ip_owner((ip, port)) == ref
                    ]
                    if ips
                    else ips
                )
                for ip in mine_ips:
                    domains.append(ip + suffix)
                if default_port is not None and default_port.port == port:
                    domains += hosts
                    if port == 80:
                        domains += mine_ips
                vkey = (ns, name, index)
                vhosts.put(
                    vkey,
                    ir.VirtualHost(
                        f"{ns}/{name}{suffix}",
                        tuple(dict.fromkeys(domains)),
                        consumer_routes + routes,
                        origins,
                    ),
                )
                new_keys.append(vkey)
        conflicts = {
            k: by_label
            for k, by_label in conflicts.items()
            if any(c.ports for c in by_label.values())
        }
        old_conflicts = self.conflicts.pop(ref, {})
        if conflicts:
            self.conflicts[ref] = conflicts
        for rkey in old_conflicts.keys() | conflicts.keys():
            if old_conflicts.get(rkey) != conflicts.get(rkey):
                self.conflicts_changed.add(rkey)
        for vkey in old_keys:
            if vkey not in new_keys:
                self.vhosts.remove(vkey)
        if new_keys:
            self.vhost_keys[ref] = tuple(new_keys)
        if own:
            self.own_ports[ref] = own
        if old_own != own:
            for pk in old_own - own:
                self.port_clusters.discard(pk)
                usage_changed.add(pk)
            for pk in own - old_own:
                self.port_clusters.add(pk)
                usage_changed.add(pk)

    def _route_conditions(self, key: ObjectKey, model: RouteModel) -> tuple[Condition, ...]:
        """The route's own conditions, with what GRPCRoutes on the same Service ports say: a
        parentRef whose every port is taken by one is not Accepted (Conflicted); one that lost
        some ports says which."""
        found: dict[str, _Conflict] = {}
        for ref in self.route_parents.get(key, ()):
            found.update(self.conflicts.get(ref, {}).get(key, {}))
        if not found:
            return tuple(model.conditions)
        out = []
        for c in model.conditions:
            lost = found.get(c.parent)
            if c.type == "Accepted" and c.status == "True" and lost is not None:
                ports = ", ".join(str(p) for p in sorted(lost.ports))
                winners = ", ".join(sorted(lost.winners))
                why = (
                    f"{winners} on port {ports} of the same Service: where a GRPCRoute and an "
                    "HTTPRoute attach to one Service port, only the GRPCRoute applies (GEP-1294)"
                )
                if lost.kept:
                    c = replace(c, message=f"{c.message}; not applied on port {ports}: {why}")
                else:
                    c = Condition(
                        "Accepted", "False", "Conflicted", f"not applied: {why}",
                        c.observed_generation, c.parent,
                    )  # fmt: skip
            out.append(c)
        return tuple(out)

    def _consumer_routes(
        self, entries: list[RouteEntry], policy: PolicySettings | None, vhost: str, port: int
    ) -> tuple[list[RouteEntry], tuple[ir.Route, ...]]:
        """Split one Service port's sorted entries into the producer's and the consumers'
        routes. Each consumer namespace gets its routes, in order, then one that answers 404
        to the rest of its requests: for its clients, its routes replace the producer's."""
        groups: dict[str, list[RouteEntry]] = {}
        producer = []
        for e in entries:
            c = e.route.match.consumer
            if c:
                groups.setdefault(c, []).append(e)
            else:
                producer.append(e)
        out: list[ir.Route] = []
        for c in sorted(groups):
            out += [_redirect_port(_finish(e, policy, self.lbs), port) for e in groups[c]]
            out.append(
                ir.Route(
                    f"Service/{vhost}/consumer/{c}/no-match",
                    match=ir.RouteMatch(consumer=c),
                    direct_status=404,
                    origins=tuple(sorted({o for e in groups[c] for o in e.route.origins})),
                )
            )
        return producer, tuple(out)

    def _cluster(self, pk: PortKey) -> None:
        ns, name, port = pk
        svc = self.services.get((ns, name))
        if svc is None or not (self.route_used.get(pk) or pk in self.port_clusters):
            self.clusters.remove(pk)
            self.cla.remove(pk)
            return
        cname = svc.cluster_name(port)
        pm = svc.port(port)
        http2 = bool(pm and pm.http2)
        s = self.settings.get(pk)
        if s is None:  # no policy: the defaults, without looking at them one by one
            cluster = ir.Cluster(
                cname,
                f"{ns}/{name}",
                port,
                http2,
                lb=_lb(svc, None),
                origins=(f"Service/{ns}/{name}",),
            )
        else:
            origins = (f"Service/{ns}/{name}",) + tuple(
                o
                for o in s.origins
                if s.connect_timeout_ms
                or s.circuit_breaker
                or s.outlier
                or s.lb
                or s.budget_percent is not None
                or s.budget_min_concurrency is not None
            )
            cluster = ir.Cluster(
                name=cname,
                service=f"{ns}/{name}",
                port=port,
                http2=http2,
                connect_timeout_ms=s.connect_timeout_ms,
                circuit_breaker=s.cluster_breaker(),
                outlier=s.outlier,
                lb=_lb(svc, s),
                origins=origins,
            )
        self.clusters.put(pk, cluster)
        eps = self.eps.get(pk, ())
        old_cla = self.cla.get(pk)
        if old_cla is None or old_cla.cluster != cname or old_cla.endpoints != eps:
            self.cla.set(pk, ir.ClusterEndpoints(cname, eps))

    def _info(self, ref: Ref) -> None:
        svc = self.services.get(ref)
        if svc is None:
            self.infos.remove(ref)
            return
        ns, name = ref
        settings, eps = self.settings, self.eps
        attached = self.attached.get(ref)
        # the ports the Service's routes attach to (None: every port)
        routed = {e.parent[2] for es in attached.values() for e in es} if attached else _NO_PORTS
        ports: list[int] = []
        l7: list[int] = []
        backends: list[tuple[ir.Endpoint, ...]] = []
        for p in svc.ports:  # a loop, not comprehensions and any(): made for every Service
            pk = (ns, name, p.port)
            ports.append(p.port)
            backends.append(eps.get(pk, ()))
            # An L7 port: one a route or policy applies to, if Envoy speaks its protocol (a
            # database port next to an HTTP one stays L4, its bytes not parsed as HTTP).
            if (pk in settings or None in routed or p.port in routed) and not p.not_http:
                l7.append(p.port)
        info = ir.ServiceInfo(
            f"{ns}/{name}",
            svc.cluster_ips,
            tuple(ports),
            tuple(l7),
            tuple(backends),
            svc.node_local,
            svc.client_ip_affinity,
        )
        self.infos.put(ref, info)
        if ref in self.service_notes:
            self._service_notice(ref, svc)  # the node Envoy's ports, the policies may change

    def _service_notice(self, ref: Ref, svc: ServiceModel | None) -> None:
        """The Service's `Supported=False` notice: Local and topology-aware routing, on the
        ports its last ServiceInfo sends to the node Envoy (the node agents honour them);
        ClientIP affinity, on the ports where a TrafficPolicy's loadBalancer applies instead."""
        key, zones, gen = self.service_notes[ref]
        parts: Unhonoured = ()
        info = self.infos.get(ref)
        l7 = info.l7_ports if info is not None else ()
        if svc is not None and svc.node_local and l7:
            parts = (local_unhonoured(l7),)
        if zones and l7:
            parts = (*parts, zones_unhonoured(zones, l7))
        if svc is not None and svc.client_ip_affinity and self.settings:
            ns, name = ref
            overridden = [
                p.port
                for p in svc.ports
                if (s := self.settings.get((ns, name, p.port))) is not None and s.lb is not None
            ]
            if overridden:
                parts = (*parts, affinity_overridden(overridden))
        if parts:
            message = unhonoured_message(parts)
            self.conditions[key] = (
                Condition("Supported", "False", "UnsupportedValue", message, gen),
            )
        else:
            self.conditions.pop(key, None)


def _labels(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return as_map(as_map(obj.get("metadata")).get("labels"))


_NO_PORTS: frozenset[int | None] = frozenset()
