"""Serialization speed: upb-backed `xds-protos` against `envoy-data-plane` (betterproto2).

Both libraries serialize the same ClusterLoadAssignments, Clusters and Listeners, built once
with xds-protos and parsed into envoy-data-plane from the same bytes, so the payloads are
identical. Each workload is timed in alternating rounds (the machines are noisy: ratios taken
side by side in one run are what we compare) and the best round of each is kept.

Writes bench/results/serialization.json. Run: .venv/bin/python bench/serialization.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.message import Message

from tests.xds import resources as R

ROUNDS = 5


def workloads() -> dict[str, list[Message]]:
    clas = [R.endpoints(f"svc-{i}", *range(8000, 8010)) for i in range(1000)]
    clusters = [R.eds_cluster(f"svc-{i}") for i in range(1000)]
    listeners = [R.http_listener(f"listener-{i}", 15000 + i, f"routes-{i}") for i in range(200)]
    return {
        "ClusterLoadAssignment x1000 (10 endpoints)": clas,
        "Cluster x1000": clusters,
        "Listener x200": listeners,
    }


def to_data_plane(messages: list[Message]) -> list[Any]:
    from envoy_data_plane.envoy.config.cluster import v3 as cluster_v3
    from envoy_data_plane.envoy.config.endpoint import v3 as endpoint_v3
    from envoy_data_plane.envoy.config.listener import v3 as listener_v3

    kinds = {
        "ClusterLoadAssignment": endpoint_v3.ClusterLoadAssignment,
        "Cluster": cluster_v3.Cluster,
        "Listener": listener_v3.Listener,
    }
    out = []
    for m in messages:
        cls = kinds[m.DESCRIPTOR.name]
        out.append(cls.parse(m.SerializeToString()))
    return out


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    results: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rounds": ROUNDS,
        "workloads": {},
    }
    print(f"{'workload':44} {'xds-protos':>12} {'envoy-data-plane':>17} {'ratio':>8}")
    for name, msgs in workloads().items():
        edp = to_data_plane(msgs)
        assert [bytes(x) for x in edp] == [m.SerializeToString() for m in msgs], name
        upb_times: list[float] = []
        edp_times: list[float] = []
        for _ in range(ROUNDS):  # alternate, so both see the same machine state
            upb_times.append(timed(lambda ms=msgs: [m.SerializeToString() for m in ms]))
            edp_times.append(timed(lambda xs=edp: [bytes(x) for x in xs]))
        upb, slow = min(upb_times), min(edp_times)
        ratio = slow / upb
        results["workloads"][name] = {
            "xds_protos_seconds": upb,
            "envoy_data_plane_seconds": slow,
            "ratio": ratio,
            "bytes": sum(len(m.SerializeToString()) for m in msgs),
        }
        print(f"{name:44} {upb * 1e3:10.2f}ms {slow * 1e3:15.1f}ms {ratio:7.0f}x")
    ratios = [w["ratio"] for w in results["workloads"].values()]
    results["geometric_mean_ratio"] = _geomean(ratios)
    print(f"geometric mean: envoy-data-plane is {results['geometric_mean_ratio']:.0f}x slower")
    out = Path(__file__).resolve().parent / "results" / "serialization.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _geomean(values: list[float]) -> float:
    product = 1.0
    for v in values:
        product *= v
    return float(product ** (1 / len(values)))


if __name__ == "__main__":
    raise SystemExit(main())
