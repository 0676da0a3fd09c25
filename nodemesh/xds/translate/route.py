"""IR virtual hosts and routes -> one Envoy `RouteConfiguration` (matches, actions, filters).

Route order inside a virtual host is decided by build (Gateway API precedence); this module keeps
it. Retry, fault and hashing details come from `retry.py`, `fault.py` and `lb.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._encode import LEN, strings_bytes, tag, varint
from nodemesh.xds.translate._proto import any_of, duration, fraction, uint32
from nodemesh.xds.translate.fault import FILTER_NAME as FAULT_FILTER
from nodemesh.xds.translate.fault import route_fault
from nodemesh.xds.translate.lb import hash_policies
from nodemesh.xds.translate.retry import retry_policy

__all__ = [
    "CONSUMER_STATE",
    "INVALID_BACKEND",
    "destination_route_configuration",
    "destination_route_configuration_bytes",
    "route",
    "route_configuration",
    "route_configuration_bytes",
    "virtual_host",
    "virtual_host_entry",
    "virtual_host_routes",
]

# The connection's filter state that names its client's namespace: set by the listener's
# filter chain for that namespace's pod IPs on the node (listener.py), matched by the routes of
# that namespace's consumer routes. A client cannot forge it: it is not a header.
CONSUMER_STATE = "nodemesh.consumer_namespace"

# The cluster that the share of an invalid backendRef is weighted to. No cluster has this name
# (theirs are "namespace/name:port"), so Envoy answers that share with the route's
# `cluster_not_found_response_code`; routes come by RDS, whose `validate_clusters` is off by
# default, so the name does not make Envoy refuse the route configuration.
INVALID_BACKEND = "nodemesh.invalid-backend"

# The statuses `cluster_not_found_response_code` can give; 503 is its default (the enum's 0).
_NOT_FOUND_CODES = {
    404: rc.RouteAction.NOT_FOUND,
    500: rc.RouteAction.INTERNAL_SERVER_ERROR,
    503: rc.RouteAction.SERVICE_UNAVAILABLE,
}

_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}


def route_configuration(
    name: str, vhosts: Iterable[rc.VirtualHost]
) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=list(vhosts))


_RC_NAME = tag(route_pb2.RouteConfiguration, "name", LEN)
_RC_VHOSTS = tag(route_pb2.RouteConfiguration, "virtual_hosts", LEN)


_VH_NAME = tag(rc.VirtualHost, "name", LEN)
_VH_DOMAINS = tag(rc.VirtualHost, "domains", LEN)
_VH_ROUTES = tag(rc.VirtualHost, "routes", LEN)
_R_NAME = tag(rc.Route, "name", LEN)
_R_ROUTE = tag(rc.Route, "route", LEN)
_RA_CLUSTER = tag(rc.RouteAction, "cluster", LEN)
# `timeout: 0s` (see `_action`): an empty Duration, present
_RA_NO_TIMEOUT = tag(rc.RouteAction, "timeout", LEN) + varint(0)
assert (
    rc.RouteAction.DESCRIPTOR.fields_by_name["cluster"].number
    < rc.RouteAction.DESCRIPTOR.fields_by_name["timeout"].number
)
_DEFAULT_MATCH = ir.RouteMatch()
# The default of `ir.Route.match`: most routes hold this very object (no field-by-field ==).
_ROUTE_DEFAULT_MATCH = ir.Route("").match


def _plain(r: ir.Route) -> bool:
    """A route that `route` turns into: match any path, send to one cluster, nothing else."""
    return (
        len(r.backends) == 1
        and (b := r.backends[0]).cluster != ""  # a oneof member: even "" would be written
        and b.request_headers is None
        and b.response_headers is None
        and not b.hostname
        and not r.invalid_weight
        and (r.match is _ROUTE_DEFAULT_MATCH or r.match == _DEFAULT_MATCH)
        and r.redirect is None
        and r.request_headers is None
        and r.response_headers is None
        and r.rewrite is None
        and not r.mirrors
        and r.timeout_ms is None
        and r.idle_timeout_ms is None
        and r.retry is None
        and r.fault is None
        and not r.hash_header
        and not r.hash_cookie
        and r.hash_cookie_ttl_ms is None
        and not r.hash_source_ip
    )


def _field(tag_bytes: bytes, payload: bytes) -> bytes:
    return tag_bytes + varint(len(payload)) + payload


_MATCH_ALL = _field(tag(rc.Route, "match", LEN), _field(tag(rc.RouteMatch, "prefix", LEN), b"/"))


def virtual_host_routes(vh: ir.VirtualHost) -> bytes:
    """The bytes of `virtual_host(vh)` after its name and domains (fields 1 and 2; what follows
    is its routes). Routes that are all plain (most Services: one default route) are encoded
    here, fields in field-number order as protobuf's deterministic serialization writes them."""
    routes = vh.routes
    if len(routes) == 1 and _plain(routes[0]):  # most: a Service's default route
        return _plain_route(routes[0])
    if not all(_plain(r) for r in routes):
        message = rc.VirtualHost(routes=[route(r) for r in routes])
        out: bytes = message.SerializeToString(deterministic=True)
        return out
    return b"".join([_plain_route(r) for r in routes])


