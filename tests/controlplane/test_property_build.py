"""Property tests for build: arbitrary junk in routes (their backendRefs' filters too) and
policies yields conditions, never an exception, and the translation stays consistent; what the
CRD or Envoy takes is accepted (policies; header modifiers on backendRefs, for their backend
only)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.builder import build
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds import types
from nodemesh.xds.translate import Translator, translate_messages
from tests.controlplane import crd
from tests.e2e.mesh import service

junk = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
spec_keys = st.sampled_from(
    [
        "parentRefs",
        "rules",
        "targetRefs",
        "retry",
        "timeouts",
        "circuitBreaker",
        "outlierDetection",
        "loadBalancer",
        "faultInjection",
        "matches",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["HTTPRoute", "GRPCRoute", "TrafficPolicy"]),
    spec=st.dictionaries(spec_keys, junk, max_size=5),
    rule=st.dictionaries(
        st.sampled_from(["matches", "filters", "backendRefs", "timeouts", "retry"]), junk
    ),
)
def test_junk_input_gives_conditions_not_exceptions(
    kind: str, spec: dict[str, Any], rule: dict[str, Any]
) -> None:
    store = Store()
    store.apply(service("web"))
    group = "nodemesh.io/v1alpha1" if kind == "TrafficPolicy" else "gateway.networking.k8s.io/v1"
    if kind != "TrafficPolicy":
        spec.setdefault("parentRefs", [{"kind": "Service", "name": "web"}])
        spec.setdefault("rules", [rule])
    store.apply(
        {
            "apiVersion": group,
            "kind": kind,
            "metadata": {"name": "j", "namespace": "shop"},
            "spec": spec,
        }
    )
    result = build(store.view())
    assert Translator().translate(result.mesh).snapshot().consistent() == []
    key = ObjectKey(kind, "shop", "j")
    if kind == "TrafficPolicy" or result.conditions.get(key):
        assert result.conditions[key], "a policy always gets conditions"


filter_types = st.sampled_from(
    ["RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror", "URLRewrite",
     "RequestRedirect", "ExtensionRef", "CORS"]
) | junk  # fmt: skip
junk_filters = st.lists(
    st.fixed_dictionaries(
        {"type": filter_types},
        optional={
            "requestHeaderModifier": st.dictionaries(
                st.sampled_from(["set", "add", "remove"]), junk, max_size=3
            )
            | junk,
            "responseHeaderModifier": junk,
            "extensionRef": junk,
            "requestMirror": junk,
        },
    ),
    max_size=3,
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["HTTPRoute", "GRPCRoute"]),
    refs=st.lists(
        st.fixed_dictionaries(
            {"name": st.sampled_from(["web", "nope"]), "port": st.just(80) | junk},
            optional={"filters": junk_filters | junk, "weight": junk},
        ),
        max_size=3,
    ),
)
def test_junk_filters_on_backend_refs_give_conditions_not_exceptions(
    kind: str, refs: list[dict[str, Any]]
) -> None:
    store = Store()
    store.apply(service("web"))
    store.apply(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "j", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}],
                     "rules": [{"backendRefs": refs}]},
        }
    )  # fmt: skip
    result = build(store.view())
    assert Translator().translate(result.mesh).snapshot().consistent() == []
    assert result.conditions[ObjectKey(kind, "shop", "j")]


# Each filter with the fields Gateway API gives it, every value junk: out-of-range numbers
# (a negative mirror fraction failed the whole build), wrong types, missing fields.
small = st.sampled_from([-1, 0, 1, 99, 100, 101, 65536]) | junk
path_modifier = st.fixed_dictionaries(
    {"type": st.sampled_from(["ReplaceFullPath", "ReplacePrefixMatch"]) | junk},
    optional={"replaceFullPath": st.text(max_size=6) | junk,
              "replacePrefixMatch": st.text(max_size=6) | junk},
)  # fmt: skip
WEB = {"name": "web", "port": 80}
web_ref = st.fixed_dictionaries(
    {"name": st.sampled_from(["web", "nope"]), "port": st.just(80) | small}
)
typed_filters = st.lists(
    st.one_of(
        st.fixed_dictionaries({
            "type": st.just("RequestMirror"),
            "requestMirror": st.fixed_dictionaries({"backendRef": st.just(WEB)}, optional={
                "percent": small,
                "fraction": st.fixed_dictionaries({"numerator": small}, optional={
                    "denominator": small}),
            }),
        }),
        st.fixed_dictionaries({
            "type": st.just("RequestRedirect"),
            "requestRedirect": st.fixed_dictionaries({}, optional={
                "scheme": st.sampled_from(["http", "https", ""]) | junk,
                "hostname": st.text(max_size=6) | junk,
                "port": small, "statusCode": small, "path": path_modifier,
            }),
        }),
        st.fixed_dictionaries({
            "type": st.just("URLRewrite"),
            "urlRewrite": st.fixed_dictionaries({}, optional={
                "hostname": st.text(max_size=6) | junk, "path": path_modifier}),
        }),
        st.fixed_dictionaries({
            "type": st.sampled_from(["RequestHeaderModifier", "ResponseHeaderModifier"]),
            "requestHeaderModifier": st.dictionaries(
                st.sampled_from(["set", "add", "remove"]), junk, max_size=3),
            "responseHeaderModifier": st.dictionaries(
                st.sampled_from(["set", "add", "remove"]), junk, max_size=3),
        }),
    ),
    max_size=3,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["HTTPRoute", "GRPCRoute"]),
    filters=typed_filters,
    matches=st.lists(
        st.fixed_dictionaries(
            {
                "path": st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["PathPrefix", "Exact"]),
                        "value": st.sampled_from(["/", "/a", "/a/"]),
                    }
                )
            }
        ),
        max_size=2,
    ),  # fmt: skip
    backends=st.lists(web_ref, max_size=1).map(lambda refs: [WEB, *refs]),
)
def test_out_of_range_filter_fields_give_conditions_not_exceptions(
    kind: str,
    filters: list[dict[str, Any]],
    matches: list[dict[str, Any]],
    backends: list[dict[str, Any]],
) -> None:
    store = Store()
    store.apply(service("web"))
    rule = {"matches": matches, "filters": filters, "backendRefs": backends}
    store.apply(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "j", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": [rule]},
        }
    )
    result = build(store.view())
    assert Translator().translate(result.mesh).snapshot().consistent() == []
    assert result.conditions[ObjectKey(kind, "shop", "j")]


# Header names and values Envoy takes (no pseudo-header, no Host, no NUL, CR or LF).
header_names = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9-]{0,6}\Z").filter(lambda n: n.lower() != "host")
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8)
name_values = st.lists(
    st.builds(lambda n, v: {"name": n, "value": v}, header_names, header_values),
    max_size=2,
    unique_by=lambda h: h["name"].lower(),
)
modifiers = st.fixed_dictionaries(
    {},
    optional={
        "set": name_values,
        "add": name_values,
        "remove": st.lists(header_names, max_size=2, unique_by=str.lower),
    },
)


@st.composite
def header_filters(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
        if draw(st.booleans()):
            out.append({"type": kind, kind[0].lower() + kind[1:]: draw(modifiers)})
    return out


def named(filters: list[dict[str, Any]]) -> set[str]:
    """The header names some filter of `filters` changes, lower-cased."""
    out = set()
    for f in filters:
        spec = f.get("requestHeaderModifier") or f.get("responseHeaderModifier") or {}
        out |= {h["name"].lower() for op in ("set", "add") for h in spec.get(op, ())}
        out |= {n.lower() for n in spec.get("remove", ())}
    return out


def changed(m: Any) -> set[str]:
    """The header names an Envoy route or weighted cluster changes."""
    return (
        {o.header.key for o in (*m.request_headers_to_add, *m.response_headers_to_add)}
        | set(m.request_headers_to_remove)
        | set(m.response_headers_to_remove)
    )


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["HTTPRoute", "GRPCRoute"]),
    rule_filters=header_filters(),
    own=st.tuples(header_filters(), header_filters()),
)
def test_backend_ref_header_modifiers_change_that_backends_requests_only(
    kind: str, rule_filters: list[dict[str, Any]], own: tuple[list[dict[str, Any]], ...]
) -> None:
    """Header modifiers with names and values Envoy takes, on two backendRefs and maybe on the
    rule: the route is Accepted, each backend's weighted cluster changes the headers its own
    filters name, and no header that only the other backend's filters name."""
    store = Store()
    store.apply(service("web"))
    for name in ("v1", "v2"):  # HTTP/2, as a GRPCRoute's backends must speak
        store.apply(service(name, ports=(("http", 80, "kubernetes.io/h2c"),)))
    rule: dict[str, Any] = {
        "backendRefs": [
            {"name": name, "port": 80, "filters": filters}
            for name, filters in zip(("v1", "v2"), own, strict=True)
        ]
    }
    if rule_filters:
        rule["filters"] = rule_filters
    store.apply(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": kind,
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"parentRefs": [{"kind": "Service", "name": "web"}], "rules": [rule]},
        }
    )
    result = build(store.view())
    accepted = [c for c in result.conditions[ObjectKey(kind, "shop", "r")] if c.type == "Accepted"]
    assert [c.status for c in accepted] == ["True"], accepted
    assert Translator().translate(result.mesh).snapshot().consistent() == []
    (config,) = translate_messages(result.mesh)[types.ROUTE]
    (route,) = [r for vh in config.virtual_hosts for r in vh.routes if r.name.startswith(kind)]
    clusters = route.route.weighted_clusters.clusters
    assert [c.name for c in clusters] == ["shop/v1:80", "shop/v2:80"]
    for mine, other, cluster in ((own[0], own[1], clusters[0]), (own[1], own[0], clusters[1])):
        assert named(mine) <= changed(cluster)
        assert changed(cluster) <= named(rule_filters) | named(mine), (other, cluster)
    assert changed(route) <= named(rule_filters)


@settings(max_examples=300, deadline=None)
@given(spec=crd.policy_specs())
def test_every_policy_the_crd_accepts_is_accepted(spec: dict[str, Any]) -> None:
    """What the API server takes, the builder takes too: Accepted and ResolvedRefs, and a
    consistent translation (the real Envoy's ACK: tests/e2e/test_property.py)."""
    store = Store()
    store.apply(service("web"))
    obj = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "web"}], **spec},
    }
    assert crd.errors(obj) == []
    store.apply(obj)
    result = build(store.view())
    conds = result.conditions[ObjectKey("TrafficPolicy", "shop", "p")]
    assert [(c.type, c.status) for c in conds] == [
        ("Accepted", "True"),
        ("ResolvedRefs", "True"),
    ], conds
    assert Translator().translate(result.mesh).snapshot().consistent() == []
