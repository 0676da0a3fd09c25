"""What HTTPRoute and GRPCRoute share: parentRefs, backendRefs, filters, timeouts, retry.

A route becomes `RouteEntry`s (one per rule and match) attached to a (Service, port); the
assembly in `__init__.py` orders them by Gateway API precedence and applies TrafficPolicy
defaults, which route-level settings override.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nodemesh.controlplane.builder._util import (
    Problems,
    as_list,
    as_map,
    creation,
    generation,
    int_in,
    parse_duration,
)
from nodemesh.controlplane.builder.service import ServiceModel, no_http_port
from nodemesh.controlplane.builder.trafficpolicy import RetrySpec
from nodemesh.controlplane.conditions import Condition, parent_label
from nodemesh.xds.translate import ir

__all__ = [
    "RouteEntry",
    "RouteModel",
    "header_text",
    "read_route",
]

PortKey = tuple[str, str, int]  # (namespace, service, port)


@dataclass(slots=True)
class RouteEntry:
    parent: tuple[str, str, int | None]
    sort_key: tuple[Any, ...]
    route: ir.Route
    retry: RetrySpec | None = None
    timeout_ms: int | None = None
    backend_timeout_ms: int | None = None
    label: str = ""  # the parentRef it came from, as its status names it
    # Another parentRef of the route already attaches this entry to the same Service ports
    # (`{name: web}` and `{name: web, port: 80}`): it counts for its parentRef's status (a
    # GRPCRoute taking the port) but is not programmed twice.
    repeat: bool = False


@dataclass(slots=True)
class RouteModel:
    key: str
    generation: int
    entries: list[RouteEntry] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    clusters: set[PortKey] = field(default_factory=set)


@dataclass(slots=True)
class _Refs:
    """Unresolved references found while reading one route: (reason, message)."""

    problems: list[tuple[str, str]] = field(default_factory=list)


_LINE_BREAKING = re.compile("[\x00\r\n]")


def header_text(value: str, path: str, p: Problems) -> str:
    """`value`, which goes into a header name or value, a rewritten path or a hostname: Envoy
    refuses NUL, CR and LF in all of them (its NACK would hold back every Service's routes),
    and Gateway API's schema limits header values and rewritten paths only in length."""
    found = _LINE_BREAKING.search(value)
    if found is not None:
        p.add(
            path, f"must not contain {found.group()!r} (NUL, CR and LF cannot be in HTTP headers)"
        )
    return value


def _backend(
    ref: Mapping[str, Any],
    path: str,
    route_ns: str,
    services: Mapping[tuple[str, str], ServiceModel],
    refs: _Refs,
    grpc: bool = False,
) -> PortKey | None:
    """The Service port a backendRef names, or None with why (`grpc`: for a GRPCRoute)."""
    group, kind = ref.get("group", ""), ref.get("kind", "Service")
    if group != "" or kind != "Service":
        refs.problems.append(("InvalidKind", f"{path}: {group or 'core'}/{kind} is not a Service"))
        return None
    name = str(ref.get("name", ""))
    # A Service in any namespace, without a ReferenceGrant: mesh routes (GEP-1294, "Namespace
    # boundaries") augment Services every client can already reach; they expose nothing.
    ns = str(ref.get("namespace") or route_ns)
    svc = services.get((ns, name))
    if svc is None:
        refs.problems.append(("BackendNotFound", f"{path}: Service {ns}/{name} not found"))
        return None
    port = ref.get("port")
    if not isinstance(port, int):
        refs.problems.append(("BackendNotFound", f"{path}: port is required for a Service"))
        return None
    sp = svc.port(port)
    if sp is None:
        refs.problems.append(("BackendNotFound", f"{path}: Service {ns}/{name} has no port {port}"))
        return None
    if sp.not_http:
        # Gateway API's reason for a backend whose app protocol the implementation does not
        # support: HTTP sent to a database port would only fail there, less clearly
        refs.problems.append(
            (
                "UnsupportedProtocol",
                f"{path}: Service {ns}/{name} port {port} is not HTTP ({sp.not_http})",
            )
        )
        return None
    if grpc and not sp.http2:
        # gRPC has no HTTP/1.1 form: over the port's HTTP/1.1 cluster every call failed
        # ("protocol error") with the route all True. Making the port's one cluster HTTP/2
        # would break its HTTP/1.1 clients, whoever they are: the port must say it.
        refs.problems.append(
            (
                "UnsupportedProtocol",
                f"{path}: Service {ns}/{name} port {port} does not speak HTTP/2, which gRPC "
                "needs: give it appProtocol kubernetes.io/grpc (or a name grpc)",
            )
        )
        return None
    return (ns, name, port)


def _mutation(
    spec: Mapping[str, Any], path: str, p: Problems, request: bool
) -> tuple[ir.HeaderMutation, str]:
    """The header changes, and the Host a request modifier sets (or ""). Envoy refuses Host in
    `request_headers_to_add` (its NACK would hold back every Service's routes), so a request's
    Host set or added becomes the route's host rewrite, as `URLRewrite.hostname`; Host cannot
    be removed, nor changed in a response. Envoy refuses pseudo-headers (`:path`) and empty
    names as well."""
    host = ""

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        nonlocal host
        out = []
        seen: set[str] = set()
        for i, h in enumerate(as_list(spec.get(key))):
            h = as_map(h)
            if not h.get("name") or "value" not in h:
                p.add(f"{path}.{key}[{i}]", "name and value are required")
                continue
            name = header_text(str(h["name"]).lower(), f"{path}.{key}[{i}].name", p)
            value = header_text(str(h["value"]), f"{path}.{key}[{i}].value", p)
            # Gateway API: of entries with equivalent names (`X-Env`, `x-env`: its schema's
            # list key is case-sensitive) the first counts and later ones are ignored; Envoy
            # would apply them all, so the last `set` won and `add` sent every value.
            if name in seen:
                continue
            seen.add(name)
            if name.startswith(":"):
                p.add(f"{path}.{key}[{i}].name", f"the pseudo-header {name!r} cannot be changed")
                continue
            if name == "host":
                if request:
                    host = value  # Host has one value: add is set
                else:
                    p.add(f"{path}.{key}[{i}]", "the Host header cannot be changed in a response")
                continue
            out.append((name, value))
        return tuple(out)

    set_, add, remove = pairs("set"), pairs("add"), []
    for i, n in enumerate(as_list(spec.get("remove"))):
        # Gateway API's schema takes any string here; Envoy refuses these three.
        name = header_text(str(n).lower(), f"{path}.remove[{i}]", p)
        if name == "host":
            p.add(f"{path}.remove", "the Host header cannot be removed")
        elif not name:
            p.add(f"{path}.remove[{i}]", "a header name cannot be empty")
        elif name.startswith(":"):
            p.add(f"{path}.remove[{i}]", f"the pseudo-header {name!r} cannot be removed")
        else:
            remove.append(name)
    return ir.HeaderMutation(set=set_, add=add, remove=tuple(remove)), host


def _path_modifier(
    spec: Mapping[str, Any], path: str, p: Problems
) -> tuple[str | None, str | None]:
    kind = spec.get("type")
    # A path that does not start with "/" went upstream as it was: Envoy sent `GET xyz/bar`,
    # which backends answer with 400 (Gateway API's schema limits the length only). An empty
    # replacePrefixMatch is Gateway API's way to drop the prefix ("/foo/bar" -> "/bar").
    if kind == "ReplaceFullPath":
        full = str(spec.get("replaceFullPath", "/"))
        if not full.startswith("/"):
            p.add(f"{path}.replaceFullPath", f"must start with '/' (got {full!r})")
        return header_text(full, f"{path}.replaceFullPath", p), None
    if kind == "ReplacePrefixMatch":
        prefix = str(spec.get("replacePrefixMatch", "/"))
        if prefix and not prefix.startswith("/"):
            p.add(f"{path}.replacePrefixMatch", f"must be empty or start with '/' (got {prefix!r})")
        return None, header_text(prefix, f"{path}.replacePrefixMatch", p)
    p.add(f"{path}.type", f"unsupported value {kind!r} (ReplaceFullPath or ReplacePrefixMatch)")
    return None, None


_FILTER_TYPES = {
    "HTTPRoute": (
        "RequestHeaderModifier",
        "ResponseHeaderModifier",
        "URLRewrite",
        "RequestRedirect",
        "RequestMirror",
    ),
    "GRPCRoute": ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror"),
}
# Filters a rule (or a backendRef) takes once, and the two of which it takes one (Gateway API's
# CEL rules on HTTPRoute and GRPCRoute filters).
_ONCE = frozenset(
    {"RequestHeaderModifier", "ResponseHeaderModifier", "URLRewrite", "RequestRedirect"}
)
_EXCLUSIVE = frozenset({"URLRewrite", "RequestRedirect"})
# On a backendRef (`rules[].backendRefs[].filters`), the types Envoy can apply to the requests
# of one backend: a weighted cluster has header changes of its own, but no rewrite, redirect or
# mirror (a redirect also answers before any backend is picked). ExtensionRef is as in a rule.
_BACKEND_FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier")


@dataclass(slots=True)
class _Filters:
    request_headers: ir.HeaderMutation | None = None
    response_headers: ir.HeaderMutation | None = None
    rewrite: ir.Rewrite | None = None
    redirect: ir.Redirect | None = None
    mirrors: list[tuple[PortKey, float]] = field(default_factory=list)
    unresolved: bool = False  # an ExtensionRef: the rule answers with an error


def _filters(
    raw: Sequence[Any],
    path: str,
    route_ns: str,
    route_kind: str,
    services: Mapping[tuple[str, str], ServiceModel],
    p: Problems,
    refs: _Refs,
    prefix_match: bool,
    backend: bool = False,
) -> _Filters:
    """The filters of a rule, or of one of its backendRefs (`backend`)."""
    out = _Filters()
    host = ""  # set by a RequestHeaderModifier
    implemented = _BACKEND_FILTER_TYPES if backend else _FILTER_TYPES[route_kind]
    seen: set[str] = set()
    for i, f in enumerate(raw):
        f = as_map(f)
        fpath = f"{path}[{i}]"
        kind = f.get("type")
        once = kind if isinstance(kind, str) else ""  # junk in files mode may be unhashable
        if once in _ONCE and once in seen:
            # Gateway API's validation rules, which files mode does not have: the second one
            # replaced the first (two RequestHeaderModifiers set only the second's headers).
            p.add(f"{fpath}.type", f"a {kind} filter cannot be repeated")
        elif once in _EXCLUSIVE and seen & _EXCLUSIVE:
            p.add(f"{fpath}.type", "a rule takes either RequestRedirect or URLRewrite, not both")
        seen.add(once)
        if kind != "ExtensionRef" and kind not in implemented:
            # Gateway API: "Unknown values here must result in the implementation setting the
            # Accepted Condition for the Route to `status: False`, with a Reason of
            # `UnsupportedValue`". A core or extended type nodemesh does not implement (CORS,
            # ExternalAuth; URLRewrite in a GRPCRoute; a RequestMirror on a backendRef) too:
            # GEP-1364's Accepted means that "Features being used by the resource are
            # supported".
            where = "on a backendRef nodemesh implements" if backend else "nodemesh implements"
            p.add(
                f"{fpath}.type",
                f"unsupported value {kind!r}; {where} "
                + ", ".join(implemented)
                + (" (per backend, Envoy changes headers only)" if backend else ""),
            )
        elif kind == "RequestHeaderModifier":
            out.request_headers, host = _mutation(
                as_map(f.get("requestHeaderModifier")),
                f"{fpath}.requestHeaderModifier",
                p,
                request=True,
            )
        elif kind == "ResponseHeaderModifier":
            out.response_headers, _ = _mutation(
                as_map(f.get("responseHeaderModifier")),
                f"{fpath}.responseHeaderModifier",
                p,
                request=False,
            )
        elif kind == "URLRewrite":
            spec = as_map(f.get("urlRewrite"))
            full, prefix = None, None
            if "path" in spec:
                full, prefix = _path_modifier(as_map(spec["path"]), f"{fpath}.urlRewrite.path", p)
            if prefix is not None and not prefix_match:
                p.add(f"{fpath}.urlRewrite.path", "ReplacePrefixMatch needs a PathPrefix match")
            hostname = header_text(str(spec.get("hostname", "")), f"{fpath}.urlRewrite.hostname", p)
            out.rewrite = ir.Rewrite(hostname, full, prefix)
        elif kind == "RequestRedirect":
            spec = as_map(f.get("requestRedirect"))
            full, prefix = None, None
            if "path" in spec:
                full, prefix = _path_modifier(
                    as_map(spec["path"]), f"{fpath}.requestRedirect.path", p
                )
            if prefix is not None and not prefix_match:
                p.add(
                    f"{fpath}.requestRedirect.path", "ReplacePrefixMatch needs a PathPrefix match"
                )
            code = spec.get("statusCode", 302)
            if code not in (301, 302, 303, 307, 308):
                p.add(f"{fpath}.requestRedirect.statusCode", f"unsupported value {code!r}")
            scheme = spec.get("scheme", "")
            if scheme not in ("", "http", "https"):  # Gateway API's enum (files mode: unchecked)
                p.add(f"{fpath}.requestRedirect.scheme", f"unsupported value {scheme!r}")
            out.redirect = ir.Redirect(
                scheme=str(scheme),
                hostname=header_text(
                    str(spec.get("hostname", "")), f"{fpath}.requestRedirect.hostname", p
                ),
                port=int_in(spec.get("port"), f"{fpath}.requestRedirect.port", p, 1, 65535),
                full_path=full,
                prefix=prefix,
                status_code=code if isinstance(code, int) else 302,
            )
        elif kind == "RequestMirror":
            spec = as_map(f.get("requestMirror"))
            target = _backend(
                as_map(spec.get("backendRef")),
                f"{fpath}.requestMirror.backendRef",
                route_ns,
                services,
                refs,
                grpc=route_kind == "GRPCRoute",
            )
            percent = 100.0
            if "percent" in spec and "fraction" in spec:
                p.add(f"{fpath}.requestMirror", "takes percent or fraction, not both")
            elif "percent" in spec:
                value = int_in(spec.get("percent"), f"{fpath}.requestMirror.percent", p, 0, 100)
                percent = float(value) if value is not None else 100.0
            elif "fraction" in spec:
                frac = as_map(spec["fraction"])
                num, den = frac.get("numerator"), frac.get("denominator", 100)
                if (
                    not isinstance(num, int)
                    or not isinstance(den, int)
                    or not 0 <= num <= den
                    or den <= 0
                ):
                    p.add(f"{fpath}.requestMirror.fraction", "needs 0 <= numerator <= denominator")
                else:
                    percent = 100.0 * num / den
            if target is not None:
                out.mirrors.append((target, percent))
        else:
            # ExtensionRef. nodemesh has no custom filters. Gateway API: "If a reference to a
            # custom filter type cannot be resolved, the filter MUST NOT be skipped", its
            # requests get an HTTP error; GEP-1364 makes it a reference failure (Accepted stays
            # True, ResolvedRefs=False with InvalidKind), like a backendRef of an unknown kind.
            ext = as_map(f.get("extensionRef"))
            refs.problems.append(
                (
                    "InvalidKind",
                    f"{fpath}.extensionRef: {ext.get('group') or 'core'}/{ext.get('kind')} "
                    f"{ext.get('name')!r} is not a filter nodemesh implements",
                )
            )
            out.unresolved = True
    if host:  # a URLRewrite's hostname, if any, is the more specific and wins
        if out.rewrite is None:
            out.rewrite = ir.Rewrite(host, None, None)
        elif not out.rewrite.hostname:
            out.rewrite = replace(out.rewrite, hostname=host)
    return out


# What a request gets when the backendRef it would go to is invalid (or the rule has none and
# no RequestRedirect, which Gateway API allows: backendRefs is optional; or an ExtensionRef
# filter cannot be resolved). Gateway API says 500 for HTTPRoute and UNAVAILABLE for GRPCRoute:
# Envoy's local reply to a gRPC request carries grpc-status UNAVAILABLE for HTTP 503 (500 would
# give UNKNOWN).
_NO_BACKEND_STATUS = {"HTTPRoute": 500, "GRPCRoute": 503}


def _backoff(value: Any, path: str, p: Problems) -> int | None:
    """`retry.backoff` in ms. Gateway API allows "0s" (retry at once); Envoy refuses a zero
    `base_interval` (and the NACK would hold back every Service's routes), so 0 is 1 ms."""
    ms = parse_duration(value, path, p)
    return max(ms, 1) if ms is not None else None


# A match parser returns the match and its precedence (smaller first). Precedence is the
# route kind's own (Gateway API orders HTTPRoute rules by path, GRPCRoute rules by service and
# method, which a GRPCRoute's path match has lost), so each kind's file computes it; ties go
# to the older route, then namespace/name, then rule and match order (`read_route`).
MatchParser = Callable[[Mapping[str, Any], str, Problems], tuple[ir.RouteMatch, tuple[Any, ...]]]


def read_route(
    obj: Mapping[str, Any],
    kind: str,
    services: Mapping[tuple[str, str], ServiceModel],
    parse_match: MatchParser,
    allows_retry: bool,
) -> RouteModel:
    meta = as_map(obj.get("metadata"))
    ns, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
    key = f"{kind}/{ns}/{name}"
    gen = generation(obj)
    model = RouteModel(key, gen)
    spec = as_map(obj.get("spec"))
    p = Problems()
    refs = _Refs()

    # Parents: only Services (GAMMA). Gateways belong to other controllers: no status from us.
    parents: list[tuple[str, tuple[str, str, int | None]]] = []
    rejected: list[tuple[str, str, str]] = []
    labels: set[str] = set()
    for i, ref in enumerate(as_list(spec.get("parentRefs"))):
        ref = as_map(ref)
        if ref.get("kind") != "Service" or ref.get("group", "") not in ("", "core"):
            continue
        pns, pname = str(ref.get("namespace") or ns), str(ref.get("name", ""))
        port = ref.get("port") if isinstance(ref.get("port"), int) else None
        # GAMMA: a Service parent's sectionName is the name of one of its ports.
        section = str(ref.get("sectionName") or "")
        label = parent_label(
            ref.get("namespace") and pns, pname, port, section, str(ref.get("group") or "")
        )
        if label in labels:
            continue  # the same parentRef written twice: one status entry, rules once
        labels.add(label)
        where = f"spec.parentRefs[{i}]: Service {pns}/{pname}"
        svc = services.get((pns, pname))
        named = svc.port_named(section) if svc is not None and section else None
        if svc is None:
            problem = f"{where} not found"
        elif svc.headless:
            # GEP-1294: no frontend (no ClusterIP); its clients connect to its pods directly,
            # where no route applies.
            problem = f"{where} is headless (clusterIP: None) and cannot be a parent"
        elif section and named is None:
            problem = f"{where} has no port named {section!r}"
        elif named is not None and port is not None and named.port != port:
            problem = f"{where}: sectionName {section!r} is port {named.port}, not {port}"
        elif port is not None and svc.port(port) is None:
            problem = f"{where} has no port {port}"
        elif (one := named or (svc.port(port) if port is not None else None)) and one.not_http:
            # its connections never reach the node Envoy: a route there would do nothing
            problem = f"{where}: port {one.port} is not HTTP ({one.not_http})"
        elif one is None and (why := no_http_port(svc.ports)):
            problem = f"{where} has no HTTP port ({why})"
        else:
            parents.append((label, (pns, pname, named.port if named is not None else port)))
            continue
        rejected.append((label, "NoMatchingParent", problem))

    # Rules.
    order = (creation(obj), f"{ns}/{name}")
    entries: list[RouteEntry] = []
    for ri, rule in enumerate(as_list(spec.get("rules")) or [{}]):
        rule = as_map(rule)
        rpath = f"spec.rules[{ri}]"
        rule_name = str(rule.get("name") or f"rule-{ri}")
        parsed = [
            parse_match(as_map(m), f"{rpath}.matches[{mi}]", p)
            for mi, m in enumerate(as_list(rule.get("matches")))
        ] or [parse_match({}, f"{rpath}.matches", p)]  # no matches: the kind's match-all
        matches = [m for m, _ in parsed]
        all_prefix = all(m.path.kind == "PathPrefix" for m in matches)
        filters = _filters(
            as_list(rule.get("filters")),
            f"{rpath}.filters",
            ns,
            kind,
            services,
            p,
            refs,
            all_prefix,
        )
        if filters.redirect is not None and as_list(rule.get("backendRefs")):
            # Gateway API's rule: a redirect answers before any backend is picked, so the
            # backendRefs were silently unused.
            p.add(
                f"{rpath}.backendRefs", "a rule with a RequestRedirect filter takes no backendRefs"
            )
        backends: list[ir.Backend] = []
        weights_total = 0
        invalid_weight = 0  # answered with the rule's status, not spread over the valid ones
        for bi, b in enumerate(as_list(rule.get("backendRefs"))):
            b = as_map(b)
            weight = int_in(
                b.get("weight", 1), f"{rpath}.backendRefs[{bi}].weight", p, 0, 1_000_000
            )
            target = _backend(
                b, f"{rpath}.backendRefs[{bi}]", ns, services, refs, grpc=kind == "GRPCRoute"
            )
            # Gateway API: "executed if and only if the request is being forwarded to the
            # backend defined here", after the rule's (translate keeps that order).
            own = _filters(
                as_list(b.get("filters")),
                f"{rpath}.backendRefs[{bi}].filters",
                ns,
                kind,
                services,
                p,
                refs,
                all_prefix,
                backend=True,
            )
            weights_total += weight or 0
            if not weight:
                continue
            if target is None or own.unresolved:  # an ExtensionRef fails its share closed
                invalid_weight += weight
                continue
            model.clusters.add(target)
            backends.append(
                ir.Backend(
                    services[target[:2]].cluster_name(target[2]),
                    weight,
                    own.request_headers,
                    own.response_headers,
                    own.rewrite.hostname if own.rewrite is not None else "",
                )
            )
        timeouts = as_map(rule.get("timeouts"))
        request_ms = parse_duration(timeouts.get("request"), f"{rpath}.timeouts.request", p)
        backend_ms = parse_duration(
            timeouts.get("backendRequest"), f"{rpath}.timeouts.backendRequest", p
        )
        if request_ms and backend_ms and backend_ms > request_ms:
            p.add(f"{rpath}.timeouts.backendRequest", "must not be longer than timeouts.request")
        retry = None
        if "retry" in rule:
            if not allows_retry:
                p.add(f"{rpath}.retry", f"{kind} has no retry field")
            r = as_map(rule["retry"])
            codes = as_list(r.get("codes"))
            retry = RetrySpec(
                status_codes=tuple(
                    c
                    for ci, c in enumerate(codes)
                    if int_in(c, f"{rpath}.retry.codes[{ci}]", p, 400, 599)
                )
                or None,
                attempts=int_in(r.get("attempts"), f"{rpath}.retry.attempts", p, 0, 100),
                backoff_base_ms=_backoff(r.get("backoff"), f"{rpath}.retry.backoff", p),
            )
        if rule.get("sessionPersistence") is not None:
            # Gateway API's extended feature (experimental channel): ignored, its route said
            # Accepted while no request kept to an endpoint
            p.add(
                f"{rpath}.sessionPersistence",
                "not implemented by nodemesh (a TrafficPolicy's loadBalancer hashOn a cookie "
                "or header keeps a client on one endpoint)",
            )
        for mi, (m, precedence) in enumerate(parsed):
            for mirror_target, _ in filters.mirrors:
                model.clusters.add(mirror_target)
            route = ir.Route(
                name=f"{key}/{rule_name}/{mi}",
                match=m,
                backends=() if filters.unresolved else tuple(backends),
                invalid_weight=0 if filters.unresolved or not backends else invalid_weight,
                direct_status=_NO_BACKEND_STATUS[kind],
                grpc_calls=kind == "GRPCRoute",
                # an ExtensionRef fails the rule closed, its redirect too (it redirected)
                redirect=None if filters.unresolved else filters.redirect,
                request_headers=filters.request_headers,
                response_headers=filters.response_headers,
                rewrite=filters.rewrite,
                mirrors=tuple(
                    ir.Mirror(services[t[:2]].cluster_name(t[2]), pct) for t, pct in filters.mirrors
                ),
                origins=(key,),
            )
            # The kinds apart (their precedences differ), GRPCRoute first; where both attach
            # to one Service port only the GRPCRoutes stay (`_engine._one_kind_each`).
            sort_key = (kind != "GRPCRoute", *precedence, order, ri, mi)
            entries.append(
                RouteEntry((ns, "", None), sort_key, route, retry, request_ms, backend_ms)
            )

    for label, reason, message in rejected:
        model.conditions.append(Condition("Accepted", "False", reason, message, gen, label))
    if p:
        for label, _ in parents:
            model.conditions.append(
                Condition("Accepted", "False", "UnsupportedValue", "; ".join(p), gen, label)
            )
        model.clusters.clear()
        return model
    # A port gets each rule once, however many parentRefs name it: a parentRef without a port
    # names them all, so one with a port (or a sectionName) then repeats it, as does a second
    # one to the same port or to the whole Service (`{name: web, namespace: shop}`).
    whole = {parent[:2] for _, parent in parents if parent[2] is None}
    attached: set[tuple[str, str, int | None]] = set()
    for label, parent in parents:
        repeat = parent in attached or (parent[2] is not None and parent[:2] in whole)
        attached.add(parent)
        model.conditions.append(
            Condition("Accepted", "True", "Accepted", "Route is accepted", gen, label)
        )
        if refs.problems:
            reason = refs.problems[0][0]
            message = "; ".join(m for _, m in refs.problems)
            model.conditions.append(Condition("ResolvedRefs", "False", reason, message, gen, label))
        else:
            model.conditions.append(
                Condition(
                    "ResolvedRefs", "True", "ResolvedRefs", "All references resolved", gen, label
                )
            )
        # A Service in another namespace makes this a consumer route for it: its rules apply
        # only to clients in the route's namespace (their match says so).
        consumer = ns if parent[0] != ns else ""
        for e in entries:
            route = e.route
            if consumer:
                route = replace(route, match=replace(route.match, consumer=consumer))
            model.entries.append(
                RouteEntry(
                    parent,
                    e.sort_key,
                    route,
                    e.retry,
                    e.timeout_ms,
                    e.backend_timeout_ms,
                    label,
                    repeat,
                )
            )
    if not parents:
        model.clusters.clear()
    return model
