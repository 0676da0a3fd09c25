"""`/metrics`: the control plane's state as a Prometheus scraper reads it (the format checked
line by line in `parse_metrics`), and the values an operator alerts on: builds that fail, files
that cannot be read, objects not Accepted or with references that do not resolve. The node
Envoys' side (responses, NACKs) with a real Envoy: tests/e2e/test_status.py."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import aiohttp
import pytest
import yaml

from nodemesh._prometheus import Exposition
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker
from tests.e2e.objects import http_route, to
from tests.support import metric, parse_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def scrape(server: StatusServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            return parse_metrics(await resp.text())


async def test_metrics_say_what_was_built_and_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "mesh"
    shutil.copytree(EXAMPLES, config)
    services = sum(
        1
        for f in config.rglob("*.yaml")
        for doc in yaml.safe_load_all(f.read_text())
        if doc and doc.get("kind") == "Service"
    )
    # a route whose backend does not exist, on two Services: ResolvedRefs=False on each
    # parentRef, and the route counted once
    broken = http_route("broken", "reviews", [{"backendRefs": [to("nowhere")]}])
    broken["spec"]["parentRefs"].append({"group": "", "kind": "Service", "name": "ratings"})
    (config / "broken.yaml").write_text(yaml.safe_dump(broken))
    store = Store()
    pipeline = Pipeline(store, SnapshotCache(), StatusTracker())
    files = FilesSource(config, store, pipeline)
    files.scan()
    await pipeline.rebuild()
    server = StatusServer(pipeline)
    await server.start("127.0.0.1", 0)
    try:
        m = await scrape(server)
        assert metric(m, "nodemesh_builds_total", result="ok") == 1
        assert metric(m, "nodemesh_builds_total", result="failed") == 0
        assert metric(m, "nodemesh_last_build_failed") == 0
        assert metric(m, "nodemesh_built_revision") == metric(m, "nodemesh_store_revision")
        assert (metric(m, "nodemesh_last_build_seconds") or 0) > 0
        first_seconds = metric(m, "nodemesh_build_seconds_total") or 0
        assert first_seconds == metric(m, "nodemesh_last_build_seconds")
        routes = metric(m, "nodemesh_objects", kind="HTTPRoute") or 0
        assert metric(m, "nodemesh_objects", kind="Service") == services
        assert metric(m, "nodemesh_object_conditions", kind="HTTPRoute", type="ResolvedRefs",
                      status="False") == 1  # fmt: skip
        assert metric(m, "nodemesh_object_conditions", kind="HTTPRoute", type="Accepted",
                      status="False") is None  # fmt: skip
        assert (metric(m, "nodemesh_snapshot_resources", type="cds") or 0) >= services
        assert metric(m, "nodemesh_source_errors") == 0
        assert metric(m, "nodemesh_xds_nodes", connected="true") == 0

        # A file that cannot be read, and a build that fails: the nodes keep the last config.
        (config / "typo.yaml").write_text("kind: Service\nmetadata: [\n")
        files.scan()
        monkeypatch.setattr(pipeline.translator, "translate", _fail)
        (config / "another.yaml").write_text(
            yaml.safe_dump(http_route("another", "reviews", [{"backendRefs": [to("reviews")]}]))
        )
        files.scan()
        await pipeline.rebuild()
        m = await scrape(server)
        assert metric(m, "nodemesh_source_errors") == 1
        assert metric(m, "nodemesh_builds_total", result="failed") == 1
        assert metric(m, "nodemesh_last_build_failed") == 1
        assert metric(m, "nodemesh_builds_total", result="ok") == 1
        # what the last good build read: not the route the failed build could not serve
        assert metric(m, "nodemesh_objects", kind="HTTPRoute") == routes

        # a bug past the build (the snapshots served, the conditions not): failed too
        monkeypatch.undo()
        monkeypatch.setattr(pipeline, "_update_conditions", _fail)
        with pytest.raises(RuntimeError):
            await pipeline.rebuild()
        m = await scrape(server)
        assert metric(m, "nodemesh_builds_total", result="failed") == 2
        assert metric(m, "nodemesh_builds_total", result="ok") == 1
        assert metric(m, "nodemesh_last_build_failed") == 1

        monkeypatch.undo()  # fixed: a good build says so, and its time adds up
        (config / "typo.yaml").unlink()
        files.scan()
        await pipeline.rebuild()
        m = await scrape(server)
        assert metric(m, "nodemesh_builds_total", result="ok") == 2
        assert metric(m, "nodemesh_last_build_failed") == 0
        assert metric(m, "nodemesh_source_errors") == 0
        assert metric(m, "nodemesh_objects", kind="HTTPRoute") == routes + 1
        assert (metric(m, "nodemesh_build_seconds_total") or 0) > first_seconds
    finally:
        await server.stop()


def test_the_exposition_escapes_label_values_and_writes_special_numbers() -> None:
    exposition = Exposition()
    exposition.add("x_total", "counter", "A help\\ with a line\nbreak.", [
        ({"path": 'C:\\dir "quoted"\nnext'}, 3),
        ({"path": "plain"}, 0.25),
    ])  # fmt: skip
    specials = [math.nan, math.inf, -math.inf, 1e-05]
    exposition.add("y", "gauge", "Specials.", [({"v": str(i)}, v) for i, v in enumerate(specials)])
    text = exposition.text()
    assert 'x_total{path="C:\\\\dir \\"quoted\\"\\nnext"} 3' in text
    assert "# HELP x_total A help\\\\ with a line\\nbreak." in text
    m = parse_metrics(text)
    assert metric(m, "x_total", path="plain") == 0.25
    assert [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("y{")] == [
        "NaN",
        "+Inf",
        "-Inf",
        "1e-05",
    ]


def _fail(*_: object) -> None:
    raise RuntimeError("a bug in translate")