def _plain_route(r: ir.Route) -> bytes:
    """One `VirtualHost.routes` entry for a plain route (see `_plain`)."""
    cluster = r.backends[0].cluster.encode()
    action = _RA_CLUSTER + varint(len(cluster)) + cluster + _RA_NO_TIMEOUT
    body = _MATCH_ALL + _R_ROUTE + varint(len(action)) + action
    name = r.name.encode()
    if name:
        body += _R_NAME + varint(len(name)) + name
    return _VH_ROUTES + varint(len(body)) + body


def virtual_host_entry(
    vh: ir.VirtualHost, routes: bytes | None = None, domains: Iterable[str] | None = None
) -> bytes:
    """`virtual_host(vh)` as one `RouteConfiguration.virtual_hosts` entry (tag, length, bytes),
    from `virtual_host_routes(vh)` (made when not given); `domains` instead of `vh.domains`."""
    if routes is None:
        routes = virtual_host_routes(vh)
    name = vh.name.encode()
    domain_fields = strings_bytes(_VH_DOMAINS, vh.domains if domains is None else domains)
    size = len(domain_fields) + len(routes)
    if name:
        n = len(name)
        size += len(_VH_NAME) + len(varint(n)) + n
        return b"".join(
            (_RC_VHOSTS, varint(size), _VH_NAME, varint(n), name, domain_fields, routes)
        )
    return b"".join((_RC_VHOSTS, varint(size), domain_fields, routes))


def route_configuration_bytes(name: str, entries: Iterable[bytes]) -> bytes:
    """`route_configuration(name, ...)` serialized deterministically, from its virtual hosts'
    entries (`virtual_host_entry`): a message's fields are written in field-number order and an
    embedded message is its own bytes, so the configuration is its name and then the entries."""
    n = name.encode()
    return (_RC_NAME + varint(len(n)) + n if n else b"") + b"".join(entries)


def destination_route_configuration_bytes(
    name: str, vh: ir.VirtualHost, routes: bytes | None = None
) -> bytes:
    """`destination_route_configuration(name, virtual_host(vh))` serialized deterministically,
    from `virtual_host_routes(vh)` (made when not given)."""
    return route_configuration_bytes(name, [virtual_host_entry(vh, routes, _ANY_HOST)])


_ANY_HOST = ("*",)


def destination_route_configuration(name: str, vh: rc.VirtualHost) -> route_pb2.RouteConfiguration:
    """The route configuration of one Service port for connections redirected to it: its one
    virtual host matches any Host."""
    star = rc.VirtualHost()
    star.CopyFrom(vh)
    del star.domains[:]
    star.domains.append("*")
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=[star])


def virtual_host(vh: ir.VirtualHost) -> rc.VirtualHost:
    return rc.VirtualHost(
        name=vh.name, domains=list(vh.domains), routes=[route(r) for r in vh.routes]
    )


def _string_match(kind: str, value: str) -> string_pb2.StringMatcher:
    if kind == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value))
    return string_pb2.StringMatcher(exact=value)


def _match(m: ir.RouteMatch) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if m.path.kind == "Exact":
        out.path = m.path.value
    elif m.path.kind == "RegularExpression":
        out.safe_regex.regex = m.path.value
    else:
        # Gateway API prefixes match whole path segments ("/a" matches "/a/b", not "/ab").
        prefix = m.path.value.rstrip("/")
        if prefix:
            out.path_separated_prefix = prefix
        else:
            out.prefix = "/"
    for h in m.headers:
        out.headers.add(name=h.name, string_match=_string_match(h.kind, h.value))
    if m.method:
        out.headers.add(name=":method", string_match=string_pb2.StringMatcher(exact=m.method))
    for q in m.query:
        out.query_parameters.add(name=q.name, string_match=_string_match(q.kind, q.value))
    if m.grpc:
        out.grpc.SetInParent()
    if m.consumer:
        out.filter_state.add(
            key=CONSUMER_STATE, string_match=string_pb2.StringMatcher(exact=m.consumer)
        )
    return out


