"""Property tests: a real Envoy ACKs (no NACK) every policy that nodemesh's CRD accepts (its
schema and CEL rules), and every HTTPRoute and GRPCRoute that Gateway API's schema accepts
(and the CEL rules the strategies below follow) unless the builder refuses it, which it must
do with Accepted=False naming the fields; and the two together (policies on a route's
parent and backends, merged into its rules). Gateway API's schema limits header values, `remove`
entries and rewritten paths only in length, so they carry `%`, control characters, ""."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.store import ObjectKey
from tests import gatewayapi
from tests.controlplane import crd
from tests.e2e.conftest import Backends
from tests.e2e.mesh import HTTP_PORT, NODE, Mesh, endpoint_slice, service
from tests.e2e.objects import grpc_route, http_route, policy, to

pytestmark = pytest.mark.asyncio(loop_scope="module")

# What the API server takes, from the CRD itself (its ranges, patterns and CEL rules).
policy_specs = crd.policy_specs()

# What Gateway API's standard CRDs take for the fields nodemesh reads (schema: patterns,
# lengths, enums, ranges; CEL rules: the ones on filters, paths and timeouts), drawn by hand.

durations = st.builds(
    lambda parts: "".join(f"{n}{u}" for n, u in parts),
    st.lists(
        st.tuples(st.integers(0, 99999), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    ),
)
# HTTP header names (RFC 7230 tokens), as Gateway API's pattern has them, any case.
header_names = st.one_of(
    st.from_regex(r"\A[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,12}\Z"),
    st.sampled_from(["Host", "host", "TE", "Connection", "content-length", "x-a", "X-A", "x-b"]),
)
# Header and query values: the schema limits only the length, so any character may come.
texts = st.one_of(
    st.text(min_size=1, max_size=16),
    st.from_regex(r"\A[ -~]{1,16}\Z"),
    st.sampled_from(["50%", "%%", "%REQ(:path)%", "%FOO%", "a\nb", "a\rb", "\x00", " ", "\t"]),
    st.integers(1, 4096).map(lambda n: "v" * n),
)
# Regular expressions that RE2 and Python both take (checking their syntax is parse_regex's).
regexes = st.lists(
    st.one_of(
        st.from_regex(r"\A[a-zA-Z0-9_-]{1,6}\Z"),
        st.sampled_from([".", ".*", "[0-9]+", "[a-z]*", "\\d", "\\w+", "(a|b)", "x?", "\\.", "%"]),
    ),
    min_size=1,
    max_size=4,
).map("".join)
# Exact and PathPrefix values: Gateway API's characters, and its CEL rules ("//", "/./",
# "/../", "%2f", "#", a trailing "/." or "/..").
_SEGMENT = r"(?:[-A-Za-z0-9._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2}){1,8}"
paths = st.from_regex(rf"\A/(?:{_SEGMENT}(?:/{_SEGMENT}){{0,3}}/?)?\Z").filter(
    lambda p: (
        not any(s in p for s in ("//", "/./", "/../", "%2f", "%2F", "#"))
        and not p.endswith(("/..", "/."))
    )
)
path_matches = st.one_of(
    st.builds(
        lambda t, v: {"type": t, "value": v}, st.sampled_from(["Exact", "PathPrefix"]), paths
    ),
    regexes.map(lambda v: {"type": "RegularExpression", "value": "/" + v}),
)
# RFC 1123 subdomains (Gateway API's PreciseHostname)
hostnames = st.from_regex(
    r"\A[a-z0-9]([-a-z0-9]{0,6}[a-z0-9])?(\.[a-z0-9]([-a-z0-9]{0,4}[a-z0-9])?){0,2}\Z"
)
# ReplaceFullPath and ReplacePrefixMatch: only a length limit.
rewrite_paths = st.one_of(paths, st.text(max_size=16), st.just("/"))


def optional(d: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of the given strategies' keys."""
    return st.fixed_dictionaries({}, optional=d)


def name_values(values: st.SearchStrategy[str]) -> st.SearchStrategy[list[dict[str, str]]]:
    # listMapKey name: names are unique as written (X-A and x-a are two).
    return st.lists(
        st.builds(lambda n, v: {"name": n, "value": v}, header_names, values),
        max_size=3,
        unique_by=lambda h: h["name"],
    )


