"""The pipeline: store -> build -> translate -> snapshot cache, and ACK/NACK -> `Programmed`.

Public surface (used by the files source, the kopf operator and the HTTP status listener):

- `Pipeline(store, cache, status=None, *, debounce=0.05, outbound_address, outbound_port,
  node_selector, access_log, cluster_domain)`.
  `await pipeline.start()` subscribes to the store (writes from any thread are fine) and to the
  ADS status tracker, then rebuilds once; `await pipeline.stop()` undoes it. Store changes are
  debounced: a burst of writes within `debounce` seconds gives one rebuild.
- `await pipeline.rebuild()`: rebuild now (tests, CLI start-up). Returns the store revision built.
- `pipeline.conditions()`: `{ObjectKey: (Condition, ...)}` for routes and policies: `Accepted`,
  `ResolvedRefs` (per parentRef for routes) from build, and `Programmed` from the data plane:
  True once every node Envoy that should carry the object ACKed a version containing it; False
  with reason `Rejected` and Envoy's own message after a NACK of a version holding its current
  part; False/`Pending` while in flight (a fix sent after a NACK included);
  False/`NothingToProgram` when no resource holds any of it (a policy whose targets did not
  resolve, or whose every section another policy overrides); Unknown/`NoNodes` while no node
  Envoy is connected. Also, never written back: a Pod whose
  `nodemesh.io/socket-redirect` annotation is neither "on" nor "off" gets `SocketRedirect=False`
  (reason `UnknownValue`), logged once as a warning.
- `pipeline.kubernetes_status(key)`: the `status` body to patch onto the object (Gateway API
  shapes, `lastTransitionTime` kept stable while a condition does not change), or None for
  objects without conditions. It fits `nodemesh.controlplane.kube.StatusSource`, and its
  `subscribe(callback)` calls `callback(key)` whenever that body may have changed, so the
  operator checks an object's status when it changes, and only then; its
  `subscribe_built(callback)` calls `callback()` after each rebuild (see `subscribe_built`).
- `pipeline.subscribe(callback)`: `callback(key, conditions)` whenever an object's conditions
  change (also with `()` when the object went away), and once for every route and policy,
  changed or not, when the pipeline has settled after its start (see `settling`). Called on
  the event loop thread.
- `pipeline.use_peers(peers)`: with several control-plane replicas, count the node Envoys
  connected to the others in `Programmed`, from their verdicts (`nodemesh.controlplane.peers`);
  `pipeline.programmed_report()` is this replica's `(ETag, JSON)` for them (`GET /programmed`).
- `pipeline.set_source_errors(source, {where: message})`: sources report what they could not
  read (invalid YAML, objects without a name); shown in `/status` next to the objects. Safe
  to call from another thread (the files source reads in one).
- A snapshot is published only when translation succeeded and the snapshot is consistent;
  otherwise Envoy keeps the last good config and the error is shown in `status_json()`.

Everything but the store callback runs on one event loop, like the cache and the ADS server.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from nodemesh.controlplane._linger import Lingering
from nodemesh.controlplane.builder import (
    CLUSTER_DOMAIN,
    BuildMemo,
    BuildResult,
    LabelSelector,
    build,
)
from nodemesh.controlplane.builder import cluster_domain as check_cluster_domain
from nodemesh.controlplane.builder.node import node_ready
from nodemesh.controlplane.conditions import Condition, kubernetes_status
from nodemesh.controlplane.peers import PeerReport, Peers
from nodemesh.controlplane.store import ObjectKey, Store, StoreView
from nodemesh.xds import types
from nodemesh.xds.cache import Resource, Snapshot, SnapshotCache
from nodemesh.xds.server import AckEvent, NackRecord, NodeStatus, StatusTracker
from nodemesh.xds.translate import LISTENER_NAME, Translation, Translator
from nodemesh.xds.translate.cluster import cluster_of_eds_name

__all__ = ["BULK_OBJECTS", "ConditionsCallback", "KubernetesStatus", "Pipeline", "build_collector"]

log = logging.getLogger(__name__)

ConditionsCallback = Callable[[ObjectKey, tuple[Condition, ...]], None]
_STATUS_KINDS = ("HTTPRoute", "GRPCRoute", "TrafficPolicy")
# Kinds whose objects may get conditions that nodemesh shows (in /status and the log) but does
# not own, so never writes back: a Pod with an unusable socket-redirect annotation, a Service
# with settings the mesh does not honour.
_NOTICE_KINDS = ("Pod", "Service")
# The conditions whose False the log says (Programmed=False is a wait, or an Envoy's NACK,
# which the ADS server logs)
_REFUSALS = ("Accepted", "ResolvedRefs")
_REFUSALS_LOGGED = 20
# What a node Envoy asks for (its agent asks for the service map types only)
_ENVOY_TYPES = (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)


# A cold build of fewer objects than this leaves the collector alone (tests, demos, small meshes:
# little to gain, and nothing of theirs is frozen).
BULK_OBJECTS = 5_000
# Versions of a node's own Listener remembered for Programmed (see _record_listener_history)
_LISTENER_VERSIONS_KEPT = 32


@contextmanager
def build_collector(cold: bool, objects: int) -> Iterator[None]:
    """The cyclic garbage collector's part in a rebuild of `objects` store objects
    (`Pipeline.rebuild` runs build, translate and snapshot inside it; `bench/translate.py`
    does the same).

    A cold build of a big mesh makes about a million objects that live on (IR, resources) next
    to a store of about as many; the collector would scan them all several times while they
    are made (a quarter of the cold build's time), for garbage that build and translate do not
    make: their objects are freed by reference counting. So during a big cold build it is
    paused, and afterwards everything alive is frozen (`gc.freeze`): later collections skip
    the store and the IR as they were then, and reference counting still frees them when they
    are replaced. The price: a reference cycle that is already garbage at that moment is never
    collected (the pipeline makes none; start-up may leave a few). Warm builds and small cold
    builds leave the collector alone.
    """
    if not cold or objects < BULK_OBJECTS or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


@dataclass(frozen=True, slots=True)
class _ListenerLag:
    """Nodes whose outbound Listener is not the current one, and hold the same version and
    NACK: which of the Listener's parts (`Translation.listener_chains`: "" and destination
    route names) differ between the current version and the one they hold (None: not known,
    every part), and the one they rejected. Made once per recompute: an object then checks
    its parts against each group, not against each node (1,500 objects x 50 nodes)."""

    nodes: tuple[str, ...]
    held_differs: frozenset[str] | None
    nack: NackRecord | None
    nacked_differs: frozenset[str] | None  # (the current version rejected: frozenset())


def _differing(
    now: Mapping[str, int] | None, then: Mapping[str, int] | None
) -> frozenset[str] | None:
    if now is None or then is None:
        return None
    return frozenset(n for n in now.keys() | then.keys() if now.get(n) != then.get(n))


@dataclass(frozen=True, slots=True)
class _ProgrammedContext:
    by_origin: Mapping[str, list[tuple[str, str]]]
    expected: int  # nodes that should carry every object
    # nodes that connected and do not hold everything yet: (node id, its status, the types
    # it holds whole at the current version)
    partial: list[tuple[str, NodeStatus, frozenset[str]]]
    unseen: list[str]  # expected nodes that never connected: everything waits there
    # per object, the expected nodes whose own Listener carries it (consumer routes: they
    # apply on a node once it holds its Listener's current version)
    on_node_listeners: Mapping[str, list[str]]
    # equal signatures: nothing about the nodes changed (see _update_conditions)
    signature: tuple[object, ...]
    # Node objects left out because they are not Ready (and not connected)
    not_ready: tuple[str, ...] = ()
    # expected nodes connected to a peer replica (not to this one), and the peers' reports
    # that cover them (see `use_peers`)
    remote: Mapping[str, str] = field(default_factory=dict)
    peers: tuple[PeerReport, ...] = ()
    # expected nodes on their way from a peer to another replica (also in `remote`): the
    # last report of each peer they left, with them
    moving_from: tuple[tuple[PeerReport, tuple[str, ...]], ...] = ()
    # connected nodes (here) whose outbound Listener is not the current one, grouped by what
    # they hold (see `_ListenerLag`)
    lds_behind: tuple[_ListenerLag, ...] = ()
    # expected nodes (not a peer's) whose Envoy is not connected here: never, not since it left,
    # or only their agent is
    absent: tuple[str, ...] = ()


# How long a replica says that a node's Envoy left it on its own (`left` in /programmed): past
# the other replicas' `stale_after` and `move_grace`, the only times they ask
_LEFT_KEPT = 60.0


def _same_parts(then: Mapping[str, int] | None, parts: Mapping[str, int]) -> bool:
    """Whether a version of a node's own Listener (its parts per consumer namespace, `then`)
    has every one of `parts`: what an object's traffic takes there is the same."""
    return then is not None and bool(parts) and all(then.get(ns) == p for ns, p in parts.items())


