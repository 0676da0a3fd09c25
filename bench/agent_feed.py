"""The node agent's side of the feed, on the bench mesh of bench/translate.py (10,000
Services, 100,000 endpoints, 50 Nodes): how long an agent takes to converge its kernel maps at
start, and to follow one Service change, side by side in one run:

- `delta` (what `nodemesh agent` does): decode and validate the one `MeshService` that
  changed, update the `MapView`, write only the entries it touched (`NodeMaps.patch`);
- `whole map` (what an agent fed one resource per node must do, as before 2026-11-22):
  decode and validate every Service again, join them, and converge the maps
  (`NodeMaps.apply`, which reads every entry).

Real kernel maps (a `NodeLab` node, root, bpffs). Writes bench/results/agent_feed.json.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    MapView,
    NodePart,
    node_from_proto,
    service_from_proto,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.store import Store
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf.testing import NodeLab
from nodemesh.xds.cache import Resource
from nodemesh.xds.translate import Translator

RESULTS = Path(__file__).parent / "results" / "agent_feed.json"


def _bench_mesh() -> Any:
    """bench/translate.py as a module (its mesh: objects(), nodes(), endpoint_slice()), also
    when this file runs as a script."""
    spec = importlib.util.spec_from_file_location(
        "bench_translate", Path(__file__).parent / "translate.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NODE = "node3"
CHANGES = 5


def _view(part: NodePart, resources: Iterable[Resource]) -> MapView:
    """What an agent holds after decoding and validating every resource."""
    view = MapView(NODE)
    view.part = part
    view.update(service_from_proto(pb.MeshService.FromString(r.payload)) for r in resources)
    return view


def main() -> int:
    mesh = _bench_mesh()
    objects, nodes, endpoint_slice = mesh.objects, mesh.nodes, mesh.endpoint_slice
    store, memo, translator = Store(), BuildMemo(), Translator()
    for o in (*objects(), *nodes()):
        store.apply(o)
    translation = translator.translate(build(store.view(), memo=memo).mesh)
    held = {r.name: r for r in translation.shared[SERVICE_TYPE_URL]}
    part = node_from_proto(
        pb.NodeServiceMap.FromString(translation.per_node[NODE][NODE_TYPE_URL][0].payload)
    )
    size = sum(len(r.payload) for r in held.values())
    print(f"{len(held)} MeshService resources, {size / 1e6:.1f} MB; node {NODE}")

    with NodeLab() as lab:
        lab.enable()
        with NodeMaps(lab.pin_root) as maps:
            t0 = time.perf_counter()
            view = _view(part, held.values())
            first = maps.apply(view.model())
            converge = time.perf_counter() - t0
            print(f"converge at start: {converge:.2f} s ({first.written} entries written)")

            delta, whole = [], []
            for k in range(CHANGES):
                i = k * 1000 + 3  # no route (i % 10 == 0), no policy (i % 20 == 1): L4
                store.apply(endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt=60 + k))
                translation = translator.translate(build(store.view(), memo=memo).mesh)
                now = {r.name: r for r in translation.shared[SERVICE_TYPE_URL]}
                changed = [r for n, r in now.items() if held[n].version != r.version]
                held = now

                t0 = time.perf_counter()
                ups = [service_from_proto(pb.MeshService.FromString(r.payload)) for r in changed]
                result = maps.patch(view, *view.update(ups))
                delta.append(time.perf_counter() - t0)
                assert result.written >= 1, result

                t0 = time.perf_counter()
                full = maps.apply(_view(part, held.values()).model())
                whole.append(time.perf_counter() - t0)
                assert (full.written, full.deleted) == (0, 0), "patch left something behind"

    d, w = statistics.median(delta), statistics.median(whole)
    print(f"one Service change, median of {CHANGES}:")
    print(f"  delta (patch)   {d * 1000:9.2f} ms")
    print(f"  whole map       {w * 1000:9.2f} ms   ({w / d:.0f}x the delta)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "services": len(held),
                "node": NODE,
                "converge_s": round(converge, 3),
                "one_change_ms": {"delta": round(d * 1000, 3), "whole_map": round(w * 1000, 1)},
                "ratio_whole_to_delta": round(w / d, 1),
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
