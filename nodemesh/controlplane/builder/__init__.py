"""Build: input objects -> mesh IR + conditions per object. Pure: no clock, no I/O.

One module per input kind (`service.py`, `endpointslice.py`, `node.py`, `httproute.py`,
`grpcroute.py`, `trafficpolicy.py`); this module assembles their results into `ir.Mesh`. Errors
are collected: a broken object gets conditions with precise messages and everything else still
programs.

>>> result = build(store.view())                # doctest: +SKIP
>>> result.mesh.virtual_hosts[0].domains        # doctest: +SKIP
>>> result.conditions[ObjectKey("HTTPRoute", "shop", "web")]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from nodemesh.controlplane.builder._routes import Grants, RouteEntry, RouteModel
from nodemesh.controlplane.builder._util import as_list, as_map, generation
from nodemesh.controlplane.builder.endpointslice import (
    merge_endpoints,
    slice_endpoints,
    slice_service,
)
from nodemesh.controlplane.builder.grpcroute import read_grpcroute
from nodemesh.controlplane.builder.httproute import read_httproute
from nodemesh.controlplane.builder.node import NodeIndex
from nodemesh.controlplane.builder.service import ServiceModel, read_service
from nodemesh.controlplane.builder.trafficpolicy import (
    PolicySettings,
    RetrySpec,
    read_traffic_policy,
    settings_for,
)
from nodemesh.controlplane.conditions import Condition
from nodemesh.controlplane.store import ObjectKey
from nodemesh.xds.translate import ir

__all__ = ["BuildMemo", "BuildResult", "build"]

Objects = Mapping[ObjectKey, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class BuildResult:
    mesh: ir.Mesh
    conditions: Mapping[ObjectKey, tuple[Condition, ...]]


class BuildMemo:
    """Caches that let a build reuse the previous one's work. Keyed by object identity: the
    store keeps the same dict for an unchanged object, so an unchanged Service or EndpointSlice
    is not read again, and unchanged IR items keep their identity (the Translator's memo then
    hits on `is`). A build with a fresh memo gives the same result as one with a warm memo."""

    def __init__(self) -> None:
        self.services: dict[ObjectKey, tuple[Mapping[str, Any], ServiceModel | None]] = {}
        self.slices: dict[ObjectKey, tuple[Mapping[str, Any], ServiceModel, dict[Any, Any]]] = {}
        self.endpoints: dict[str, tuple[tuple[int, ...], ir.ClusterEndpoints]] = {}
        self.clusters: dict[str, ir.Cluster] = {}
        self.vhosts: dict[str, ir.VirtualHost] = {}
        self.nodes = NodeIndex()


def _same(memo: Mapping[str, Any], name: str, value: Any) -> Any:
    """The previous build's equal value if there is one (keeps IR identity stable)."""
    old = memo.get(name)
    return old if old is not None and old == value else value


def _of_kind(
    objects: Objects, kind: str, ordered: bool = True
) -> list[tuple[ObjectKey, Mapping[str, Any]]]:
    of_kind = getattr(objects, "of_kind", None)
    items = (
        of_kind(kind).items()
        if of_kind is not None
        else ((k, v) for k, v in objects.items() if k.kind == kind)
    )
    return sorted(items, key=lambda kv: kv[0]) if ordered else list(items)


def _grants(objects: Objects) -> Grants:
    out: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
    for key, obj in _of_kind(objects, "ReferenceGrant"):
        spec = as_map(obj.get("spec"))
        froms = [as_map(f) for f in as_list(spec.get("from"))]
        for to in (as_map(t) for t in as_list(spec.get("to"))):
            if to.get("group", "") != "":
                continue
            for f in froms:
                if f.get("group") == "gateway.networking.k8s.io":
                    out.setdefault((key.namespace, str(to.get("kind"))), []).append(
                        (str(f.get("namespace")), str(f.get("kind")), str(to.get("name", "")))
                    )
    return out


def _finish(
    entry: RouteEntry, policy: PolicySettings | None, lbs: Mapping[str, ir.LoadBalancer]
) -> ir.Route:
    """Apply policy defaults under the route's own settings (route wins, field by field)."""
    policy = policy or PolicySettings()
    retry: RetrySpec | None = entry.retry.over(policy.retry) if entry.retry else policy.retry
    if entry.backend_timeout_ms is not None:
        base = retry if retry is not None else RetrySpec(attempts=0)
        retry = RetrySpec(per_try_timeout_ms=entry.backend_timeout_ms).over(base)
    r = entry.route
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
        origins=origins,
    )


