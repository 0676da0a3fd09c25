"""Data plane benchmark: no mesh (plain veth) vs nodemesh L4 (sockhash), same topology, one run.

Client pinned to CPU 0, echo server to CPU 1 (as far as 2 cores allow, the load generator does
not share a core with what it measures). Writes bench/results/dataplane.json; see
docs/bench-dataplane.md. The L7 (node Envoy) and sidecar columns are not measured yet.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nodemesh.api import Backend, NodeMap, Service  # noqa: E402
from nodemesh.ebpf import NodeMaps  # noqa: E402
from nodemesh.ebpf.testing import PODTOOL, NodeLab, Pod, prerequisites  # noqa: E402

VIP = "10.244.255.10"
SIZES = (1, 1024, 65536)
COUNT = int(os.environ.get("NODEMESH_BENCH_RR", "5000"))
PY = sys.executable


def client(pod: Pod, *args: str) -> Any:
    proc = pod.spawn(["taskset", "-c", "0", PY, str(PODTOOL), *args], f"{pod.name}:{args[0]}")
    result = proc.json(timeout=300)
    proc.stop()
    return result


def measure(a: Pod, to: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size in SIZES:
        out[f"rr_{size}"] = client(a, "rr", "--to", to, "--size", str(size), "--count", str(COUNT))
    out["stream_64k"] = client(a, "stream", "--to", to, "--seconds", "3")
    return out


def main() -> int:
    missing = prerequisites()
    if missing:
        print("dataplane bench needs: " + "; ".join(missing), file=sys.stderr)
        return 0 if os.environ.get("CI") != "true" else 1
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "rr_count": COUNT,
        "modes": {},
    }
    with NodeLab() as lab:
        a, b = lab.add_pod("a"), lab.add_pod("b")
        server = b.spawn(
            ["taskset", "-c", "1", PY, str(PODTOOL), "serve", "--port", "7000", "--name", "b"],
            "b:serve",
        )
        server.json()
        results["modes"]["no_mesh"] = measure(a, f"{b.ip}:7000")
        lab.enable()
        model = NodeMap(
            "bench",
            (Service("echo", VIP, 80, False, (Backend(b.ip, 7000),)),),
            local_addresses=(a.ip, b.ip),
        )
        with NodeMaps(lab.pin_root) as maps:
            maps.apply(model)
            results["modes"]["nodemesh_l4"] = measure(a, f"{VIP}:80")
            results["stats"] = maps.stats()
    out = ROOT / "bench" / "results" / "dataplane.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    base, l4 = results["modes"]["no_mesh"], results["modes"]["nodemesh_l4"]
    print(f"{'metric':<22}{'no mesh':>12}{'nodemesh L4':>14}{'change':>9}")
    for size in SIZES:
        for q in ("p50_us", "p99_us"):
            x, y = base[f"rr_{size}"][q], l4[f"rr_{size}"][q]
            print(f"rr {size:>6} B {q:<9}{x:>12.1f}{y:>14.1f}{(y - x) / x * 100:>8.1f}%")
    x, y = base["stream_64k"]["mb_per_s"], l4["stream_64k"]["mb_per_s"]
    print(f"{'stream 64K MB/s':<22}{x:>12.0f}{y:>14.0f}{(y - x) / x * 100:>8.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
