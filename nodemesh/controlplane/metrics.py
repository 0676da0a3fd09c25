"""`/metrics`: the control plane's state in the Prometheus text format (version 0.0.4), for
alerts a platform team writes: a build that fails (the nodes keep the last good config), a node
Envoy that rejects what it is sent, routes and policies that are not Accepted or not
Programmed, a source that cannot read its objects.

Every value is read from the pipeline and the ADS status tracker when scraped (nothing is kept
for it). The names, their labels and what each means: docs/mesh-api.md, "Metrics".
"""

from __future__ import annotations

from collections import Counter

from nodemesh._prometheus import CONTENT_TYPE, Exposition
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import StoreView
from nodemesh.xds.types import short_name

__all__ = ["CONTENT_TYPE", "render"]


def render(pipeline: Pipeline) -> str:
    exposition = Exposition()
    add = exposition.add

    # -- the pipeline: store, builds, sources ---------------------------------------------
    add(
        "nodemesh_store_revision",
        "gauge",
        "Revision of the object store (each change of an object adds one).",
        [({}, pipeline.store.revision)],
    )
    add(
        "nodemesh_built_revision",
        "gauge",
        "Store revision the last build read, good or failed (-1: none yet).",
        [({}, pipeline.built_revision)],
    )
    add(
        "nodemesh_builds_total",
        "counter",
        "Builds since start, by result; a failed build leaves the nodes the last good config.",
        [({"result": "ok"}, pipeline.rebuilds), ({"result": "failed"}, pipeline.failed_builds)],
    )
    add(
        "nodemesh_build_seconds_total",
        "counter",
        "Time the good builds took (objects to checked snapshots), summed.",
        [({}, pipeline.build_seconds_total)],
    )
    add(
        "nodemesh_last_build_seconds",
        "gauge",
        "Time the last good build took.",
        [({}, pipeline.last_build_seconds)],
    )
    add(
        "nodemesh_last_build_failed",
        "gauge",
        "1 while the last build failed (its error is last_error in /status).",
        [({}, 1 if pipeline.last_error else 0)],
    )
    add(
        "nodemesh_source_errors",
        "gauge",
        "Problems the sources report now: files or objects they could not read (/status).",
        [({}, pipeline.source_errors())],
    )
    view = pipeline.built_view()
    counts = view.counts() if isinstance(view, StoreView) else Counter(k.kind for k in view)
    add(
        "nodemesh_objects",
        "gauge",
        "Objects the last good build read, by kind.",
        [({"kind": kind}, n) for kind, n in sorted(counts.items())],
    )
    # Each object counts once per condition type and status that any of its conditions has
    # (a route's are per parentRef): Accepted, ResolvedRefs, Programmed, and the notices.
    tally: Counter[tuple[str, str, str]] = Counter()
    for key, conditions in pipeline.conditions().items():
        for type_status in {(c.type, c.status) for c in conditions}:
            tally[(key.kind, *type_status)] += 1
    add(
        "nodemesh_object_conditions",
        "gauge",
        "Objects with a condition of this type and status, by kind.",
        [
            ({"kind": kind, "type": ctype, "status": cstatus}, n)
            for (kind, ctype, cstatus), n in sorted(tally.items())
        ],
    )
    add(
        "nodemesh_lingering_clusters",
        "gauge",
        "Removed clusters still served until the nodes hold routes without them.",
        [({}, len(pipeline.lingering.kept))],
    )
    snapshot = pipeline.served_snapshot()
    add(
        "nodemesh_snapshot_resources",
        "gauge",
        "Resources in the snapshot every node is served (its own ones aside), by xDS type.",
        [({"type": short_name(t)}, len(snapshot.resources(t))) for t in snapshot.type_urls]
        if snapshot is not None
        else [],
    )

    # -- the ADS server: nodes, streams, responses, NACKs --------------------------------
    status = pipeline.status
    if status is not None:
        nodes = status.nodes()
        connected = sum(1 for n in nodes if n.connected)
        add(
            "nodemesh_xds_nodes",
            "gauge",
            "Node ids the ADS server knows (an Envoy's or an agent's), by whether a stream is "
            "open (one without is forgotten at a stream's opening or closing an hour after it "
            "left).",
            [({"connected": "true"}, connected), ({"connected": "false"}, len(nodes) - connected)],
        )
        add(
            "nodemesh_xds_streams",
            "gauge",
            "Open ADS streams.",
            [({}, sum(n.streams for n in nodes))],
        )
        add(
            "nodemesh_xds_responses_total",
            "counter",
            "Responses sent since start, by xDS type.",
            [({"type": short_name(t)}, n) for t, n in sorted(status.responses_total.items())],
        )
        add(
            "nodemesh_xds_nacks_total",
            "counter",
            "Responses a node rejected (NACK) since start, by xDS type.",
            [({"type": short_name(t)}, n) for t, n in sorted(status.nacks_total.items())],
        )
        rejecting: Counter[str] = Counter()
        for node in nodes:
            if not node.connected:  # (its last NACK stays in /status; it holds nothing now)
                continue
            for type_url, ts in node.types.items():
                if ts.last_nack is not None:
                    rejecting[type_url] += 1
        add(
            "nodemesh_xds_nodes_rejecting",
            "gauge",
            "Connected nodes whose last answer of this xDS type was a NACK (Envoy's message: "
            "/status).",
            [({"type": short_name(t)}, n) for t, n in sorted(rejecting.items())],
        )
    return exposition.text()
