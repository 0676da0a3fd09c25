"""Golden tests for the pure stages: tests/golden/<case>/in.yaml -> out/*.yaml.

`out/` holds the Envoy resources per type and the conditions per object. Regenerate with
`pytest tests/controlplane/test_golden.py --update-golden` (stale outputs are deleted).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format

from nodemesh.controlplane.builder import build
from nodemesh.controlplane.files import load_objects
from nodemesh.controlplane.store import Store
from nodemesh.xds import types
from nodemesh.xds.translate import node_listeners, translate_messages
from tests import gatewayapi
from tests.controlplane import crd

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "in.yaml").exists())
_FILES = {
    types.CLUSTER: "clusters.yaml",
    types.ENDPOINT: "endpoints.yaml",
    types.LISTENER: "listeners.yaml",
    types.ROUTE: "routes.yaml",
}


def load_case(case: str) -> Store:
    objs, problems = load_objects((GOLDEN / case / "in.yaml").read_text(), f"{case}/in.yaml")
    assert not problems, problems
    store = Store()
    for obj in objs:
        store.apply(obj)
    return store


def render(case: str) -> dict[str, str]:
    result = build(load_case(case).view())
    out: dict[str, str] = {}
    for type_url, messages in translate_messages(result.mesh).items():
        # Through JSON: MessageToDict nests OrderedDicts for Any fields, which YAML cannot dump.
        docs = [
            json.loads(json_format.MessageToJson(m, preserving_proto_field_name=True))
            for m in messages
        ]
        out[_FILES[type_url]] = yaml.safe_dump_all(docs, sort_keys=True) if docs else ""
    for node, listener in sorted(node_listeners(result.mesh).items()):
        doc = json.loads(json_format.MessageToJson(listener, preserving_proto_field_name=True))
        out[f"listeners.{node}.yaml"] = yaml.safe_dump(doc, sort_keys=True)
    conditions: dict[str, Any] = {
        str(key): [
            {**c.as_dict(), **({"parent": c.parent} if c.parent else {})}
            for c in result.conditions[key]
        ]
        for key in sorted(result.conditions)
    }
    out["conditions.yaml"] = yaml.safe_dump(conditions, sort_keys=True)
    return out


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, update_golden: bool) -> None:
    rendered = render(case)
    out_dir = GOLDEN / case / "out"
    if update_golden:
        out_dir.mkdir(exist_ok=True)
        for stale in out_dir.glob("*.yaml"):
            if stale.name not in rendered:
                stale.unlink()
        for name, text in rendered.items():
            (out_dir / name).write_text(text)
        return
    assert out_dir.is_dir(), f"no golden output for {case}: run pytest --update-golden"
    on_disk = {p.name for p in out_dir.glob("*.yaml")}
    assert on_disk == set(rendered), f"stale or missing files in {out_dir}"
    for name, text in rendered.items():
        assert (out_dir / name).read_text() == text, f"{case}/out/{name} differs (--update-golden)"


@pytest.mark.parametrize("case", CASES)
def test_golden_inputs_follow_the_crd_schemas(case: str) -> None:
    objs, _ = load_objects((GOLDEN / case / "in.yaml").read_text(), case)
    for obj in objs:
        problems = crd.errors(obj)
        if problems is None:
            continue
        if case.startswith("invalid-"):
            continue  # these inputs are wrong on purpose (files mode has no API server)
        assert problems == [], f"{obj['metadata']['name']}: {problems}"


def test_every_case_is_translated_consistently() -> None:
    for case in CASES:
        result = build(load_case(case).view())
        from nodemesh.xds.translate import Translator

        assert Translator().translate(result.mesh).snapshot().consistent() == [], case


def test_golden_routes_follow_gateway_api_schemas() -> None:
    """Every HTTPRoute, GRPCRoute and ReferenceGrant passes Gateway API's own schema (one Node.js
    run for all), except in `invalid-objects`, whose inputs are malformed on purpose
    (`invalid-refs` is well-formed; its references just do not resolve)."""
    named: list[tuple[str, dict[str, Any]]] = []
    for case in CASES:
        if case == "invalid-objects":
            continue
        objs, _ = load_objects((GOLDEN / case / "in.yaml").read_text(), case)
        named += [(f"{case}: {o['kind']}/{o['metadata']['name']}", o) for o in objs]
    results = gatewayapi.errors([o for _, o in named])
    checked = {name: problems for (name, _), problems in zip(named, results, strict=True)}
    routes = {name: p for name, p in checked.items() if p is not None}
    assert sum("HTTPRoute/" in n for n in routes) >= 6 and any("GRPCRoute/" in n for n in routes)
    assert {name: p for name, p in routes.items() if p} == {}
