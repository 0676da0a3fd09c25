"""Check HTTPRoute/GRPCRoute inputs against Gateway API's own schemas.

Gateway API's CRDs are not part of nodemesh (users install them), so the schemas come from the
npm package @kubernetes-models/gateway-api (generated from those CRDs; `make setup` installs it
under .tools/gateway-api) and are run by Node.js. That checks types, enums, patterns and ranges
as the API server would; unknown fields are not reported (the API server prunes them).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support import need

ROOT = Path(__file__).resolve().parents[2]
PREFIX = ROOT / ".tools" / "gateway-api"
SCRIPT = Path(__file__).with_name("validate.mjs")


def errors(objects: Sequence[Mapping[str, Any]]) -> list[list[str] | None]:
    """Per object, its schema errors ([] when valid), or None when Gateway API has no such kind."""
    node = shutil.which("node")
    need(node, "node is not installed (Gateway API schema checks run on Node.js)")
    need((PREFIX / ".installed").exists(), f"{PREFIX} is missing: run `make setup`")
    assert node is not None
    done = subprocess.run(
        [node, str(SCRIPT), str(PREFIX)],
        input=json.dumps(list(objects)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: list[list[str] | None] = json.loads(done.stdout)
    return result