def _policy_conditions(pol: Any, gen: int) -> tuple[Condition, ...]:
    if pol.problems:
        return (
            Condition("Accepted", "False", "Invalid", "; ".join(pol.problems), gen),
            Condition("ResolvedRefs", "Unknown", "Invalid", "policy is invalid", gen),
        )
    message = "Policy is accepted"
    if pol.overridden:
        message += "; overridden by older or more specific policies: " + ", ".join(
            f"{section} by {', '.join(sorted(winners))}"
            for section, winners in sorted(pol.overridden.items())
        )
    resolved = (
        Condition("ResolvedRefs", "False", "TargetNotFound", "; ".join(pol.unresolved), gen)
        if pol.unresolved
        else Condition("ResolvedRefs", "True", "ResolvedRefs", "All targets resolved", gen)
    )
    return (Condition("Accepted", "True", "Accepted", message, gen), resolved)


def build(
    objects: Objects,
    *,
    outbound_address: str = "0.0.0.0",
    outbound_port: int = 15001,
    memo: BuildMemo | None = None,
) -> BuildResult:
    memo = memo if memo is not None else BuildMemo()
    conditions: dict[ObjectKey, tuple[Condition, ...]] = {}
    services: dict[tuple[str, str], ServiceModel] = {}
    seen_services: dict[ObjectKey, tuple[Mapping[str, Any], ServiceModel | None]] = {}
    for key, obj in _of_kind(objects, "Service", ordered=False):
        cached = memo.services.get(key)
        svc_model = cached[1] if cached is not None and cached[0] is obj else read_service(obj)
        seen_services[key] = (obj, svc_model)
        if svc_model is not None:
            services[(svc_model.namespace, svc_model.name)] = svc_model
    memo.services = seen_services
    grants = _grants(objects)
    endpoint_parts: dict[tuple[str, str, int], list[list[ir.Endpoint]]] = {}
    seen_slices: dict[ObjectKey, tuple[Mapping[str, Any], ServiceModel, dict[Any, Any]]] = {}
    for key, obj in _of_kind(objects, "EndpointSlice", ordered=False):
        svc = services.get(slice_service(obj))
        if svc is None:
            continue
        cached_slice = memo.slices.get(key)
        if cached_slice is not None and cached_slice[0] is obj and cached_slice[1] is svc:
            contributed = cached_slice[2]
        else:
            contributed = slice_endpoints(obj, svc)
        seen_slices[key] = (obj, svc, contributed)
        for port_key, eps in contributed.items():
            endpoint_parts.setdefault(port_key, []).append(eps)
    memo.slices = seen_slices

    policies = []
    for key, obj in _of_kind(objects, "TrafficPolicy"):
        policies.append((key, obj, read_traffic_policy(obj)))
    settings = settings_for((p for _, _, p in policies), services)
    for key, obj, pol in policies:
        conditions[key] = _policy_conditions(pol, generation(obj))

    routes: list[RouteModel] = []
    for kind, reader in (("HTTPRoute", read_httproute), ("GRPCRoute", read_grpcroute)):
        for key, obj in _of_kind(objects, kind):
            model = reader(obj, services, grants)
            routes.append(model)
            conditions[key] = tuple(model.conditions)
    attached: dict[tuple[str, str], list[RouteEntry]] = {}
    used: set[tuple[str, str, int]] = set()
    for model in routes:
        for e in model.entries:
            attached.setdefault(e.parent[:2], []).append(e)
        used |= model.clusters

    # Short names ("web") are ambiguous across namespaces: only a unique one is served.
    short_count: dict[str, int] = {}
    for _ns, name in services:
        short_count[name] = short_count.get(name, 0) + 1

    vhost_plan: list[tuple[ServiceModel, int, list[RouteEntry]]] = []
    for (ns, name), svc in sorted(services.items()):
        entries = attached.get((ns, name), [])
        for sp in svc.ports:
            mine = sorted(
                (e for e in entries if e.parent[2] in (None, sp.port)), key=lambda e: e.sort_key
            )
            if not mine:
                default = ir.Route(
                    name=f"Service/{ns}/{name}:{sp.port}/default",
                    backends=(ir.Backend(svc.cluster_name(sp.port)),),
                    origins=(f"Service/{ns}/{name}",),
                )
                mine = [RouteEntry((ns, name, sp.port), (), default)]
                used.add((ns, name, sp.port))
            vhost_plan.append((svc, sp.port, mine))

    clusters: list[ir.Cluster] = []
    cla: list[ir.ClusterEndpoints] = []
    new_cla: dict[str, tuple[tuple[int, ...], ir.ClusterEndpoints]] = {}
    lbs: dict[str, ir.LoadBalancer] = {}
    for ns, name, port in sorted(used):
        svc = services[(ns, name)]
        pm = svc.port(port)
        s = settings.get((ns, name, port)) or PolicySettings()
        cname = svc.cluster_name(port)
        cluster_origins = (f"Service/{ns}/{name}",) + tuple(
            o
            for o in s.origins
            if s.connect_timeout_ms
            or s.circuit_breaker
            or s.outlier
            or s.lb
            or s.budget_percent is not None
            or s.budget_min_concurrency is not None
        )
        clusters.append(
            _same(
                memo.clusters,
                cname,
                ir.Cluster(
                    name=cname,
                    service=f"{ns}/{name}",
                    port=port,
                    http2=bool(pm and pm.http2),
                    connect_timeout_ms=s.connect_timeout_ms,
                    circuit_breaker=s.cluster_breaker(),
                    outlier=s.outlier,
                    lb=s.lb,
                    origins=cluster_origins,
                ),
            )
        )
        if s.lb is not None and (s.lb.hash_header or s.lb.hash_cookie):
            lbs[cname] = s.lb
        parts = endpoint_parts.get((ns, name, port), [])
        identity = tuple(id(p) for p in parts)
        cached_cla = memo.endpoints.get(cname)
        if cached_cla is not None and cached_cla[0] == identity:
            cla_ir = cached_cla[1]
        else:
            cla_ir = ir.ClusterEndpoints(cname, merge_endpoints(parts))
        new_cla[cname] = (identity, cla_ir)
        cla.append(cla_ir)

    memo.endpoints = new_cla
    memo.clusters = {c.name: c for c in clusters}
    vhosts: list[ir.VirtualHost] = []
    for svc, port, entries in vhost_plan:
        policy = settings.get((svc.namespace, svc.name, port))
        hosts = svc.hostnames(short_name=short_count[svc.name] == 1)
        domains = [f"{h}:{port}" for h in hosts] + [f"{ip}:{port}" for ip in svc.cluster_ips]
        default_port = svc.default_port
        if default_port is not None and default_port.port == port:
            domains += hosts
            if port == 80:
                domains += svc.cluster_ips
        origins = {f"Service/{svc.namespace}/{svc.name}"}
        routes_ir = tuple(_finish(e, policy, lbs) for e in entries)
        vh_name = f"{svc.namespace}/{svc.name}:{port}"
        vhosts.append(
            _same(
                memo.vhosts,
                vh_name,
                ir.VirtualHost(
                    name=vh_name,
                    domains=tuple(dict.fromkeys(domains)),
                    routes=routes_ir,
                    origins=tuple(sorted(origins)),
                ),
            )
        )
    memo.vhosts = {v.name: v for v in vhosts}

    infos = []
    for (ns, name), svc in sorted(services.items()):
        needs_l7 = bool(attached.get((ns, name))) or any(
            settings.get((ns, name, p.port)) is not None for p in svc.ports
        )
        backends = tuple(
            new_cla[c][1].endpoints
            if (c := svc.cluster_name(p.port)) in new_cla
            else merge_endpoints(endpoint_parts.get((ns, name, p.port), []))
            for p in svc.ports
        )
        infos.append(
            ir.ServiceInfo(
                f"{ns}/{name}",
                svc.cluster_ips,
                tuple(p.port for p in svc.ports),
                needs_l7,
                backends,
            )
        )

    node_infos = memo.nodes.update(
        _of_kind(objects, "Node", ordered=False),
        _of_kind(objects, "Pod", ordered=False),
        _of_kind(objects, "EndpointSlice", ordered=False),
    )
    nodes = tuple(n.name for n in node_infos)
    mesh = ir.Mesh(
        virtual_hosts=tuple(vhosts),
        clusters=tuple(clusters),
        endpoints=tuple(cla),
        services=tuple(infos),
        nodes=nodes,
        node_infos=node_infos,
        outbound_address=outbound_address,
        outbound_port=outbound_port,
    )
    return BuildResult(mesh, conditions)
