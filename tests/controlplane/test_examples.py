"""The shipped examples are valid: they follow the CRD schemas and build without a problem."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from nodemesh.controlplane.builder import build
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.translate import Translator
from tests import gatewayapi
from tests.controlplane import crd
from tests.e2e.mesh import service

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_examples_follow_the_crd_schemas() -> None:
    store = Store()
    source = FilesSource(EXAMPLES, store)
    source.scan()
    assert source.errors == {}
    checked = 0
    for key in store.keys("TrafficPolicy"):
        obj = store.get(key)
        assert obj is not None
        assert crd.errors(obj) == [], key
        checked += 1
    assert checked >= 4


def test_examples_build_with_every_object_accepted_and_resolved() -> None:
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    result = build(store.view())
    assert result.conditions, "the examples have routes and policies"
    for key, conditions in result.conditions.items():
        for c in conditions:
            assert c.status == "True", (str(key), c)
    snapshot = Translator().translate(result.mesh).snapshot()
    assert snapshot.consistent() == []
    assert result.mesh.nodes == ("node-a", "node-b")


def test_crd_rejects_what_the_builder_rejects() -> None:
    bad = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "bad", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"group": "apps", "kind": "Deployment", "name": "web"}],
            "retry": {"retryOn": ["sometimes"], "attempts": 1000, "perTryTimeout": "fast"},
            "loadBalancer": {"type": "Random"},
            "faultInjection": {"abort": {"httpStatus": 700}},
        },
    }
    problems = "\n".join(crd.errors(bad) or [])
    fields = ("targetRefs.0.group", "targetRefs.0.kind", "retry.retryOn.0", "retry.attempts")
    fields += ("retry.perTryTimeout", "loadBalancer.type", "faultInjection.abort.httpStatus")
    for field in fields:
        assert f"spec.{field}:" in problems, (field, problems)
    # and the builder (files mode has no CRD in front of it) refuses each field too
    store = Store()
    store.apply(service("web"))
    store.apply(bad)
    accepted = next(
        c
        for c in build(store.view()).conditions[ObjectKey("TrafficPolicy", "shop", "bad")]
        if c.type == "Accepted"
    )
    assert (accepted.status, accepted.reason) == ("False", "Invalid")
    said = ("spec.targetRefs[0]", "spec.retry.retryOn", "spec.retry.attempts")
    said += ("spec.retry.perTryTimeout", "spec.loadBalancer.type", "spec.faultInjection.abort")
    for field in said:
        assert f"{field}" in accepted.message, (field, accepted.message)


def test_example_routes_follow_gateway_api_schemas() -> None:
    store = Store()
    FilesSource(EXAMPLES, store).scan()
    keys = [k for kind in ("HTTPRoute", "GRPCRoute") for k in store.keys(kind)]
    objs = [store.get(k) for k in keys]
    results = gatewayapi.errors([o for o in objs if o is not None])
    assert len(results) == len(keys) >= 3
    assert dict(zip(map(str, keys), results, strict=True)) == {str(k): [] for k in keys}


def test_the_policy_in_the_reference_follows_the_crd_and_programs() -> None:
    """The example at the top of docs/reference/trafficpolicy.md, which users copy."""
    text = (ROOT / "docs" / "reference" / "trafficpolicy.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    policy = yaml.safe_load(block)
    assert crd.errors(policy) == []
    store = Store()
    store.apply(service(policy["spec"]["targetRefs"][0]["name"]))
    store.apply(policy)
    result = build(store.view())
    key = ObjectKey("TrafficPolicy", policy["metadata"]["namespace"], policy["metadata"]["name"])
    assert [(c.type, c.status) for c in result.conditions[key]] == [
        ("Accepted", "True"),
        ("ResolvedRefs", "True"),
    ]
    assert Translator().translate(result.mesh).snapshot().consistent() == []