def string_matches(values: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, str]]:
    return st.one_of(
        st.builds(lambda n, v: {"name": n, "value": v}, header_names, values),
        st.builds(
            lambda n, v: {"type": "RegularExpression", "name": n, "value": v},
            header_names,
            regexes,
        ),
        st.builds(lambda n, v: {"type": "Exact", "name": n, "value": v}, header_names, values),
    )


header_match_lists = st.lists(string_matches(texts), max_size=3, unique_by=lambda h: h["name"])
http_matches = optional(
    {
        "path": path_matches,
        "headers": header_match_lists,
        "queryParams": st.lists(
            string_matches(texts.filter(lambda v: len(v) <= 1024)),
            max_size=3,
            unique_by=lambda q: q["name"],
        ),
        "method": st.sampled_from(
            ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
        ),
    }
)
header_mod = optional(
    {
        "set": name_values(texts),
        "add": name_values(texts),
        # Only a list of strings in the schema (no pattern, no minimum length).
        "remove": st.lists(
            st.one_of(header_names, st.text(max_size=8), st.sampled_from(["", ":path", "Host"])),
            max_size=3,
            unique=True,
        ),
    }
)


def path_modifier() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        rewrite_paths.map(lambda p: {"type": "ReplaceFullPath", "replaceFullPath": p}),
        rewrite_paths.map(lambda p: {"type": "ReplacePrefixMatch", "replacePrefixMatch": p}),
    )


