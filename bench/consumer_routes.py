"""What GAMMA consumer routes cost the control plane, on bench/translate.py's mesh (10,000
Services, 100,000 endpoints, 50 Nodes) with 20 consumer namespaces, each with one consumer route
to a routed Service and 25 client pods spread over the Nodes (500 pods: every Node gets a
Listener of its own, with 10 client pods).

Measured side by side in one run, with the memoizing build and Translator as the pipeline runs
them (medians of 15 changes):

- one client pod added (its node's own Listener is made again: the shared bytes with its
  consumer chains spliced in), against one endpoint change on the same mesh;
- the cold build + translate with and without the consumer objects (Pods and routes);
- the size of a node's own Listener against the shared one.

Writes bench/results/consumer_routes.json.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

# bench/translate.py's mesh: this script's directory is first on sys.path (`make bench` runs it
# as a script, as it runs bench/translate.py)
from translate import NODES, SERVICES, endpoint_slice, nodes, objects

from nodemesh.controlplane.builder import BuildMemo, build
from nodemesh.controlplane.pipeline import build_collector
from nodemesh.controlplane.store import Store
from nodemesh.xds import types
from nodemesh.xds.translate import Translator

NAMESPACES = 20
PODS_PER_NAMESPACE = 25
CHANGES = 15
RESULTS = Path(__file__).resolve().parent / "results" / "consumer_routes.json"


def consumer_objects() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in range(NAMESPACES):
        ns = f"team{c}"
        target = c * (SERVICES // NAMESPACES)  # a Service with a producer route (every 10th)
        target -= target % 10
        svc_ns, svc = f"ns{target % 100}", f"svc{target}"
        out.append(
            {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "HTTPRoute",
                "metadata": {"name": f"{svc}-for-{ns}", "namespace": ns},
                "spec": {
                    "parentRefs": [
                        {"group": "", "kind": "Service", "name": svc, "namespace": svc_ns}
                    ],
                    "rules": [
                        {
                            "backendRefs": [{"name": svc, "namespace": svc_ns, "port": 80}],
                            "timeouts": {"request": "100ms"},
                        }
                    ],
                },
            }
        )
        out += [pod(ns, p) for p in range(PODS_PER_NAMESPACE)]
    return out


def pod(ns: str, p: int) -> dict[str, Any]:
    c = int(ns.removeprefix("team"))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"client-{p}", "namespace": ns},
        "spec": {"nodeName": f"node{(c * PODS_PER_NAMESPACE + p) % NODES}"},
        "status": {"phase": "Running", "podIP": f"10.245.{c}.{p + 1}"},
    }


def cold(store: Store) -> float:
    with build_collector(True, len(store.view())):
        t0 = time.perf_counter()
        Translator().translate(build(store.view()).mesh).snapshot()
        return time.perf_counter() - t0


def main() -> int:
    base = Store()
    for o in objects() + nodes():
        base.apply(o)
    with_consumers = Store()
    for o in objects() + nodes() + consumer_objects():
        with_consumers.apply(o)
    result = build(with_consumers.view())
    refused = [
        f"{k}: {c.type}" for k, cs in result.conditions.items() for c in cs if c.status != "True"
    ]
    if refused or len({c.node for c in result.mesh.consumers}) != NODES:
        print(f"the consumer mesh is not what it claims: {refused[:3]}", file=sys.stderr)
        return 1

    # cold: alternating, three each
    gc.collect()
    colds: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(3):
        colds["without"].append(cold(base))
        colds["with"].append(cold(with_consumers))

    # warm: one pod added vs one endpoint change, alternating, on the consumer mesh
    memo, translator = BuildMemo(), Translator()
    translation = translator.translate(build(with_consumers.view(), memo=memo).mesh)
    translation.snapshot()
    shared_size = len(translation.shared[types.LISTENER][0].payload)
    own_sizes = [len(own[types.LISTENER][0].payload) for own in translation.per_node.values()]

    def step(change: dict[str, Any]) -> float:
        with_consumers.apply(change)
        t0 = time.perf_counter()
        t = translator.translate(build(with_consumers.view(), memo=memo).mesh)
        t.snapshot()
        for node in t.per_node:
            t.snapshot(node)
        return time.perf_counter() - t0

    warm: dict[str, list[float]] = {"pod": [], "endpoint": []}
    for k in range(CHANGES):
        ns = f"team{k % NAMESPACES}"
        warm["pod"].append(step(pod(ns, PODS_PER_NAMESPACE + k)))
        i = (k * 7919) % SERVICES
        warm["endpoint"].append(step(endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt=200 + k)))

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs) * 1000, 2)

    print(
        f"mesh: {SERVICES} Services, 50 Nodes; {NAMESPACES} consumer namespaces with "
        f"{NAMESPACES * PODS_PER_NAMESPACE} client pods (every Node has its own Listener)"
    )
    print(
        f"cold build+translate+snapshot: {ms(colds['without'])} ms without the consumer "
        f"objects, {ms(colds['with'])} ms with them (median of 3, alternating)"
    )
    print(
        f"one client pod added: {ms(warm['pod'])} ms; one endpoint change: "
        f"{ms(warm['endpoint'])} ms (median of {CHANGES}, alternating; build, translate and "
        "every node's snapshot)"
    )
    print(
        f"Listener bytes: shared {shared_size:,}; a node's own {min(own_sizes):,}-"
        f"{max(own_sizes):,} ({len(own_sizes)} nodes)"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "services": SERVICES,
                "nodes": NODES,
                "consumer_namespaces": NAMESPACES,
                "client_pods": NAMESPACES * PODS_PER_NAMESPACE,
                "cold_ms": {k: ms(v) for k, v in colds.items()},
                "one_change_ms": {
                    "client_pod_added": ms(warm["pod"]),
                    "endpoint": ms(warm["endpoint"]),
                },
                "listener_bytes": {
                    "shared": shared_size,
                    "own_min": min(own_sizes),
                    "own_max": max(own_sizes),
                },
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