def _envoy_connected(node: NodeStatus) -> bool:
    """Whether one of the node's open streams speaks for an Envoy type (see `_envoys_here`)."""
    if node.connected:
        for t in _ENVOY_TYPES:
            ts = node.types.get(t)
            if ts is not None and ts.stream is not None:
                return True
    return False


def _by_report(moving: Mapping[str, PeerReport]) -> tuple[tuple[PeerReport, tuple[str, ...]], ...]:
    """Moving nodes grouped by the report of the peer they left."""
    groups: dict[int, tuple[PeerReport, list[str]]] = {}
    for node, report in moving.items():
        groups.setdefault(id(report), (report, []))[1].append(node)
    return tuple((report, tuple(nodes)) for report, nodes in groups.values())


def _moving_wait(nodes: list[str], peer: str) -> str:
    if len(nodes) == 1:
        return f"waiting for {nodes[0]} to connect again (it left replica {peer})"
    more = f" (+{len(nodes) - 3} more)" if len(nodes) > 3 else ""
    return f"waiting for {', '.join(nodes[:3])}{more} to connect again (they left replica {peer})"


class KubernetesStatus:
    """`pipeline.kubernetes_status`: a `StatusSource` (called with a key) that can also be
    watched, through the pipeline's own conditions subscription."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    def __call__(self, key: ObjectKey) -> dict[str, Any] | None:
        return self._pipeline.status_body(key)

    def settling(self) -> bool:
        """See `Pipeline.settling`."""
        return self._pipeline.settling()

    def subscribe(self, callback: Callable[[ObjectKey], None]) -> Callable[[], None]:
        """`callback(key)` on the event loop whenever `key`'s conditions change or go away."""
        return self._pipeline.subscribe(lambda key, _conditions: callback(key))

    def built_from(self, key: ObjectKey) -> Mapping[str, Any] | None:
        """The object `key`'s status was computed from (the last build's), or None."""
        return self._pipeline.built_object(key)

    def subscribe_built(self, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback()` on the event loop after each rebuild, good or failed: `built_from` may
        have changed though no conditions did."""
        return self._pipeline.subscribe_built(callback)


class Pipeline:
    def __init__(
        self,
        store: Store,
        cache: SnapshotCache,
        status: StatusTracker | None = None,
        *,
        debounce: float = 0.05,
        outbound_address: str = "0.0.0.0",
        outbound_port: int = 15001,
        node_selector: LabelSelector | None = None,
        access_log: str = "",
        cluster_domain: str = CLUSTER_DOMAIN,
    ) -> None:
        self.store = store
        self.cache = cache
        self.status = status
        self.debounce = debounce
        self.outbound_address = outbound_address
        self.outbound_port = outbound_port
        self.node_selector = node_selector  # the Nodes that run nodemesh (None: every Node)
        self.access_log = access_log  # where node Envoys log each request ("": nowhere)
        self.cluster_domain = check_cluster_domain(cluster_domain)  # Services' FQDNs end in it
        self.translator = Translator()
        self._memo = BuildMemo()
        self.built_revision = -1
        self.snapshot: Snapshot | None = None
        self.translation: Translation | None = None
        self.last_error = ""
        self.rebuilds = 0  # builds that succeeded
        self.failed_builds = 0
        self.last_build_seconds = 0.0
        self.build_seconds_total = 0.0  # of the builds that succeeded
        self._result: BuildResult | None = None
        self._conditions: dict[ObjectKey, tuple[Condition, ...]] = {}
        self._view: Mapping[ObjectKey, Any] = {}  # the store view last built
        # Node objects whose Ready condition is not True, and the Node mapping it was read from
        self._unready: tuple[str, ...] = ()
        self._unready_of: Mapping[ObjectKey, Any] | None = None
        # per object, (parent, type) -> (status, when it took that status); by object, so that
        # the status body of one (asked for whenever it may have changed) and an
        # object's removal touch only its own entries
        self._transitions: dict[ObjectKey, dict[tuple[str, str], tuple[str, str]]] = {}
        self._transition_uids: dict[ObjectKey, str] = {}  # the object the times are of
        self._source_errors: dict[str, dict[str, str]] = {}
        self._subscribers: list[ConditionsCallback] = []
        self._built_subscribers: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._programmed_scheduled = False
        self._built = asyncio.Condition()
        # (type, name, version) -> {origin: fingerprint of what that version holds of it}
        self._history: dict[tuple[str, str, str], dict[str, int]] = {}
        self._history_tokens: dict[str, object] = {}  # per type, the set last recorded
        self._snapshot_nodes: set[str] = set()  # nodes given a snapshot of their own
        # Clusters a rebuild removed, served until the nodes hold the routes without them
        # (`_linger`); what the cache serves: the shared snapshot, and the nodes' own as built
        self.lingering = Lingering()
        self._served: Snapshot | None = None
        self._built_nodes: dict[str, Snapshot] = {}
        self._linger_timer: asyncio.TimerHandle | None = None
        # what each object's conditions were made from, for _update_conditions to skip them
        self._inputs: dict[ObjectKey, tuple[object, int]] = {}
        self._inputs_signature: object = None
        self._inputs_revision: int | None = None  # the store view they were made from
        self._touched_tokens: dict[str, object] = {}
        self._touched_origins: Mapping[tuple[str, str], Any] | None = None
        # node -> (its own Listener, the objects it carries), as last seen there
        self._touched_listeners: dict[str, tuple[Resource, frozenset[str]]] = {}
        # node -> versions of its own Listener (oldest first) -> per consumer namespace, the
        # fingerprint of its part: a node still on an older version holds a namespace's part
        # if the fingerprints are equal
        self._listener_history: dict[str, dict[str, Mapping[str, int]]] = {}
        # version of an outbound Listener (the shared one, a node's own) -> its parts that
        # every node's has (`Translation.listener_chains`), oldest first
        self._lds_parts: dict[str, Mapping[str, int]] = {}
        self.history_slack = 1000  # versions kept beyond 4 per current resource (tests lower it)
        self._origin_index: tuple[object, dict[str, list[tuple[str, str]]]] | None = None
        self._origin_types: frozenset[str] = frozenset()  # the types the origins name
        self.kubernetes_status = KubernetesStatus(self)
        self.peers: Peers | None = None  # the other replicas' verdicts (see use_peers)
        # after start, at most this long: the node Envoys reconnecting (see settling)
        self.settle_seconds = 30.0
        self._settle_until: float | None = None
        self._settled = False
        self._settle_timer: asyncio.TimerHandle | None = None
        self._conditions_made = 0  # times _update_conditions ran: the peer report's freshness
        self._peer_report: tuple[int, str, bytes] | None = None  # (made at, ETag, body)
        # nodes that left a peer and whose Envoy then connected here, with that peer's report:
        # not moving any more on that report (see _moving_nodes)
        self._landed: dict[str, PeerReport] = {}
        self.draining = False  # shutting down: said in /programmed (see drain)
        self._cut_at: float | None = None  # time.monotonic() the drain cuts the streams
        # node -> when its Envoy closed its stream on its own (not cut by the drain), kept
        # for _LEFT_KEPT seconds unless it comes back: `left` in /programmed (see drain)
        self._left: dict[str, float] = {}
        self._left_pruned = 0.0

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unsubscribe.append(self.store.subscribe(self._on_store_change))
        if self.status is not None:
            self._unsubscribe.append(self.status.add_listener(self._on_ack))
        self._settle_until = time.monotonic() + self.settle_seconds
        self._settle_timer = self._loop.call_later(self.settle_seconds, self._recompute_programmed)
        await self.rebuild()
        self._task = asyncio.create_task(self._run(), name="nodemesh-pipeline")

    async def stop(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None

    def subscribe(self, callback: ConditionsCallback) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def use_peers(self, peers: Peers) -> None:
        """Count the node Envoys connected to the other replicas in `Programmed`, from their
        reports (call before `start`)."""
        self.peers = peers
        self._unsubscribe.append(peers.subscribe(lambda: self._on_ack(None)))

    def set_source_errors(self, source: str, errors: Mapping[str, str]) -> None:
        # a new mapping, not an update: the files source calls this from its thread while
        # `status_json` may be iterating
        self._source_errors = {**self._source_errors, source: dict(errors)}

    # -- reading ---------------------------------------------------------------------------
    def source_errors(self) -> int:
        """How many problems the sources report (files or objects they could not read)."""
        return sum(len(errors) for errors in self._source_errors.values())

    def built_view(self) -> Mapping[ObjectKey, Any]:
        """The store view the last good build read."""
        return self._view

    def served_snapshot(self) -> Snapshot | None:
        """The shared snapshot the nodes are served (with lingering clusters)."""
        return self._served or self.snapshot

    def conditions(self) -> dict[ObjectKey, tuple[Condition, ...]]:
        return dict(self._conditions)

    def built_object(self, key: ObjectKey) -> Mapping[str, Any] | None:
        """`key`'s object as the last good build read it (its conditions are from it)."""
        obj = self._view.get(key)
        return obj if isinstance(obj, Mapping) else None

    def status_body(self, key: ObjectKey) -> dict[str, Any] | None:
        """The status body for `key`, or None if the pipeline has no conditions for it (what
        `kubernetes_status`, the `StatusSource` the kopf operator calls, returns)."""
        if key not in self._conditions or key.kind in _NOTICE_KINDS:
            return None  # (a Pod's or Service's notices are shown, never written back)
        transitions = {pt: t for pt, (_, t) in self._transitions.get(key, {}).items()}
        return kubernetes_status(key.kind, self._conditions.get(key, ()), transitions)

    def _node_snapshot_versions(self) -> dict[str, dict[str, str | None]]:
        shared, translation = self._served, self.translation  # (served: lingering clusters too)
        if shared is None or translation is None:
            return {}
        out: dict[str, dict[str, str | None]] = {}
        for node in sorted(translation.per_node):
            own = self.cache.get_snapshot(node)
            if own is None or own is shared:
                continue
            differ = {
                types.short_name(t): own.version(t)
                for t in own.type_urls
                if own.version(t) != shared.version(t)
            }
            if differ:
                out[node] = differ
        return out

    async def wait_built(self, revision: int, timeout: float = 10.0) -> None:
        """Wait until the store revision `revision` (or a later one) has been built."""
        async with self._built:
            await asyncio.wait_for(
                self._built.wait_for(lambda: self.built_revision >= revision), timeout
            )

    def status_json(self) -> dict[str, Any]:
        objects = []
        for key in sorted(self._conditions):
            objects.append(
                {
                    "kind": key.kind,
                    "namespace": key.namespace,
                    "name": key.name,
                    "generation": self._generation(key),
                    "conditions": [
                        {**c.as_dict(), "parent": c.parent} for c in self._conditions[key]
                    ],
                }
            )
        snapshot = self._served or self.snapshot  # what the nodes are served
        now = time.monotonic()
        return {
            "store_revision": self.store.revision,
            "built_revision": self.built_revision,
            "last_error": self.last_error,
            "build_seconds": round(self.last_build_seconds, 4),
            "snapshot": {types.short_name(t): snapshot.version(t) for t in snapshot.type_urls}
            if snapshot is not None
            else {},
            # nodes with resources of their own: the versions that differ from "snapshot"
            "node_snapshots": self._node_snapshot_versions(),
            # removed clusters still served until the nodes ACK the routes without them
            "lingering_clusters": [
                {"name": name, "seconds": round(now - k.since, 1)}
                for name, k in sorted(self.lingering.kept.items())
            ],
            "source_errors": [
                {"source": source, "where": where, "message": message}
                for source, errors in sorted(self._source_errors.items())
                for where, message in sorted(errors.items())
            ],
            "objects": objects,
            "nodes": self._nodes_json(),
            # the other replicas whose node Envoys count in Programmed (see use_peers)
            "peers": self.peers.describe() if self.peers is not None else {},
        }

    def _nodes_json(self) -> dict[str, Any]:
        """Per node its streams and versions, and whether its Envoy is connected (`connected`:
        any stream, its agent's too); and a Ready Node whose Envoy never connected here, nor
        to a peer (nor is on its way from one), `connected: false`: before, it was missing,
        and objects waiting for it read like a slow ACK."""
        out = self.status.snapshot() if self.status is not None else {}
        if self.status is not None:
            envoys = self._envoys_here()
            for node_id, entry in out.items():
                entry["envoy_connected"] = node_id in envoys
        if self._result is None:
            return out
        elsewhere: set[str] = set()
        if self.peers is not None:
            elsewhere.update(self._remote_nodes()[0], self.peers.departed())
        for node in sorted(self._ready_nodes() - out.keys() - elsewhere):
            out[node] = {"connected": False, "streams": 0, "types": {}, "envoy_connected": False}
        return dict(sorted(out.items()))

    # -- rebuilding ------------------------------------------------------------------------
    def _on_store_change(self, revision: int, changed: frozenset[ObjectKey]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._dirty.set()
        else:
            loop.call_soon_threadsafe(self._dirty.set)

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            # Coalesce a burst of writes into one rebuild.
            await asyncio.sleep(self.debounce)
            self._dirty.clear()
            try:
                await self.rebuild()
            except Exception:  # keep serving the last good config whatever happens
                log.exception("rebuild failed")

    async def rebuild(self) -> int:
        view = self.store.view()
        started = time.perf_counter()
        try:
            with build_collector(cold=self._memo.cold, objects=len(view)):
                result = build(
                    view,
                    outbound_address=self.outbound_address,
                    outbound_port=self.outbound_port,
                    node_selector=self.node_selector,
                    access_log=self.access_log,
                    domain=self.cluster_domain,
                    memo=self._memo,
                )
                translation = self.translator.translate(result.mesh)
                snapshot = translation.snapshot()
                # Nodes with resources of their own: every Node object, and any node with
                # clients of a consumer namespace (its own Listener), Node object or not.
                node_snapshots = {
                    node: translation.snapshot(node)
                    for node in sorted({*result.mesh.nodes, *translation.per_node})
                }
            problems = snapshot.consistent()
            for node, node_snapshot in node_snapshots.items():
                if node_snapshot is not snapshot and types.LISTENER in translation.per_node.get(
                    node, ()
                ):  # its own Listener's route configurations (the rest is the shared one's)
                    problems += [f"node {node}: {p}" for p in node_snapshot.consistent()]
            if problems:
                raise ValueError("inconsistent snapshot: " + "; ".join(problems))
        except Exception as exc:
            self.failed_builds += 1
            self.last_error = f"revision {view.revision}: {exc}"
            log.exception(
                "build of revision %d failed; keeping the last good config", view.revision
            )
            self.built_revision = view.revision
            await self._notify_built()
            return view.revision
        seconds = time.perf_counter() - started  # objects to checked snapshots
        self.last_error = ""
        try:
            self._result = result
            self.translation = translation
            before, self.snapshot = self.snapshot, snapshot
            self._view = view  # the objects' generations are read from it when needed
            self._record_history(result, snapshot)
            self._record_listener_history(translation)
            self._built_nodes = node_snapshots
            served, node_served = self.lingering.carry(
                self._served,
                before,
                snapshot,
                node_snapshots,
                time.monotonic(),
                self._anyone_connected(),
            )
            self._serve(served, node_served)
            self.built_revision = view.revision
            self._update_conditions()
            self._check_lingering()
        except Exception as exc:  # (a bug): counted as a failed build, raised to the caller
            self.failed_builds += 1
            self.last_error = f"revision {view.revision}: {exc}"
            raise
        self.last_build_seconds = seconds
        self.build_seconds_total += seconds
        self.rebuilds += 1
        await self._notify_built()
        log.debug("built revision %d in %.1f ms", view.revision, self.last_build_seconds * 1000)
        return view.revision

    def _serve(self, shared: Snapshot, nodes: Mapping[str, Snapshot]) -> None:
        # A node that is gone (its Node deleted) falls back to the shared snapshot, whose
        # empty NodeServiceMap set tells its agent that its map was withdrawn; left with its
        # own, it would be served that snapshot frozen.
        self._served = shared
        self.cache.set_fallback_snapshot(shared)
        names = set(nodes)
        for node in sorted(self._snapshot_nodes - names):
            self.cache.clear_snapshot(node)
        self._snapshot_nodes = names
        for node, node_snapshot in nodes.items():
            self.cache.set_snapshot(node, node_snapshot)

    def _anyone_connected(self) -> bool:
        return self.status is not None and any(n.connected for n in self.status.nodes())

    def _check_lingering(self) -> None:
        """Serve the snapshots as built once the clusters they dropped may go (see
        `_linger`); else look again when the oldest would expire."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if not self.lingering.kept or self.snapshot is None:
            return
        now = time.monotonic()
        if self.lingering.expired(now):
            # Only those go: a cluster removed since may still be named by routes in flight.
            served, nodes = self.lingering.carry(
                self._served,
                self.snapshot,
                self.snapshot,
                self._built_nodes,
                now,
                self._anyone_connected(),
            )
            self._serve(served, nodes)
        if self.lingering.may_go(self.status, self.cache.get_snapshot, now):
            log.debug("clusters removed after the routes: %s", sorted(self.lingering.kept))
            self.lingering.release()
            self._serve(self.snapshot, self._built_nodes)
            return
        expiry = self.lingering.next_expiry()
        if self._loop is not None and expiry is not None:
            self._linger_timer = self._loop.call_later(
                max(0.0, expiry - now), self._check_lingering
            )

    def subscribe_built(self, callback: Callable[[], None]) -> Callable[[], None]:
        """`callback()` on the event loop after each rebuild (`built_revision` set), whether
        it built or failed."""
        self._built_subscribers.append(callback)
        return lambda: self._built_subscribers.remove(callback)

    async def _notify_built(self) -> None:
        for callback in list(self._built_subscribers):
            try:
                callback()
            except Exception:
                log.exception("build subscriber failed")
        async with self._built:
            self._built.notify_all()

    # -- Programmed ------------------------------------------------------------------------
    def _record_history(self, result: BuildResult, snapshot: Snapshot) -> None:
        """Remember, per resource version, a fingerprint of each object's part in it. An object
        is programmed on a node when the version the node ACKed holds the object's current
        part, so a NACK caused by one route leaves the others Programmed."""
        mesh = result.mesh
        new = []
        for t in (types.CLUSTER, types.ENDPOINT, types.ROUTE):
            ts = snapshot.type_set(t)
            if ts is None:
                continue
            # only the names changed since the last recorded set, when its lineage says so
            last = self._history_tokens.get(t)
            names = ts.changed_since(last, len(ts.items) // 4) if last is not None else None
            items = ts.items
            for name in items if names is None else (n for n in names if n in items):
                key = (t, name, items[name].version)
                if key not in self._history:
                    new.append(key)
            self._history_tokens[t] = ts.token
        if not new:
            return
        clusters = {c.name: c for c in mesh.clusters}
        endpoints = {e.cluster: e for e in mesh.endpoints}
        route_fp: dict[str, int] | None = None
        for t, name, version in new:
            if t == types.CLUSTER:
                c = clusters[name]
                fp = {o: hash(c) for o in c.origins}
            elif t == types.ENDPOINT:
                e = endpoints[cluster_of_eds_name(name)]
                owner = clusters.get(e.cluster)
                fp = {o: hash(e) for o in (owner.origins if owner else ())}
            else:
                if route_fp is None:
                    parts: dict[str, list[int]] = {}
                    for vh in mesh.virtual_hosts:
                        for o in vh.origins:
                            parts.setdefault(o, []).append(hash((vh.name, vh.domains)))
                        for r in vh.routes:
                            for o in r.origins:
                                parts.setdefault(o, []).append(hash((vh.name, r)))
                    route_fp = {o: hash(tuple(v)) for o, v in parts.items()}
                fp = route_fp
            self._history[(t, name, version)] = fp
        # Oldest first, but never a current version: an unchanged resource's entry is old, and
        # only changed names are recorded, so a current entry dropped would not come back
        # (a node still on an older version would then look programmed). It moves to the end.
        current = sum(
            len(snapshot.resources(t)) for t in (types.CLUSTER, types.ENDPOINT, types.ROUTE)
        )
        limit = 4 * current + self.history_slack
        while len(self._history) > limit:
            key = next(iter(self._history))
            fp = self._history.pop(key)
            t, name, version = key
            now = snapshot.resources(t).get(name)
            if now is not None and now.version == version:
                self._history[key] = fp

    def _record_listener_history(self, translation: Translation) -> None:
        now = [r.version for r in translation.shared.get(types.LISTENER, ())]
        for own in translation.per_node.values():
            now += [r.version for r in own.get(types.LISTENER, ())]
        parts = self._lds_parts
        for version in now:
            parts.pop(version, None)  # to the end: a current one is never the oldest
            parts[version] = translation.listener_chains
        while len(parts) > _LISTENER_VERSIONS_KEPT + len(now):
            del parts[next(iter(parts))]
        history = self._listener_history
        for node in [n for n in history if types.LISTENER not in translation.per_node.get(n, {})]:
            del history[node]
        for node, own in translation.per_node.items():
            if types.LISTENER not in own:
                continue
            versions = history.setdefault(node, {})
            version = own[types.LISTENER][0].version
            versions.pop(version, None)  # to the end: the current one is never the oldest
            versions[version] = translation.node_parts.get(node, {})
            while len(versions) > _LISTENER_VERSIONS_KEPT:
                del versions[next(iter(versions))]

    def _on_ack(self, event: AckEvent | None) -> None:
        if event is not None and event.kind in ("closed", "resumed"):
            self._note_envoy(event)
        # Many ACKs arrive together (one per type per node): recompute once per loop turn.
        if self._programmed_scheduled or self._loop is None:
            return
        self._programmed_scheduled = True
        self._loop.call_soon(self._recompute_programmed)

    def _recompute_programmed(self) -> None:
        self._programmed_scheduled = False
        self._update_conditions()
        self._check_lingering()

    def _expected_nodes(self, remote: Mapping[str, str]) -> list[str]:
        """Every node whose Envoy is connected (here or, `remote`, to a peer), and every Node
        object but those not Ready: a node that is down holds nothing, and gets the current
        version when its Envoy connects again. A node whose agent alone is connected (its
        Envoy down, on a Node not Ready or one `--node-selector` leaves out) is not counted."""
        return sorted(self._ready_nodes() | self._envoys_here() | remote.keys())

    def _ready_nodes(self) -> set[str]:
        """The Node objects (that run nodemesh) but those not Ready."""
        nodes = set(self._result.mesh.nodes) if self._result is not None else set()
        nodes.difference_update(self._unready_nodes())
        return nodes

    def _envoys_here(self) -> set[str]:
        """The nodes whose Envoy is connected here: one of the node's open streams speaks for
        an Envoy type. A node's agent has a stream of its own, under the same node id, and
        behind the control plane's Service it may reach another replica than its Envoy."""
        if self.status is None:
            return set()
        return {n.node_id for n in self.status.nodes() if _envoy_connected(n)}

    def _remote_nodes(self) -> tuple[dict[str, str], tuple[PeerReport, ...]]:
        """The nodes connected to a peer replica and not to this one (node -> peer), and the
        reports of the peers that have any."""
        if self.peers is None:
            return {}, ()
        here = self._envoys_here()  # (a node whose agent only is here: its Envoy is there)
        reports = self.peers.reports()
        remote: dict[str, str] = {}
        for name, report in reports.items():
            for node in report.nodes:
                if node not in here:
                    remote.setdefault(node, name)
        covering = tuple(r for n, r in reports.items() if n in remote.values())
        return remote, covering

    def _moving_nodes(self, remote: Mapping[str, str]) -> dict[str, PeerReport]:
        """The Ready Nodes whose Envoy left a peer that went away or drains (a rolling update
        of the control plane stops it) and is connected nowhere yet, within the peers'
        `move_grace`: by node, the last report of the peer it left. That Envoy keeps its
        config while it reconnects; counted as not connected, every object it carries went
        Pending, and back, for every replica a rolling update replaced. A node whose Envoy
        connected here since is not moving any more: it is here, or it left this replica."""
        departed = self.peers.departed() if self.peers is not None else {}
        if not departed:  # (nearly always: no walk over the nodes then)
            self._landed = {}
            return {}
        here, ready = self._envoys_here(), self._ready_nodes()
        landed = {n: r for n, r in self._landed.items() if departed.get(n) is r}
        moving: dict[str, PeerReport] = {}
        for node, report in departed.items():
            if node in here:
                landed[node] = report
            elif node not in remote and node in ready and landed.get(node) is not report:
                moving[node] = report
        self._landed = landed
        return moving

    def _unready_nodes(self) -> tuple[str, ...]:
        """Node objects whose `Ready` condition is not True, sorted (read again only after a
        Node changed: the view keeps a kind's mapping object while none did)."""
        view = self._view
        objs = view.of_kind("Node") if isinstance(view, StoreView) else {}
        if objs is not self._unready_of:
            self._unready_of = objs
            self._unready = tuple(sorted(k.name for k, o in objs.items() if not node_ready(o)))
        return self._unready

    def _generation(self, key: ObjectKey) -> int:
        obj = self._view.get(key)
        return int(obj["metadata"].get("generation", 0)) if obj is not None else 0

    def _changed_origins(self) -> set[str] | None:
        """The objects carried by a resource that changed since the last call (by the
        snapshot's TypeSet lineage), or None when that is not known."""
        snapshot, translation = self.snapshot, self.translation
        if snapshot is None or translation is None:
            return None
        before = self._touched_origins
        out: set[str] = set()
        known = before is not None
        tokens: dict[str, object] = {}
        for t in self._origin_types or {t for t, _ in translation.origins}:
            ts = snapshot.type_set(t)
            if ts is None:
                continue
            tokens[t] = ts.token
            last = self._touched_tokens.get(t)
            names = ts.changed_since(last, len(ts.items) // 4) if last is not None else None
            if names is None or before is None:
                known = False
                continue
            for name in names:
                out.update(translation.origins.get((t, name), ()))
                out.update(before.get((t, name), ()))  # a resource gone: who it carried
        self._touched_tokens, self._touched_origins = tokens, translation.origins
        # nodes' own Listeners that changed, came or went: the objects they carry(carried)
        listeners = {
            node: (own[types.LISTENER][0], translation.node_origins.get(node, frozenset()))
            for node, own in translation.per_node.items()
            if types.LISTENER in own
        }
        before_listeners, self._touched_listeners = self._touched_listeners, listeners
        for node in listeners.keys() | before_listeners.keys():
            now, was = listeners.get(node), before_listeners.get(node)
            if now is None or was is None or now[0] is not was[0] or now[1] != was[1]:
                out.update(now[1] if now is not None else ())
                out.update(was[1] if was is not None else ())
        return out if known else None

    def _by_origin(self) -> dict[str, list[tuple[str, str]]]:
        """Per object ("Kind/ns/name"), the resources (type, name) that carry a part of it, in
        the order of `Translation.origins`. Made again only when the origins change (an
        endpoint change keeps them)."""
        translation = self.translation
        assert translation is not None
        cached = self._origin_index
        if cached is not None and cached[0] is translation.origins:
            return cached[1]
        index: dict[str, list[tuple[str, str]]] = {}
        for (t, name), origins in translation.origins.items():
            for origin in origins:
                index.setdefault(origin, []).append((t, name))
        self._origin_index = (translation.origins, index)
        self._origin_types = frozenset(t for t, _ in translation.origins)
        return index

    def _programmed_context(self, local_only: bool = False) -> _ProgrammedContext:
        """What every object's Programmed condition reads, gathered once per recompute: the
        expected nodes, their status, and per node the types it holds whole at the current
        version (then every object's part of that type is programmed there, unlooked at).
        `local_only`: the nodes connected to this replica only (what its peers ask for)."""
        snapshot = self.snapshot
        assert snapshot is not None
        remote, peers = self._remote_nodes() if not local_only else ({}, ())
        moving = self._moving_nodes(remote) if not local_only else {}
        if moving:
            remote = {**remote, **{node: report.peer for node, report in moving.items()}}
        envoys = self._envoys_here()
        expected = sorted(envoys) if local_only else self._expected_nodes(remote)
        partial, unseen = [], []
        lds_behind: dict[tuple[str, str | None, str | None, int], list[str]] = {}
        nacks: dict[int, NackRecord | None] = {}
        translation_now = self.translation
        assert translation_now is not None
        shared_listener = next(iter(snapshot.resources(types.LISTENER).values()), None)
        by_origin = self._by_origin()
        everything = self._origin_types
        for node_id in expected:
            if node_id in remote:
                continue  # its peer's verdicts count for it
            node = self.status.node(node_id) if self.status is not None else None
            if node is None:
                unseen.append(node_id)
                continue
            whole = frozenset(
                t
                for t, ts in node.types.items()
                if ts.version_acked
                and ts.version_acked == snapshot.version(t)
                and len(ts.acked_resources) == len(snapshot.resources(t))
            )
            if not everything <= whole:
                partial.append((node_id, node, whole))
            own = translation_now.per_node.get(node_id, {}).get(types.LISTENER)
            listener = own[0] if own else shared_listener
            if listener is not None:
                ts = node.types.get(types.LISTENER)
                held = ts.acked_resources.get(listener.name) if ts is not None else None
                if held != listener.version:
                    nack = ts.last_nack if ts is not None else None
                    nacked = nack.resource_versions.get(LISTENER_NAME) if nack else None
                    nacks[id(nack)] = nack
                    lag = (listener.version, held, nacked, id(nack))
                    lds_behind.setdefault(lag, []).append(node_id)
        epoch = self.status.epoch if self.status is not None else -1
        on_node_listeners: dict[str, list[str]] = {}
        translation = self.translation
        wanted = set(expected)
        if translation is not None and translation.node_origins:
            for node_id, origins in sorted(translation.node_origins.items()):
                if node_id in wanted:
                    for origin in origins:
                        on_node_listeners.setdefault(origin, []).append(node_id)
        not_ready = tuple(
            n
            for n in self._unready_nodes()
            if n not in wanted
            and not local_only
            and self._result is not None
            and n in self._result.mesh.nodes
        )
        return _ProgrammedContext(
            by_origin,
            len(expected),
            partial,
            unseen,
            on_node_listeners,
            # the Nodes the message names too: one that joins or leaves while not Ready
            # changes no expected node, but the message; and what the peers said
            (
                epoch,
                tuple(expected),
                not_ready,
                tuple((r.peer, r.etag) for r in peers),
                tuple((node, r.peer, r.etag) for node, r in moving.items()),
            ),
            not_ready,
            remote,
            peers,
            _by_report(moving),
            tuple(
                _ListenerLag(
                    tuple(nodes),
                    _differing(self._lds_parts.get(now), self._lds_parts.get(held))
                    if held is not None
                    else None,
                    nacks[nack_id],
                    frozenset()
                    if nacked == now
                    else _differing(self._lds_parts.get(now), self._lds_parts.get(nacked))
                    if nacked is not None
                    else None,
                )
                for (now, held, nacked, nack_id), nodes in lds_behind.items()
            ),
            absent=tuple(n for n in expected if n not in remote and n not in envoys),
        )

    def _programmed(
        self, key: ObjectKey, gen: int, parent: str, ctx: _ProgrammedContext
    ) -> Condition:
        """Programmed on the nodes connected here and on those connected to the peers (their
        verdicts, for the same generation of the object): a rejection anywhere, else any wait,
        else True."""
        here = self._programmed_here(key, gen, parent, ctx)
        if not (ctx.peers or ctx.moving_from) or here.reason in (
            "Rejected",
            "NoNodes",
            "NothingToProgram",
        ):
            return here
        origin = f"{key.kind}/{key.namespace}/{key.name}"
        uid = self._uid(key)
        waits = [here.message] if here.reason == "Pending" else []
        reports = list(ctx.peers)
        content = (
            self._content_digest(origin, ctx.by_origin)
            if ctx.moving_from or any(r.draining for r in ctx.peers)
            else ""
        )
        own = ctx.on_node_listeners.get(origin, ())
        for report, nodes in ctx.moving_from:
            # the last verdicts of the peer they left, if those were for the content now
            entry = report.objects.get(origin)
            same = (
                entry is not None
                and entry[3] != ""
                and entry[3] == content
                and entry[1] == gen
                and not (entry[0] and uid and entry[0] != uid)
            )
            # (a part on a node's own Listener is not in the digest: it waits)
            stuck = [n for n in nodes if n in own] if same else list(nodes)
            if stuck:
                waits.append(_moving_wait(stuck, report.peer))
            if len(stuck) < len(nodes) and all(r is not report for r in reports):
                reports.append(report)
        for report in reports:
            entry = report.objects.get(origin)
            if report.draining and entry is not None and entry[3] != content:
                # its store stopped following the cluster: its nodes get this once they
                # have moved to another replica
                waits.append(
                    f"waiting for the node Envoys of replica {report.peer}, which is shutting "
                    "down, to connect to another replica"
                )
                continue
            verdict = entry[2].get(parent) if entry is not None else None
            other = entry is not None and entry[0] and uid and entry[0] != uid
            if verdict is None or entry is None or entry[1] != gen or other:
                # it has not built this generation (or this object, re-created) yet
                waits.append(f"waiting for replica {report.peer} to build generation {gen}")
                continue
            status, reason, message = verdict
            if reason == "Rejected":
                return Condition("Programmed", "False", "Rejected", message, gen, parent)
            if status != "True":
                waits.append(f"{message} (replica {report.peer})")
        if waits:
            return Condition("Programmed", "False", "Pending", "; ".join(waits), gen, parent)
        return here

    def settling(self) -> bool:
        """Whether the node Envoys may still be reconnecting to this control plane, which just
        started: for `settle_seconds` after `start` at most, until an Envoy is connected (here,
        or to a peer) for every Ready Node, and for one at least, and those here have asked for
        every type and answered what was sent to them. Meanwhile `Programmed` says what this
        replica sees (nodes it has not heard of yet hold nothing), and the status writer does
        not put that over the last leader's True (or Rejected): the Envoys kept their config.
        Once settled, never again: a node that goes later is a node gone.

        Cheap, and changes nothing: the pipeline decides that it settled when it makes the
        conditions (`_check_settled`), from what it made them of. Decided when asked, it said
        settled as soon as the last Envoy type was asked for, while the conditions the writer
        was about to write were still those made before (the route Pending)."""
        if self._settled or self._settle_until is None:
            return False
        return time.monotonic() < self._settle_until

    def _check_settled(self) -> None:
        """Called right after the conditions were made: settled if they were made with every
        node's Envoy back (see `settling`), or `settle_seconds` are over."""
        if self._settled or self._settle_until is None:
            return
        if self.settling():
            remote, _ = self._remote_nodes()
            here = self._envoys_here()
            connected = here | remote.keys()
            if not connected or self._ready_nodes() - connected or not self._restated(here):
                return
        self._settled = True
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._settle_timer = None
        if self._loop is not None:
            self._loop.call_soon(self._after_settling)

    def _after_settling(self) -> None:
        """Settled: the status writer looks again at what it held back (see `settling`)."""
        for key, conditions in list(self._conditions.items()):
            if key.kind in _STATUS_KINDS:
                self._emit(key, conditions)

    def _restated(self, nodes: set[str]) -> bool:
        """Whether the Envoys of `nodes` have each asked for every type (CDS, EDS, LDS, RDS)
        on their streams here, saying what they hold, and answered what was sent to them since:
        an Envoy that reconnects asks for RDS after the others, and holds nothing of it as far
        as Programmed knows until then; one that held an older version (a change while the
        control plane was down, a route it rejected) is Pending until it answers the current
        one, Programmed or Rejected."""
        assert self.status is not None or not nodes
        for node_id in nodes:
            node = self.status.node(node_id) if self.status is not None else None
            for t in _ENVOY_TYPES:
                ts = node.types.get(t) if node is not None else None
                if ts is None or ts.stream is None or ts.awaiting:
                    return False
        return True

    def _uid(self, key: ObjectKey) -> str:
        obj = self._view.get(key)
        return str(obj["metadata"].get("uid") or "") if obj is not None else ""

    def drain(self, cut_in: float | None = None) -> None:
        """This replica is shutting down: its `/programmed` says so from now on, and the node
        Envoys that leave it count, at the other replicas, with its last verdicts while they
        reconnect (see `Peers.departed`), but those that close their stream before the drain
        cuts them (`cut_in` seconds from now, once known), or closed it within the last
        minute before it drained: they stopped, or restarted, and hold nothing (`left` in its
        `/programmed`)."""
        self.draining = True
        if cut_in is not None:
            self._cut_at = time.monotonic() + cut_in
        self._peer_report = None

    def _note_envoy(self, event: AckEvent) -> None:
        """Which node Envoys went on their own (see `drain`): also before this replica
        drains, since the other replicas may hear of its draining before they hear that an
        Envoy left it a moment earlier, or while they could not reach it."""
        now = time.monotonic()
        if event.kind == "closed" and (self._cut_at is None or now < self._cut_at):
            # (that node only: thousands of Envoys may leave at once)
            node = self.status.node(event.node_id) if self.status is not None else None
            if node is None or not _envoy_connected(node):
                self._left[event.node_id] = now
                if now - self._left_pruned > 1.0:  # (not per close: thousands may go at once)
                    self._left_pruned = now
                    self._left = {n: t for n, t in self._left.items() if now - t < _LEFT_KEPT}
        elif event.kind == "resumed" and event.type_url in _ENVOY_TYPES:
            self._left.pop(event.node_id, None)  # back: if it goes again, that may be the cut

    def programmed_report(self) -> tuple[str, bytes]:
        """(ETag, JSON body) of this replica's verdicts for the node Envoys connected to it
        alone, for its peers (`GET /programmed`, see `nodemesh.controlplane.peers`)."""
        cached = self._peer_report
        if cached is not None and cached[0] == self._conditions_made:
            return cached[1], cached[2]
        objects: dict[str, Any] = {}
        nodes = sorted(self._envoys_here())
        if self._result is not None and self.snapshot is not None:
            ctx = self._programmed_context(local_only=True)
            for key, built in self._result.conditions.items():
                if key.kind not in _STATUS_KINDS:
                    continue
                gen = self._generation(key)
                verdicts = {}
                for c in built:
                    if c.type == "Accepted" and c.status == "True":
                        p = self._programmed_here(key, gen, c.parent, ctx)
                        verdicts[c.parent] = [p.status, p.reason, p.message]
                origin = f"{key.kind}/{key.namespace}/{key.name}"
                objects[origin] = {
                    "uid": self._uid(key),
                    "generation": gen,
                    "parents": verdicts,
                    "content": self._content_digest(origin, ctx.by_origin),
                }
        now = time.monotonic()
        left = sorted(n for n, t in self._left.items() if now - t < _LEFT_KEPT)
        report = {"nodes": nodes, "objects": objects, "draining": self.draining, "left": left}
        body = json.dumps(report, sort_keys=True).encode()
        etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
        self._peer_report = (self._conditions_made, etag, body)
        return etag, body

    def _programmed_here(
        self, key: ObjectKey, gen: int, parent: str, ctx: _ProgrammedContext
    ) -> Condition:
        snapshot = self.snapshot
        assert snapshot is not None
        origin = f"{key.kind}/{key.namespace}/{key.name}"
        wanted = []
        for t, name in ctx.by_origin.get(origin, ()):
            r = snapshot.resources(t).get(name)
            if r is not None:
                fp = self._history.get((t, name, r.version), {}).get(origin)
                wanted.append((t, name, r.version, fp))
        if self.status is None or not ctx.expected:
            return Condition(
                "Programmed", "Unknown", "NoNodes", "no node Envoy is connected", gen, parent
            )
        if not wanted and origin not in ctx.on_node_listeners:
            # Nothing for a node to ACK: a policy whose targets did not resolve, or whose every
            # section another policy overrides. "ACKed by N node(s)" would be said of nodes
            # that never connected, and `kubectl get tp` would show it Programmed.
            return Condition(
                "Programmed",
                "False",
                "NothingToProgram",
                "no node Envoy's configuration holds any of it (see ResolvedRefs and Accepted)",
                gen,
                parent,
            )
        waits = 0
        shown: list[tuple[str, str, str]] = []  # the first three waits: (node, type, name)
        for node_id, node, whole in ctx.partial:
            for t, name, version, fp in wanted:
                if t in whole:
                    continue
                ts = node.types.get(t)
                acked = ts.acked_resources.get(name) if ts is not None else None
                # an older version counts if it held the same part of this object (a route
                # whose rule did not change while another did); unknown parts never match
                if self._holds_part(t, name, acked, version, fp, origin):
                    continue
                # rejected only if the rejected version held the current part: a fix the
                # node has not answered yet is in flight, not rejected
                nack = ts.last_nack if ts is not None else None
                nacked = nack.resource_versions.get(name) if nack is not None else None
                if nack is not None and self._holds_part(t, name, nacked, version, fp, origin):
                    message = (
                        f"node {node_id} rejected {types.short_name(t)} {name!r}: {nack.message}"
                    )
                    return Condition("Programmed", "False", "Rejected", message, gen, parent)
                waits += 1
                if len(shown) < 3:
                    shown.append((node_id, t, name))
        if ctx.unseen and wanted:
            waits += len(wanted) * len(ctx.unseen)
            for node_id in ctx.unseen[: 3 - len(shown)]:
                shown += [(node_id, t, name) for t, name, _, _ in wanted[: 3 - len(shown)]]
        for node_id in ctx.on_node_listeners.get(origin, ()):
            if node_id in ctx.remote:
                continue  # its peer's verdicts count for it
            # the node's own Listener (its consumer chains): its current version, exactly
            assert self.translation is not None
            (own,) = self.translation.per_node[node_id][types.LISTENER]
            status = self.status.node(node_id)
            ts = status.types.get(types.LISTENER) if status is not None else None
            acked = ts.acked_resources.get(own.name) if ts is not None else None
            if acked == own.version:
                continue
            # an older version with the same parts for the consumer namespaces whose chains
            # carry this object (another namespace's pod, or a Service's destination chain,
            # changed since) will do. A policy's are those of the consumer routes it applies
            # to, not its own namespace: checked under its own, it went Pending for any pod
            # of a consumer namespace, Rejected with another namespace's NACK, or True with
            # its own chains not ACKed.
            versions = self._listener_history.get(node_id, {})
            now = versions.get(own.version, {})
            carriers = self.translation.consumer_carriers.get(origin, (key.namespace,))
            parts = {ns: now[ns] for ns in carriers if ns in now}
            if _same_parts(versions.get(acked, {}) if acked is not None else None, parts):
                continue
            nack = ts.last_nack if ts is not None else None
            nacked = nack.resource_versions.get(own.name) if nack is not None else None
            if nack is not None and (
                nacked == own.version
                or _same_parts(versions.get(nacked, {}) if nacked is not None else None, parts)
            ):
                message = f"node {node_id} rejected lds {own.name!r}: {nack.message}"
                return Condition("Programmed", "False", "Rejected", message, gen, parent)
            waits += 1
            if len(shown) < 3:
                shown.append((node_id, types.LISTENER, own.name))
        if ctx.lds_behind:
            # The outbound Listener every request goes through: its current version, or an
            # older one whose parts this object's traffic takes are the same ("" and the
            # chains of the destination routes that carry it). A node whose Listener Envoy
            # refused (a port taken on the node) routed nothing, and this said True.
            mine = {""}.union(n for t, n in ctx.by_origin.get(origin, ()) if t == types.ROUTE)
            skip = ctx.on_node_listeners.get(origin, ())  # their own Listener's, above
            for lag in ctx.lds_behind:
                nodes = [n for n in lag.nodes if n not in skip] if skip else lag.nodes
                held_differs = lag.held_differs
                if not nodes or (held_differs is not None and mine.isdisjoint(held_differs)):
                    continue
                refused = lag.nacked_differs
                if lag.nack is not None and refused is not None and mine.isdisjoint(refused):
                    message = f"node {nodes[0]} rejected lds {LISTENER_NAME!r}: {lag.nack.message}"
                    return Condition("Programmed", "False", "Rejected", message, gen, parent)
                waits += len(nodes)
                shown += [
                    (n, types.LISTENER, LISTENER_NAME) for n in nodes[: max(0, 3 - len(shown))]
                ]
        if waits:
            more = f" (+{waits - 3} more)" if waits > 3 else ""
            message = (
                "waiting for ACK from "
                + ", ".join(f"{n}: {types.short_name(t)} {name}" for n, t, name in shown)
                + more
            )
            if ctx.absent:
                # a slow ACK reads the same: say which of the nodes waited for have no Envoy
                waited = {n for n, _, _ in shown}.union(ctx.unseen if wanted else ())
                absent = [n for n in ctx.absent if n in waited]
                if absent:
                    message += f"; Envoy not connected: {', '.join(absent)}"
            return Condition("Programmed", "False", "Pending", message, gen, parent)
        message = f"ACKed by {ctx.expected} node(s)"
        if ctx.not_ready:
            shown_names = ", ".join(ctx.not_ready[:3])
            more = f" (+{len(ctx.not_ready) - 3} more)" if len(ctx.not_ready) > 3 else ""
            message += f"; not counted, Node not Ready: {shown_names}{more}"
        return Condition("Programmed", "True", "Programmed", message, gen, parent)

    def _content_digest(self, origin: str, by_origin: Mapping[str, list[tuple[str, str]]]) -> str:
        """A digest of the versions of the shared resources that carry `origin`: equal on two
        replicas that built the same content of it (versions are digests of the bytes). Each
        replica's `/programmed` says it per object: a node that left a peer counts with the
        peer's verdicts only for the content it had (see `_moving_nodes`). Coarse (a shared
        RDS carries every route): a mismatch only makes a moving node wait."""
        snapshot = self.snapshot
        assert snapshot is not None
        h = hashlib.blake2b(digest_size=8)
        for t, name in sorted(by_origin.get(origin, ())):
            r = snapshot.resources(t).get(name)
            if r is not None:
                h.update(f"{t}\0{name}\0{r.version}\n".encode())
        return h.hexdigest()

    def _holds_part(
        self, t: str, name: str, held: str | None, version: str, fp: int | None, origin: str
    ) -> bool:
        """Whether version `held` of resource `name` holds `origin`'s part as it is in the
        current `version` (fingerprint `fp`): the same version, or an older one with the same
        part. Unknown parts never match."""
        if held is None:
            return False
        return held == version or (
            fp is not None and self._history.get((t, name, held), {}).get(origin) == fp
        )

    def _update_conditions(self) -> None:
        self._conditions_made += 1
        if self._result is None:
            return
        new: dict[ObjectKey, tuple[Condition, ...]] = {}
        ctx = self._programmed_context() if self.snapshot is not None else None
        # An object whose build result, generation and resources did not change keeps its
        # conditions when nothing about the nodes changed either (a rebuild for one endpoint
        # looks at the objects that endpoint's resources carry, not at all 1,500 routes).
        touched = self._changed_origins()
        same_nodes = ctx is not None and ctx.signature == self._inputs_signature
        self._inputs_signature = ctx.signature if ctx is not None else None
        # objects written since the conditions were last made (their generation may differ)
        view = self._view
        written = (
            view.changed_since(self._inputs_revision)
            if isinstance(view, StoreView) and self._inputs_revision is not None
            else None
        )
        self._inputs_revision = view.revision if isinstance(view, StoreView) else None
        inputs: dict[ObjectKey, tuple[object, int]] = {}
        for key, built in self._result.conditions.items():
            if key.kind not in _STATUS_KINDS:
                if key.kind in _NOTICE_KINDS:
                    new[key] = built  # shown in /status and logged, never written back
                continue
            accepted_parents = [
                c.parent for c in built if c.type == "Accepted" and c.status == "True"
            ]
            made_from = self._inputs.get(key)
            if written is not None and key not in written and made_from is not None:
                gen = made_from[1]
            else:
                gen = self._generation(key)
            inputs[key] = (built, gen)
            if (
                same_nodes
                and touched is not None
                and made_from is not None
                and made_from[0] is built
                and made_from[1] == gen
                and f"{key.kind}/{key.namespace}/{key.name}" not in touched
            ):
                new[key] = self._conditions[key]
                continue
            out = list(built)
            for parent in accepted_parents:
                assert ctx is not None  # a result is only kept with its snapshot
                out.append(self._programmed(key, gen, parent, ctx))
            new[key] = tuple(out)
        self._inputs = inputs
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        changed = [k for k in new if new[k] != self._conditions.get(k)]
        gone = [k for k in self._conditions if k not in new]
        # An object deleted and created again under its name within one build is a new
        # object: its conditions start their times now (it showed the old one's, from before
        # it existed), and are written to it even if they are equal.
        uids = self._transition_uids
        for key in written if written is not None else new.keys():
            if key not in new:
                continue
            uid = self._uid(key)
            if uids.get(key, uid) != uid:
                self._transitions.pop(key, None)
                if new[key] == self._conditions.get(key):
                    changed.append(key)
            uids[key] = uid
        for key in gone:
            uids.pop(key, None)
        for key in changed:
            # a condition that went (ResolvedRefs while the route is not Accepted) starts a
            # new time when it comes back, not its old one: only the current ones are kept
            before = self._transitions.get(key, {})
            times: dict[tuple[str, str], tuple[str, str]] = {}
            for c in new[key]:
                prev = before.get((c.parent, c.type))
                if prev is None or prev[0] != c.status:
                    prev = (c.status, now)
                times[(c.parent, c.type)] = prev
            self._transitions[key] = times
        for key in gone:
            self._transitions.pop(key, None)
        previous, self._conditions = self._conditions, new
        refusals = 0
        for key in changed:
            if key.kind in _NOTICE_KINDS:
                for c in new[key]:
                    log.warning("%s %s/%s: %s", key.kind, key.namespace, key.name, c.message)
            else:
                # A route or policy refused, or with a reference that does not resolve: said
                # in the log too, once per new verdict (it was in /status only); the first
                # _REFUSALS_LOGGED of a build (a restart finds them all new)
                old = set(previous.get(key, ()))
                for c in new[key]:
                    if c.type not in _REFUSALS or c.status != "False" or c in old:
                        continue
                    refusals += 1
                    if refusals <= _REFUSALS_LOGGED:
                        where = f" ({c.parent})" if c.parent else ""
                        log.warning(
                            "%s %s/%s%s: %s=False %s: %s",
                            key.kind,
                            key.namespace,
                            key.name,
                            where,
                            c.type,
                            c.reason,
                            c.message,
                        )
            self._emit(key, new[key])
        if refusals > _REFUSALS_LOGGED:
            log.warning(
                "%d more conditions Accepted or ResolvedRefs False on routes and policies: "
                "see /status",
                refusals - _REFUSALS_LOGGED,
            )
        for key in gone:
            self._emit(key, ())
        self._check_settled()  # (once settled, the objects are reported again)

    def _emit(self, key: ObjectKey, conditions: tuple[Condition, ...]) -> None:
        for callback in list(self._subscribers):
            try:
                callback(key, conditions)
            except Exception:
                log.exception("conditions subscriber failed for %s", key)