def mirror(backend: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    share = st.one_of(
        st.just({}),
        st.integers(0, 100).map(lambda n: {"percent": n}),
        st.integers(1, 2**31 - 1).flatmap(
            lambda d: st.integers(0, d).map(
                lambda n: {"fraction": {"numerator": n, "denominator": d}}
            )
        ),
        st.integers(0, 100).map(lambda n: {"fraction": {"numerator": n}}),
    )
    return st.builds(
        lambda b, s: {"type": "RequestMirror", "requestMirror": {"backendRef": b, **s}},
        backend,
        share,
    )


def backend_refs(ns: str | None, max_size: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Up to `max_size` Services (prop-missing does not exist: its share answers 500), each
    maybe with filters of its own."""
    ref = st.builds(
        lambda n, w, f: {**to(n, w), **({"namespace": ns} if ns else {}), **f},
        st.sampled_from(["prop-a", "prop-b", "prop-missing"]),
        st.one_of(st.none(), st.integers(0, 1_000_000), st.integers(0, 3)),
        st.sampled_from([False, False, True]).flatmap(
            lambda some: backend_filters(ns).map(lambda f: {"filters": f}) if some else st.just({})
        ),
    )
    return st.lists(ref, max_size=max_size)


def mirror_ref(ns: str | None) -> st.SearchStrategy[dict[str, Any]]:
    return st.sampled_from(["prop-a", "prop-b"]).map(
        lambda n: {**to(n), **({"namespace": ns} if ns else {})}
    )


# Header changes the builder takes, so that routes with them get to the Envoy more often.
printable_header_mod = optional(
    {
        "set": name_values(st.from_regex(r"\A[ -~]{1,16}\Z")),
        "add": name_values(st.from_regex(r"\A[ -~]{1,16}\Z")),
        "remove": st.lists(
            header_names.filter(lambda n: n.lower() != "host"), max_size=3, unique=True
        ),
    }
)


def backend_filters(ns: str | None) -> st.SearchStrategy[list[dict[str, Any]]]:
    """A backendRef's filters (HTTPRoute's and GRPCRoute's schemas take the same types there
    as in a rule; CEL: each type at most once): mostly header modifiers, which nodemesh
    implements there; now and then a mirror, which it refuses there (and with it the route)."""
    one = st.sampled_from(
        ["RequestHeaderModifier", "ResponseHeaderModifier"] * 8 + ["RequestMirror"]
    ).flatmap(
        lambda kind: (
            mirror(mirror_ref(ns))
            if kind == "RequestMirror"
            else (header_mod | printable_header_mod).map(
                lambda m: {"type": kind, kind[0].lower() + kind[1:]: m}
            )
        )
    )
    return st.lists(one, min_size=1, max_size=2, unique_by=lambda f: f["type"])


timeouts = st.builds(
    lambda r, b: {k: v for k, v in (("request", r), ("backendRequest", b)) if v is not None},
    st.none() | durations,
    st.none() | durations,
).filter(
    # CEL: backendRequest must not be longer than a request timeout that is not 0s.
    lambda t: (
        "request" not in t
        or "backendRequest" not in t
        or _ms(t["request"]) == 0
        or _ms(t["backendRequest"]) <= _ms(t["request"])
    )
)


def _ms(d: str) -> int:
    unit = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    return sum(int(n) * unit[u] for n, u in re.findall(r"([0-9]+)(ms|h|m|s)", d))


def _prefix_only(rule: dict[str, Any]) -> bool:
    """Whether the rule has a ReplacePrefixMatch (CEL: then exactly one PathPrefix match)."""
    return any(
        (f.get("urlRewrite") or f.get("requestRedirect") or {}).get("path", {}).get("type")
        == "ReplacePrefixMatch"
        for f in rule.get("filters", ())
    )


def header_filters(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A rule's request and response header modifiers, each maybe."""
    filters = []
    for kind, key in (
        ("RequestHeaderModifier", "requestHeaderModifier"),
        ("ResponseHeaderModifier", "responseHeaderModifier"),
    ):
        if draw(st.booleans()):
            filters.append({"type": kind, key: draw(header_mod)})
    return filters


@st.composite
def http_rules(draw: st.DrawFn, ns: str | None = None) -> list[dict[str, Any]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        rule: dict[str, Any] = {}
        if draw(st.booleans()):
            rule["matches"] = draw(st.lists(http_matches, max_size=3))
        filters = header_filters(draw)
        # CEL: URLRewrite and RequestRedirect not together, and neither twice.
        which = draw(st.sampled_from(["", "URLRewrite", "RequestRedirect"]))
        if which == "URLRewrite":
            spec = draw(optional({"hostname": hostnames, "path": path_modifier()}))
            filters.append({"type": "URLRewrite", "urlRewrite": spec})
        elif which == "RequestRedirect":
            spec = draw(
                optional(
                    {
                        "scheme": st.sampled_from(["http", "https"]),
                        "hostname": hostnames,
                        "path": path_modifier(),
                        "port": st.integers(1, 65535),
                        "statusCode": st.sampled_from([301, 302, 303, 307, 308]),
                    }
                )
            )
            filters.append({"type": "RequestRedirect", "requestRedirect": spec})
        filters += draw(st.lists(mirror(mirror_ref(ns)), max_size=2))
        if filters:
            rule["filters"] = draw(st.permutations(filters))
        if _prefix_only(rule):
            first = (rule.get("matches") or [{}])[0]
            prefix = draw(paths)
            rule["matches"] = [{**first, "path": {"type": "PathPrefix", "value": prefix}}]
        # CEL: a RequestRedirect rule has no backendRefs.
        refs = draw(backend_refs(ns, 0 if which == "RequestRedirect" else 4))
        if refs or draw(st.booleans()):
            rule["backendRefs"] = refs
        if draw(st.booleans()):
            rule["timeouts"] = draw(timeouts)
        if draw(st.booleans()):
            rule["retry"] = draw(
                optional(
                    {
                        "codes": st.lists(st.integers(400, 599), max_size=3, unique=True),
                        "attempts": st.integers(0, 100),
                        "backoff": durations,
                    }
                )
            )
        out.append(rule)
    return out


# GAMMA: a Service parent, the whole Service, its port by number, by name, or both.
parent_refs = st.sampled_from(
    [{}, {"port": 80}, {"sectionName": "http"}, {"port": 80, "sectionName": "http"}]
)
grpc_services = st.from_regex(
    r"\A\.?[A-Za-z_][A-Za-z_0-9]{0,5}(\.[A-Za-z_][A-Za-z_0-9]{0,5}){0,2}\Z"
)
grpc_methods = st.from_regex(r"\A[A-Za-z_][A-Za-z_0-9]{0,7}\Z")
grpc_method_matches = st.one_of(
    st.builds(
        lambda s, m: {k: v for k, v in (("service", s), ("method", m)) if v},
        st.none() | grpc_services,
        st.none() | grpc_methods,
    ),
    st.builds(
        lambda s, m: {
            "type": "RegularExpression",
            **{k: v for k, v in (("service", s), ("method", m)) if v},
        },
        st.none() | regexes,
        st.none() | regexes,
    ),
).filter(lambda m: "service" in m or "method" in m)  # CEL: one or both
grpc_matches = optional({"method": grpc_method_matches, "headers": header_match_lists})


@st.composite
def grpc_rules(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        rule: dict[str, Any] = {}
        if draw(st.booleans()):
            rule["matches"] = draw(st.lists(grpc_matches, max_size=3))
        filters = header_filters(draw)
        filters += draw(st.lists(mirror(mirror_ref(None)), max_size=2))
        if filters:
            rule["filters"] = draw(st.permutations(filters))
        refs = draw(backend_refs(None, 4))
        if refs or draw(st.booleans()):
            rule["backendRefs"] = refs
        out.append(rule)
    return out


# A client pod of the consumer namespace on the node (so its own Listener is built).
CLIENT_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "client", "namespace": "props"},
    "spec": {"nodeName": NODE},
    "status": {"phase": "Running", "podIP": "127.0.0.7"},
}


async def setup_services(mesh: Mesh, backends: Backends, h2: bool = False) -> None:
    """Services prop (the parent), prop-a and prop-b (backends; `h2`: their ports say HTTP/2,
    as a GRPCRoute's backends must)."""
    a, b = await backends.get("prop-a"), await backends.get("prop-b")
    ports = (("http", 80, "kubernetes.io/h2c"),) if h2 else HTTP_PORT
    mesh.apply(
        service("prop"),
        service("prop-a", ports=ports),
        service("prop-b", ports=ports),
        endpoint_slice("prop-a", a.port),
        endpoint_slice("prop-b", b.port),
    )


async def assert_acked_without_nack(mesh: Mesh) -> None:
    await mesh.converge()
    node = mesh.server.status.node(NODE)
    assert node is not None
    nacks = [ts.last_nack for ts in node.types.values() if ts.last_nack is not None]
    assert not nacks, nacks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=policy_specs)
