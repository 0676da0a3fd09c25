"""Load nodemesh's CRDs from the chart and validate objects the way the API server would.

Two passes, as in kube-apiserver: jsonschema checks the structural schema (types, enums, ranges,
patterns, required fields), then, when that passes, every CEL rule (`x-kubernetes-validations`)
is evaluated with cel-python at the node that carries it, `self` bound to the value there. A
rule that does not compile fails the test run (the API server would refuse the CRD).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from hypothesis import strategies as st

CRD_DIR = Path(__file__).resolve().parents[2] / "charts" / "nodemesh" / "crds"


@cache
def schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, for every CRD in the chart."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def errors(obj: Mapping[str, Any]) -> list[str] | None:
    """Schema errors, then (if there are none) CEL rule failures, as "path: message";
    None when no nodemesh CRD covers the object's kind."""
    schema = schemas().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if schema is None:
        return None
    validator = jsonschema.Draft7Validator(schema)
    structural = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
    if structural:
        return structural
    return [f"{'.'.join(path)}: {message}" for path, message in rule_failures(schema, obj)]


def rules(schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, str]]:
    """Every (schema path, CEL rule) in `schema`."""
    for validation in schema.get("x-kubernetes-validations", ()):
        yield ".".join(path), validation["rule"]
    for name, sub in schema.get("properties", {}).items():
        yield from rules(sub, (*path, name))
    if isinstance(items := schema.get("items"), Mapping):
        yield from rules(items, (*path, "[]"))
    if isinstance(extra := schema.get("additionalProperties"), Mapping):
        yield from rules(extra, (*path, "{}"))


@cache
def program(rule: str) -> celpy.Runner:
    """The compiled rule (cached: the same rule text is shared by several fields)."""
    env = celpy.Environment()
    return env.program(env.compile(rule))


def rule_failures(
    schema: Mapping[str, Any], value: Any, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, message) for every CEL rule that `value` breaks, walking schema and value
    together as the API server does (rules run only where the value is present)."""
    for validation in schema.get("x-kubernetes-validations", ()):
        try:
            result = program(validation["rule"]).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as exc:
            result = exc
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            yield path, validation.get("message", f"failed rule: {validation['rule']}")
    if isinstance(value, Mapping):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, sub_value in value.items():
            sub = properties.get(name, extra if isinstance(extra, Mapping) else None)
            if sub is not None:
                yield from rule_failures(sub, sub_value, (*path, str(name)))
    elif isinstance(value, list) and isinstance(items := schema.get("items"), Mapping):
        for i, item in enumerate(value):
            yield from rule_failures(items, item, (*path, str(i)))


def values(schema: Mapping[str, Any], max_items: int = 3) -> st.SearchStrategy[Any]:
    """Every value the API server would take for `schema`: drawn from the structural schema
    (types, enums, ranges, patterns, lengths, required fields), each object kept only where its
    CEL rules pass, as they are checked at the node that carries them. Edges come naturally:
    `0h` and `99999h` durations, the extremes of every range, the rarer enum values."""
    rules_here = bool(schema.get("x-kubernetes-validations"))
    for validation in schema.get("x-kubernetes-validations", ()):
        program(validation["rule"])  # compiled now: cel-python's parser raises the recursion limit
    kind = schema.get("type")
    out: st.SearchStrategy[Any]
    if "enum" in schema:
        out = st.sampled_from(schema["enum"])
    elif kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        out = st.fixed_dictionaries(
            {k: values(v, max_items) for k, v in props.items() if k in required},
            optional={k: values(v, max_items) for k, v in props.items() if k not in required},
        )
        if "minProperties" in schema:
            out = out.filter(lambda d, n=schema["minProperties"]: len(d) >= n)
    elif kind == "array":
        lo = schema.get("minItems", 0)
        out = st.lists(
            values(schema["items"], max_items),
            min_size=lo,
            max_size=min(schema.get("maxItems", max_items), max(lo, max_items)),
        )
    elif kind == "string":
        pattern = schema.get("pattern")
        out = st.from_regex(pattern, fullmatch=True) if pattern else st.text(min_size=1)
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        out = out.filter(lambda s: lo <= len(s) and (hi is None or len(s) <= hi))
    elif kind == "integer":
        out = st.integers(schema.get("minimum"), schema.get("maximum"))
    elif kind == "number":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        out = st.integers(lo, hi) | st.floats(lo, hi, allow_nan=False, allow_infinity=False)
    elif kind == "boolean":
        out = st.booleans()
    else:
        raise ValueError(f"no strategy for schema type {kind!r}")
    if rules_here:
        out = out.filter(lambda v: next(rule_failures(schema, v), None) is None)
    return out


def policy_specs() -> st.SearchStrategy[dict[str, Any]]:
    """TrafficPolicy specs the API server would take, without `targetRefs` (the test names
    its Service)."""
    spec = schemas()[("nodemesh.io/v1alpha1", "TrafficPolicy")]["properties"]["spec"]
    rest = {k: v for k, v in spec["properties"].items() if k != "targetRefs"}
    return values({**spec, "required": [], "properties": rest})
