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