def _literal(value: str) -> str:
    """A header value as Envoy's `headers_to_add` takes a literal: there `%` starts a variable
    (`%REQ(x)%`), and a lone one is refused ("Couldn't find valid command"); `%%` is one `%`."""
    return value.replace("%", "%%")


def _header_options(mutation: ir.HeaderMutation) -> list[base_pb2.HeaderValueOption]:
    out = [
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=_literal(v)),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        for k, v in mutation.set
    ]
    out.extend(
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=k, value=_literal(v)),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD,
        )
        for k, v in mutation.add
    )
    return out


def _redirect(r: ir.Redirect, match: ir.RouteMatch) -> rc.RedirectAction:
    out = rc.RedirectAction(
        response_code=_REDIRECT_CODES.get(r.status_code, rc.RedirectAction.FOUND)
    )
    if r.scheme:
        out.scheme_redirect = r.scheme
    if r.hostname:
        out.host_redirect = r.hostname
    if r.port is not None:
        out.port_redirect = r.port
    if r.full_path is not None:
        out.path_redirect = r.full_path
    elif r.prefix is not None:
        _prefix_rewrite(out, match, r.prefix)
    return out


def _prefix_rewrite(
    out: rc.RouteAction | rc.RedirectAction, match: ir.RouteMatch, new: str
) -> None:
    old = match.path.value.rstrip("/")
    if new.rstrip("/") == "":
        # "/a" -> "/": Envoy's prefix_rewrite would leave "//b" for "/a/b"; a regex does not.
        out.regex_rewrite.pattern.regex = "^" + re.escape(old) + "/*"
        out.regex_rewrite.substitution = "/"
    elif old:
        out.prefix_rewrite = new.rstrip("/")  # the match is path-separated: "/a/b" -> "/new/b"
    else:
        # The match "/" (a rule without matches): Envoy swaps that "/" for the rewrite, so it
        # must end in "/": "/users" -> "/api/users", not "/apiusers". The one request "/" gets
        # "/api/".
        out.prefix_rewrite = new.rstrip("/") + "/"


def _then(
    first: ir.HeaderMutation | None, then: ir.HeaderMutation | None
) -> ir.HeaderMutation | None:
    """`first`'s header changes and then `then`'s, as one list of changes, which Envoy applies
    removals first and then the additions in order (`_header_options` writes sets before adds).
    So a header that `then` sets or removes is left out of `first`'s additions (`then` would
    overwrite or remove it), and `then`'s additions come after `first`'s, appending to them."""
    if first is None or then is None:
        return first if then is None else then
    later = {name for name, _ in then.set}.union(then.remove)
    return ir.HeaderMutation(
        set=tuple(h for h in first.set if h[0] not in later) + then.set,
        add=tuple(h for h in first.add if h[0] not in later) + then.add,
        remove=first.remove + tuple(n for n in then.remove if n not in first.remove),
    )


def _per_backend(r: ir.Route) -> tuple[bool, bool]:
    """Whether the route's request changes (headers and Host), and its response changes, go
    into each of its weighted clusters, followed there by that backend's own, instead of onto
    the route: they do where some backend has changes of its own. Gateway API applies a rule's
    filters and then a backend's; Envoy applies a weighted cluster's changes before its
    route's, whatever `most_specific_header_mutations_wins` says (that orders the route,
    virtual host and route configuration levels only; so in Envoy 1.40). Left on the route,
    the rule's `set` would overwrite the backend's and its `remove` take out what the backend
    added."""
    request = response = False
    for b in r.backends:
        request = request or b.request_headers is not None or bool(b.hostname)
        response = response or b.response_headers is not None
    return request, response


