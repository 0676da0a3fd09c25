"""What the node Envoy port's guard costs a new connection (docs/ebpf.md, "The node Envoy's
port"): a pod's connect() to an L7 ClusterIP, which connect4 sends to the node Envoy's port,
with the guard attached and detached, alternating rounds in one run.

With the guard, each such connection also has sockops write its original destination on
TCP_CONNECT_CB (before the SYN) and the sk_lookup program look it up when the SYN arrives;
without it (`envoy_guard=False`), sockops still writes it once established, as before. A plain
listener on the node's address and port 15001 stands for the node Envoy (accepts and closes:
only the connection's setup is timed, inside the pod, from connect() to its return).

Real kernel (a `NodeLab` node, root, bpffs, cgroup v2). Writes bench/results/envoy_guard.json.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from nodemesh.api import NodeMap, Service
from nodemesh.ebpf import NodeMaps
from nodemesh.ebpf.testing import NodeLab, prerequisites

RESULTS = Path(__file__).parent / "results" / "envoy_guard.json"
VIP = "10.96.77.7"
ROUNDS = 6
CONNECTS = 2000
NODE_MAP_VIP = Service("web", VIP, 80, True)  # L7: connect4 sends it to the node Envoy

# In the pod: CONNECTS connect() calls to argv[1]:80, each timed; prints the microseconds.
CLIENT = r"""
import json, socket, struct, sys, time
times = []
for _ in range(int(sys.argv[2])):
    s = socket.socket()
    # closed with a reset: no TIME_WAIT left (thousands would slow the ports' search)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    start = time.perf_counter_ns()
    s.connect((sys.argv[1], 80))
    times.append((time.perf_counter_ns() - start) / 1000)
    s.close()
print(json.dumps(times))
"""


def _connects(lab: NodeLab) -> list[float]:
    pod = lab.pods["a"]
    done = subprocess.run(
        pod._argv([sys.executable, "-c", CLIENT, VIP, str(CONNECTS)]),
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    times: list[float] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def main() -> int:
    missing = prerequisites()
    if missing:
        print("envoy_guard bench needs: " + "; ".join(missing), file=sys.stderr)
        return 1
    with NodeLab() as lab:
        lab.add_pod("a")
        node_map = NodeMap("bench", (NODE_MAP_VIP,), envoy=(lab.gateway, 15001))
        with lab.accepting(15001):
            samples: dict[str, list[float]] = {"guard": [], "no_guard": []}
            for _ in range(ROUNDS):
                for mode in ("guard", "no_guard"):
                    lab.enable(envoy_guard=mode == "guard")
                    with NodeMaps(lab.pin_root) as maps:
                        maps.apply(node_map)
                    samples[mode].append(statistics.median(_connects(lab)))
            with NodeMaps(lab.pin_root) as maps:
                refused = maps.stats()["envoy_refused"]
    guard, plain = statistics.median(samples["guard"]), statistics.median(samples["no_guard"])
    result: dict[str, Any] = {
        "what": "median connect() to an L7 ClusterIP (to the node Envoy's port), microseconds, "
        f"per round of {CONNECTS}; {ROUNDS} alternating rounds each",
        "guard_us": round(guard, 2),
        "no_guard_us": round(plain, 2),
        "ratio": round(guard / plain, 3),
        "rounds_guard_us": [round(x, 2) for x in samples["guard"]],
        "rounds_no_guard_us": [round(x, 2) for x in samples["no_guard"]],
        "refused": refused,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    print(
        f"connect() to an L7 ClusterIP, median of {ROUNDS} rounds x {CONNECTS}: "
        f"guard {guard:.1f} us, no guard {plain:.1f} us, ratio {guard / plain:.3f} "
        f"(refused by the guard: {refused})"
    )
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
