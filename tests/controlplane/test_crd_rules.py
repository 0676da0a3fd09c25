"""The CRD's CEL rules compile, reject what they are meant to reject with their message, and
agree with the builder: an object the API server would refuse is also refused in files mode
(which has no API server), with a condition rather than a crash."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from nodemesh.controlplane import shapes
from nodemesh.controlplane.builder import build
from nodemesh.controlplane.files import load_objects
from nodemesh.controlplane.store import ObjectKey, Store
from tests.controlplane import crd
from tests.e2e.mesh import service

POLICY = ("nodemesh.io/v1alpha1", "TrafficPolicy")


def policy(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": POLICY[0],
        "kind": POLICY[1],
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "web"}], **spec},
    }


# One case per CEL rule: (path of the rule, a spec that breaks that rule).
BROKEN: dict[str, dict[str, Any]] = {
    "spec": {},
    "spec.retry": {"retry": {"backoff": {"baseInterval": "2s", "maxInterval": "1s"}}},
    "spec.retry.perTryTimeout": {"retry": {"perTryTimeout": "0s"}},
    "spec.retry.backoff.baseInterval": {"retry": {"backoff": {"baseInterval": "0ms"}}},
    "spec.retry.backoff.maxInterval": {"retry": {"backoff": {"maxInterval": "0s"}}},
    "spec.timeouts.connect": {"timeouts": {"connect": "0ms"}},
    "spec.outlierDetection": {"outlierDetection": {"interval": "10s"}},
    "spec.outlierDetection.interval": {"outlierDetection": {"consecutive5xx": 3, "interval": "0s"}},
    "spec.outlierDetection.baseEjectionTime": {
        "outlierDetection": {"consecutive5xx": 3, "baseEjectionTime": "0s"}
    },
    "spec.loadBalancer": {"loadBalancer": {"type": "RingHash"}},
    "spec.loadBalancer.hashOn": {
        "loadBalancer": {"type": "Maglev", "hashOn": {"header": "x-user", "cookie": {"name": "c"}}}
    },
    "spec.faultInjection": {"faultInjection": {}},
    # Envoy refuses a zero fixed_delay (FaultDelay.fixed_delay: gt 0s), measured with 1.40
    "spec.faultInjection.delay.fixedDelay": {"faultInjection": {"delay": {"fixedDelay": "0s"}}},
}


def test_every_rule_in_the_chart_compiles_and_has_a_case() -> None:
    found = [(path, rule) for schema in crd.schemas().values() for path, rule in crd.rules(schema)]
    assert len(found) >= 12
    for _, rule in found:
        crd.program(rule)  # raises CELParseError on a rule the API server would refuse
    assert sorted(path for path, _ in found) == sorted(BROKEN)


@pytest.mark.parametrize("path", sorted(BROKEN))
def test_rule_rejects_with_its_message_and_the_builder_agrees(path: str) -> None:
    obj = policy(**BROKEN[path])
    schema = crd.schemas()[POLICY]
    messages = {
        ".".join(p): m
        for p, m in crd.rule_failures(schema, obj)  # the rules alone
    }
    assert path in messages, messages
    problems = crd.errors(obj)
    assert problems is not None
    assert f"{path}: {messages[path]}" in problems

    store = Store()
    store.apply(service("web"))
    store.apply(obj)
    result = build(store.view())
    conditions = result.conditions[ObjectKey("TrafficPolicy", "shop", "p")]
    refused = [c for c in conditions if c.status == "False"]
    assert refused, (path, conditions)


def test_valid_values_pass_the_rules() -> None:
    ok = policy(
        retry={"perTryTimeout": "1m30s", "backoff": {"baseInterval": "25ms", "maxInterval": "1s"}},
        timeouts={"connect": "250ms", "request": "0s"},
        outlierDetection={"consecutiveGatewayErrors": 2, "interval": "5s"},
        loadBalancer={"type": "RingHash", "hashOn": {"cookie": {"name": "session", "ttl": "0s"}}},
        faultInjection={"abort": {"httpStatus": 503, "percent": 0.5}},
    )
    assert crd.errors(ok) == []


# Refused by the schema itself (minProperties, required, patterns and lengths) or by a CEL rule
# on a value that is present but empty: (spec, the builder's problem for it).
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"timeouts": {}}, "spec.timeouts: set at least one of connect, request, idle"),
    (
        {"circuitBreaker": {}},
        "spec.circuitBreaker: set at least one of maxConnections, maxPendingRequests,"
        " maxRequests, maxRetries",
    ),
    (
        {"loadBalancer": {}},
        "spec.loadBalancer.type: required: RoundRobin, LeastRequest, RingHash or Maglev",
    ),
    (
        {"loadBalancer": {"type": "RoundRobin", "hashOn": {}}},
        "spec.loadBalancer.hashOn: only RingHash and Maglev hash; RoundRobin does not",
    ),
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {}}},
        "spec.loadBalancer.hashOn: set exactly one of header or cookie",
    ),
    (
        {"loadBalancer": {"type": "Maglev", "hashOn": {"header": ""}}},
        "spec.loadBalancer.hashOn.header: must not be empty",
    ),
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {"cookie": {}}}},
        "spec.loadBalancer.hashOn.cookie.name: required",
    ),
    (
        {"retry": {"budget": {"minConcurrency": 2**31}}},
        "spec.retry.budget.minConcurrency: must be an integer in [1, 2147483647]",
    ),
    # Envoy refuses a hash header name with CR, LF or NUL, and with it the outbound
    # RouteConfiguration of every Service (`envoy --mode validate`, 1.40)
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {"header": "x-user\nid"}}},
        "spec.loadBalancer.hashOn.header: must be a header name",
    ),
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {"header": "x user"}}},
        "spec.loadBalancer.hashOn.header: must be a header name",
    ),
    (
        {"loadBalancer": {"type": "Maglev", "hashOn": {"header": "x" * 257}}},
        "spec.loadBalancer.hashOn.header: must be a header name of at most 256",
    ),
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {"cookie": {"name": "a=b"}}}},
        "spec.loadBalancer.hashOn.cookie.name: must be a cookie name",
    ),
    (
        {"loadBalancer": {"type": "RingHash", "hashOn": {"cookie": {"name": "s\r\nx: y"}}}},
        "spec.loadBalancer.hashOn.cookie.name: must be a cookie name",
    ),
]


@pytest.mark.parametrize("spec,problem", REFUSED, ids=[str(s) for s, _ in REFUSED])
def test_the_builder_refuses_what_the_schema_refuses(spec: dict[str, Any], problem: str) -> None:
    obj = policy(**spec)
    assert crd.errors(obj), "the API server would accept this: not a case"
    store = Store()
    store.apply(service("web"))
    store.apply(obj)
    conditions = build(store.view()).conditions[ObjectKey("TrafficPolicy", "shop", "p")]
    accepted = next(c for c in conditions if c.type == "Accepted")
    assert accepted.status == "False" and problem in accepted.message


def test_an_empty_timeouts_section_does_not_wipe_a_newer_policys_timeout() -> None:
    older = policy(timeouts={})
    older["metadata"] |= {"name": "older", "creationTimestamp": "2026-01-01T00:00:00Z"}
    newer = policy(timeouts={"request": "2s"})
    newer["metadata"] |= {"name": "newer", "creationTimestamp": "2026-01-02T00:00:00Z"}
    store = Store()
    for obj in (service("web"), older, newer):
        store.apply(obj)
    result = build(store.view())
    (vh,) = [v for v in result.mesh.virtual_hosts if v.name == "shop/web:80"]
    assert [r.timeout_ms for r in vh.routes] == [2000]


def _canonical(schema: dict[str, Any]) -> Any:
    """A CRD schema node as the field tree files mode checks: objects by field, lists by item."""
    kind = schema["type"]
    if kind == "object":
        return {name: _canonical(sub) for name, sub in schema["properties"].items()}
    if kind == "array":
        return [_canonical(schema["items"])]
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool"}[kind]


def _shape_tree(shape: Any) -> Any:
    if isinstance(shape, dict):
        assert isinstance(shape, shapes._Closed), "every TrafficPolicy object refuses other fields"
        return {name: _shape_tree(sub) for name, sub in shape.items()}
    if isinstance(shape, list):
        return [_shape_tree(shape[0])]
    return shape.__name__


def test_files_mode_knows_every_traffic_policy_field_of_the_crd_and_its_type() -> None:
    """Files mode's TrafficPolicy shape is the chart's CRD, field for field and type for type:
    a field the CRD gains is not refused in files mode, one it loses is."""
    spec = crd.schemas()[POLICY]["properties"]["spec"]
    assert _shape_tree(shapes._SHAPES["TrafficPolicy"]["spec"]) == _canonical(spec)


def test_files_mode_refuses_a_policy_field_the_crd_has_not_or_of_another_type() -> None:
    """Read as absent, a misspelled field did nothing and still won its section over a newer
    policy, a string backoff left Envoy's 25 ms, and `targetRefs[].namespace` (no such field)
    pointed at another namespace's Service and got the policy's own namespace's; all
    `Accepted=True`. kubectl refuses each of these; files mode now does too."""
    text = yaml.safe_dump(
        policy(
            targetRefs=[{"kind": "Service", "name": "api", "namespace": "other"}],
            timeouts={"requestTimeout": "5s"},
            retry={"attempts": 2, "backoff": "2s", "budget": {"percent": "20"}},
            circuitBreaker={"maxConnections": 1.5},
        )
    )
    assert crd.errors(yaml.safe_load(text)), "the API server would accept this: not a case"
    objs, errors = load_objects(text, "p.yaml")
    assert objs == []
    assert errors == [
        "p.yaml: TrafficPolicy/shop/p: "
        "spec.targetRefs[0].namespace: no such field (there are group, kind, name, sectionName); "
        "spec.retry.backoff: must be an object, not a string; "
        "spec.retry.budget.percent: must be a number, not a string; "
        "spec.timeouts.requestTimeout: no such field (there are connect, request, idle); "
        "spec.circuitBreaker.maxConnections: must be an integer, not float 1.5"
    ]
    # what the API server takes, files mode takes
    good = policy(retry={"attempts": 2, "budget": {"percent": 20}}, timeouts={"request": "2s"})
    assert crd.errors(good) == [] and load_objects(yaml.safe_dump(good), "p.yaml") == ([good], [])