async def test_every_schema_valid_policy_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, spec: dict[str, Any]
) -> None:
    await setup_services(mesh, backends)
    obj = policy("prop-policy", "prop", **spec)
    assert crd.errors(obj) == []
    mesh.apply(obj)
    await assert_acked_without_nack(mesh)
    conds = mesh.pipeline.conditions()[ObjectKey("TrafficPolicy", "shop", "prop-policy")]
    assert all(c.status == "True" for c in conds if c.type != "Programmed"), conds


def assert_accepted_or_refused_precisely(mesh: Mesh, key: ObjectKey) -> bool:
    """Accepted=True with every other condition but Programmed True (backends that do not
    exist aside), or Accepted=False naming the fields it refuses."""
    conds = mesh.pipeline.conditions()[key]
    (accepted,) = [c for c in conds if c.type == "Accepted"]
    if accepted.status == "False":
        assert accepted.reason == "UnsupportedValue", conds
        for problem in accepted.message.split("; spec."):
            assert re.match(r"^(spec\.)?rules\[\d+\]\.\S+: \S", problem), accepted.message
        return False
    resolved = [c for c in conds if c.type == "ResolvedRefs"]
    assert all(c.status == "True" or "prop-missing" in c.message for c in resolved), conds
    return True


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_rules=http_rules(), parent=parent_refs)
async def test_every_valid_route_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, route_rules: list[dict[str, Any]], parent: dict[str, Any]
) -> None:
    """Whatever the builder accepts of what Gateway API's schema takes, Envoy ACKs; the rest
    is refused with a message naming the field."""
    await setup_services(mesh, backends)
    mesh.delete("TrafficPolicy", "prop-policy")
    route = http_route("prop-route", "prop", route_rules)
    route["spec"]["parentRefs"][0].update(parent)
    assert gatewayapi.errors([route]) == [[]]  # valid for Gateway API's own schema
    mesh.apply(route)
    await assert_acked_without_nack(mesh)
    assert_accepted_or_refused_precisely(mesh, ObjectKey("HTTPRoute", "shop", "prop-route"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_rules=grpc_rules(), parent=parent_refs)
async def test_every_valid_grpc_route_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, route_rules: list[dict[str, Any]], parent: dict[str, Any]
) -> None:
    await setup_services(mesh, backends, h2=True)
    mesh.delete("TrafficPolicy", "prop-policy")
    route = grpc_route("prop-grpc", "prop", route_rules)
    route["spec"]["parentRefs"][0].update(parent)
    assert gatewayapi.errors([route]) == [[]]
    mesh.apply(route)
    await assert_acked_without_nack(mesh)
    assert_accepted_or_refused_precisely(mesh, ObjectKey("GRPCRoute", "shop", "prop-grpc"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_rules=http_rules(ns="shop"))
async def test_every_valid_consumer_route_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, route_rules: list[dict[str, Any]]
) -> None:
    """The same, as a consumer route with a client pod on the node: the node's own Listener
    (its consumer chains) and the marked routes are ACKed too."""
    await setup_services(mesh, backends)
    mesh.delete("TrafficPolicy", "prop-policy")
    route = http_route("prop-consumer", "prop", route_rules, ns="props")
    route["spec"]["parentRefs"][0]["namespace"] = "shop"
    assert gatewayapi.errors([route]) == [[]]
    mesh.apply(route, CLIENT_POD)
    await assert_acked_without_nack(mesh)
    if assert_accepted_or_refused_precisely(mesh, ObjectKey("HTTPRoute", "props", "prop-consumer")):
        assert mesh.cache.get_snapshot(NODE) is not mesh.pipeline.snapshot  # its own Listener