def _cluster_weight(
    out: rc.WeightedCluster.ClusterWeight,
    r: ir.Route,
    b: ir.Backend | None,
    request: bool,
    response: bool,
) -> None:
    """The header changes of one weighted cluster: the route's then backend `b`'s (None: the
    share of invalid backends, answered by Envoy itself, which gets the route's only)."""
    if request:
        mutation = _then(r.request_headers, b.request_headers if b else None)
        if mutation is not None:
            out.request_headers_to_add.extend(_header_options(mutation))
            out.request_headers_to_remove.extend(mutation.remove)
        if b is not None:  # the invalid share reaches no backend: no Host to rewrite
            host = b.hostname or (r.rewrite.hostname if r.rewrite is not None else "")
            if host:
                out.host_rewrite_literal = host
    if response:
        mutation = _then(r.response_headers, b.response_headers if b else None)
        if mutation is not None:
            out.response_headers_to_add.extend(_header_options(mutation))
            out.response_headers_to_remove.extend(mutation.remove)


def _action(r: ir.Route, request: bool = False, response: bool = False) -> rc.RouteAction:
    """`request`, `response`: see `_per_backend`."""
    out = rc.RouteAction()
    if len(r.backends) == 1 and not r.invalid_weight and not (request or response):
        out.cluster = r.backends[0].cluster
    else:
        for b in r.backends:
            cluster = out.weighted_clusters.clusters.add(name=b.cluster, weight=uint32(b.weight))
            _cluster_weight(cluster, r, b, request, response)
        if r.invalid_weight:
            cluster = out.weighted_clusters.clusters.add(
                name=INVALID_BACKEND, weight=uint32(r.invalid_weight)
            )
            _cluster_weight(cluster, r, None, request, response)
            out.cluster_not_found_response_code = _NOT_FOUND_CODES.get(
                r.direct_status, rc.RouteAction.INTERNAL_SERVER_ERROR
            )
    if r.rewrite is not None:
        if r.rewrite.hostname and not request:
            out.host_rewrite_literal = r.rewrite.hostname
        if r.rewrite.full_path is not None:
            out.regex_rewrite.pattern.regex = "^/.*$"
            # RE2 reads `\1` in a substitution as a capture group: a backslash stays one
            out.regex_rewrite.substitution = r.rewrite.full_path.replace("\\", "\\\\")
        elif r.rewrite.prefix is not None:
            _prefix_rewrite(out, r.match, r.rewrite.prefix)
    # No timeout unless one is asked for (0s): Envoy's own default, 15 s, would cut every
    # longer response, download or stream that has no limit without a mesh.
    if r.timeout_ms and r.grpc_calls:
        # A gRPC call's request timeout is the stream's: `timeout` starts once the request
        # has ended, which a bidi or client stream does only when the client half-closes
        # (such a stream ran past it without end), and its expiry reached clients as
        # UNAVAILABLE, which they retry, where a deadline is DEADLINE_EXCEEDED.
        out.timeout.CopyFrom(duration(0))
        out.max_stream_duration.max_stream_duration.CopyFrom(duration(r.timeout_ms))
    else:
        out.timeout.CopyFrom(duration(r.timeout_ms or 0))
    if r.idle_timeout_ms is not None:
        out.idle_timeout.CopyFrom(duration(r.idle_timeout_ms))
    if r.retry is not None:
        out.retry_policy.CopyFrom(retry_policy(r.retry))
    for m in r.mirrors:
        mirror = out.request_mirror_policies.add(cluster=m.cluster)
        if m.percent < 100:
            mirror.runtime_fraction.default_value.CopyFrom(fraction(m.percent))
    out.hash_policy.extend(
        hash_policies(r.hash_header, r.hash_cookie, r.hash_cookie_ttl_ms, r.hash_source_ip)
    )
    return out


def route(r: ir.Route) -> rc.Route:
    out = rc.Route(name=r.name, match=_match(r.match))
    request = response = False  # the route's header changes are in its weighted clusters
    if r.redirect is not None:
        out.redirect.CopyFrom(_redirect(r.redirect, r.match))
    elif not r.backends:
        out.direct_response.status = r.direct_status
    else:
        request, response = _per_backend(r)
        out.route.CopyFrom(_action(r, request, response))
    if r.request_headers is not None and not request:
        out.request_headers_to_add.extend(_header_options(r.request_headers))
        out.request_headers_to_remove.extend(r.request_headers.remove)
    if r.response_headers is not None and not response:
        out.response_headers_to_add.extend(_header_options(r.response_headers))
        out.response_headers_to_remove.extend(r.response_headers.remove)
    if r.fault is not None:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(any_of(route_fault(r.fault)))
    return out
