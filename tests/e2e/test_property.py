"""Property tests: any route or policy that the CRD schemas accept (Gateway API's for routes,
nodemesh's with its CEL rules for policies) is ACKed by a real Envoy (no NACK for validated
input), and arbitrary junk yields conditions, never an exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.store import ObjectKey
from tests import gatewayapi
from tests.controlplane import crd
from tests.e2e.conftest import Backends
from tests.e2e.mesh import NODE, Mesh, endpoint_slice, service
from tests.e2e.objects import http_route, policy, to

pytestmark = pytest.mark.asyncio(loop_scope="module")

durations = st.builds(lambda n, u: f"{n}{u}", st.integers(1, 5000), st.sampled_from(["ms", "s"]))
header_names = st.from_regex(r"\Ax-[a-z]{1,8}\Z")
values = st.from_regex(r"\A[a-zA-Z0-9._-]{1,12}\Z")
# RFC 1123 subdomains, as the Gateway API schema wants a URLRewrite hostname (lower-cased
# `values` were not: "0_0")
hostnames = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,6}[a-z0-9])?(\.[a-z0-9]{1,6}){0,2}\Z")
paths = st.from_regex(r"\A(/[a-z0-9]{1,6}){1,3}\Z")


def optional(d: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of the given strategies' keys."""
    return st.fixed_dictionaries({}, optional=d)


# What the API server takes, from the CRD itself (its ranges, patterns and CEL rules).
policy_specs = crd.policy_specs()

matches = optional(
    {
        "path": st.one_of(
            st.builds(
                lambda t, v: {"type": t, "value": v},
                st.sampled_from(["Exact", "PathPrefix"]),
                paths,
            ),
            st.builds(lambda v: {"type": "RegularExpression", "value": v + "/[0-9]+"}, paths),
        ),
        "headers": st.lists(
            st.builds(lambda n, v: {"name": n, "value": v}, header_names, values),
            max_size=2,
            unique_by=lambda h: h["name"],
        ),
        "queryParams": st.lists(
            st.builds(
                lambda n, v: {"name": n, "value": v}, st.from_regex(r"\A[a-z]{1,6}\Z"), values
            ),
            max_size=2,
            unique_by=lambda q: q["name"],
        ),
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    }
)
header_mod = optional(
    {
        "set": st.lists(
            st.builds(lambda n, v: {"name": n, "value": v}, header_names, values),
            max_size=2,
            unique_by=lambda h: h["name"],
        ),
        "remove": st.lists(header_names, max_size=2, unique=True),
    }
)
filters = st.lists(
    st.one_of(
        header_mod.map(lambda m: {"type": "RequestHeaderModifier", "requestHeaderModifier": m}),
        header_mod.map(lambda m: {"type": "ResponseHeaderModifier", "responseHeaderModifier": m}),
        hostnames.map(lambda h: {"type": "URLRewrite", "urlRewrite": {"hostname": h}}),
        st.just({"type": "RequestMirror", "requestMirror": {"backendRef": to("prop-b")}}),
    ),
    max_size=2,
    unique_by=lambda f: f["type"],
)
rules = st.lists(
    st.fixed_dictionaries(
        {
            "backendRefs": st.lists(
                st.builds(
                    lambda n, w: to(n, w),
                    st.sampled_from(["prop-a", "prop-b"]),
                    st.integers(0, 100),
                ),
                min_size=1,
                max_size=2,
            )
        },
        optional={
            "matches": st.lists(matches, max_size=2),
            "filters": filters,
            "timeouts": st.builds(
                lambda r, b: {"request": f"{r + b}ms", "backendRequest": f"{r}ms"},
                st.integers(1, 5000),
                st.integers(0, 5000),
            ),
            "retry": optional(
                {
                    "codes": st.lists(st.integers(400, 599), max_size=3, unique=True),
                    "attempts": st.integers(0, 5),
                    "backoff": durations,
                }
            ),
        },
    ),
    min_size=1,
    max_size=4,
)


async def setup_services(mesh: Mesh, backends: Backends) -> None:
    a, b = await backends.get("prop-a"), await backends.get("prop-b")
    mesh.apply(
        service("prop"),
        service("prop-a"),
        service("prop-b"),
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


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_rules=rules)
async def test_every_valid_route_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, route_rules: list[dict[str, Any]]
) -> None:
    await setup_services(mesh, backends)
    mesh.delete("TrafficPolicy", "prop-policy")
    route = http_route("prop-route", "prop", route_rules)
    assert gatewayapi.errors([route]) == [[]]  # valid for Gateway API's own schema
    mesh.apply(route)
    await assert_acked_without_nack(mesh)
    conds = mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "shop", "prop-route")]
    assert all(c.status == "True" for c in conds if c.type != "Programmed"), conds


def _to_shop(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same rules written from another namespace: every backend named in shop."""
    out = []
    for rule in rules:
        rule = {**rule, "backendRefs": [{**b, "namespace": "shop"} for b in rule["backendRefs"]]}
        if "filters" in rule:
            rule["filters"] = [
                {**f, "requestMirror": {"backendRef": {**to("prop-b"), "namespace": "shop"}}}
                if f["type"] == "RequestMirror"
                else f
                for f in rule["filters"]
            ]
        out.append(rule)
    return out


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(route_rules=rules)
async def test_every_valid_consumer_route_is_acked_by_envoy(
    mesh: Mesh, backends: Backends, route_rules: list[dict[str, Any]]
) -> None:
    """The same, as a consumer route with a client pod on the node: the node's own Listener
    (its consumer chains) and the marked routes are ACKed too."""
    await setup_services(mesh, backends)
    mesh.delete("TrafficPolicy", "prop-policy")
    route = http_route("prop-consumer", "prop", _to_shop(route_rules), ns="props")
    route["spec"]["parentRefs"][0]["namespace"] = "shop"
    assert gatewayapi.errors([route]) == [[]]
    mesh.apply(
        route,
        {
            "apiVersion": "gateway.networking.k8s.io/v1beta1",
            "kind": "ReferenceGrant",
            "metadata": {"name": "props", "namespace": "shop"},
            "spec": {
                "from": [
                    {
                        "group": "gateway.networking.k8s.io",
                        "kind": "HTTPRoute",
                        "namespace": "props",
                    }
                ],
                "to": [{"group": "", "kind": "Service"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "client", "namespace": "props"},
            "spec": {"nodeName": NODE},
            "status": {"phase": "Running", "podIP": "127.0.0.7"},
        },
    )
    await assert_acked_without_nack(mesh)
    assert mesh.cache.get_snapshot(NODE) is not mesh.pipeline.snapshot  # its own Listener
    conds = mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "props", "prop-consumer")]
    assert all(c.status == "True" for c in conds if c.type != "Programmed"), conds
