"""Property test for build: arbitrary junk in routes and policies yields conditions, never an
exception, and the translation stays consistent."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.controlplane.builder import build
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.translate import Translator
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