# Routes and policies together: `_finish` merges a policy's retry, timeouts and fault into each
# route, and the hashing of a backend's policy, under the route's own settings.
combo_targets = st.lists(
    st.builds(
        lambda name, section: {
            "group": "",
            "kind": "Service",
            "name": name,
            **({"sectionName": "http"} if section else {}),
        },
        st.sampled_from(["prop", "prop-a", "prop-b"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=3,
    unique_by=lambda t: (t["name"], "sectionName" in t),
)
COMBO_ROUTES = (
    ObjectKey("HTTPRoute", "shop", "prop-combo"),
    ObjectKey("GRPCRoute", "shop", "prop-combo"),
    ObjectKey("HTTPRoute", "props", "prop-combo"),
)


@st.composite
def combo_routes(draw: st.DrawFn) -> tuple[ObjectKey, dict[str, Any]]:
    key = draw(st.sampled_from(COMBO_ROUTES))
    if key.kind == "GRPCRoute":
        route = grpc_route(key.name, "prop", draw(grpc_rules()))
    else:
        consumer = key.namespace != "shop"
        route = http_route(
            key.name, "prop", draw(http_rules(ns="shop" if consumer else None)), ns=key.namespace
        )
        if consumer:
            route["spec"]["parentRefs"][0]["namespace"] = "shop"
    route["spec"]["parentRefs"][0].update(draw(parent_refs))
    return key, route


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    drawn=combo_routes(),
    specs=st.lists(st.tuples(combo_targets, policy_specs), min_size=1, max_size=3),
)
async def test_every_valid_route_with_policies_is_acked_by_envoy(
    mesh: Mesh,
    backends: Backends,
    drawn: tuple[ObjectKey, dict[str, Any]],
    specs: list[tuple[list[dict[str, Any]], dict[str, Any]]],
) -> None:
    """Routes and the policies of their parent and backends, drawn together: whatever the
    builder accepts, Envoy ACKs (a policy's defaults merged into a route that redirects, splits
    between hashing backends, or sets its own retry and timeouts)."""
    await setup_services(mesh, backends, h2=drawn[0].kind == "GRPCRoute")
    others = (("HTTPRoute", "shop", "prop-route"), ("GRPCRoute", "shop", "prop-grpc"),
              ("HTTPRoute", "props", "prop-consumer"))  # fmt: skip
    for kind, ns, name in (*((k.kind, k.namespace, k.name) for k in COMBO_ROUTES), *others):
        mesh.delete(kind, name, ns)
    for i in range(4):
        mesh.delete("TrafficPolicy", f"prop-combo-{i}")
    mesh.delete("TrafficPolicy", "prop-policy")
    key, route = drawn
    assert gatewayapi.errors([route]) == [[]]
    policies = []
    for i, (targets, spec) in enumerate(specs):
        obj = policy(f"prop-combo-{i}", "prop", **spec)
        obj["spec"]["targetRefs"] = targets
        assert crd.errors(obj) == []
        policies.append(obj)
    mesh.apply(route, *policies, CLIENT_POD)
    await assert_acked_without_nack(mesh)
    assert_accepted_or_refused_precisely(mesh, key)
