"""Load nodemesh's CRDs from the chart and validate objects against their OpenAPI schemas.

jsonschema checks the structural schema (types, enums, ranges, patterns, required fields);
the CEL rules (`x-kubernetes-validations`) are mirrored by the builder's own checks, which the
golden `invalid-*` cases exercise.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

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
    """Schema errors for `obj`, or None when no nodemesh CRD covers its kind."""
    schema = schemas().get((str(obj.get("apiVersion")), str(obj.get("kind"))))
    if schema is None:
        return None
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]
