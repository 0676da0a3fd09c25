"""Delta answers that follow the changes (a watch's `basis`) equal the full comparison.

A real `DeltaStream` is driven with random requests (ACKs, NACKs in any order, stale nonces,
subscribe and unsubscribe, wildcard on and off, reconnects with any initial versions) while its
node's snapshot goes through random updates, rebuilds and returns to older snapshots. Every
answer the cache gives is compared with the answer of the full comparison (the same request
without a basis), every parked watch must be one the full comparison would park too, no
watch's client_versions may change while it is open (the stream may pass a live view), and
no more than two responses of a type are ever unanswered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nodemesh.xds import types
from nodemesh.xds.cache import (
    Cancel,
    DeltaWatchRequest,
    DeltaWatchResponse,
    Resource,
    Snapshot,
    SnapshotCache,
    TypeSet,
    WatchRequest,
    WatchResponse,
    _cache,
)
from nodemesh.xds.cache._snapshot import LINEAGE
from nodemesh.xds.server import StatusTracker
from nodemesh.xds.server._streams import DeltaStream
from tests.xds import resources as R

NODE = "n"
NAMES = tuple("abcdefghijkl")
VARIANTS = 3
TYPES = (types.CLUSTER, types.ENDPOINT)
# Per type, name and variant: a resource. Three versions of each name, so that a name can
# change, and change back.
MADE: dict[str, dict[str, list[Resource]]] = {
    types.CLUSTER: {
        n: [Resource.from_message(R.eds_cluster(n, 1 + v)) for v in range(VARIANTS)] for n in NAMES
    },
    types.ENDPOINT: {
        n: [Resource.from_message(R.endpoints(n, 1000 + v)) for v in range(VARIANTS)] for n in NAMES
    },
}
VERSIONS = sorted({r.version for t in MADE.values() for rs in t.values() for r in rs} | {"x"})


def full_answer(snapshot: Snapshot, req: DeltaWatchRequest) -> DeltaWatchResponse | None:
    return _cache._delta_answer(snapshot, dataclasses.replace(req, basis=None, dirty=frozenset()))


class Checking:
    """A `ConfigWatcher` in front of the cache that checks every delta answer, and every watch
    it parks, against the full comparison; it keeps the open watches for `check_parked`."""

    def __init__(self, cache: SnapshotCache) -> None:
        self.cache = cache
        self.open: dict[int, DeltaWatchRequest] = {}
        # what each open watch's client_versions held when it was made: a stream may hand over
        # a live view, which must not change while the watch is open
        self.held: dict[int, dict[str, str]] = {}
        self._ids = 0
        # to tell (in hypothesis' statistics) how many answers followed the changes
        self.followed = False
        self._compare_some = real = _cache._compare_some

        def compare_some(*args: Any) -> Any:
            self.followed = True
            return real(*args)

        _cache._compare_some = compare_some

    def restore(self) -> None:
        _cache._compare_some = self._compare_some

    def create_watch(
        self, request: WatchRequest, respond: Callable[[WatchResponse], None]
    ) -> Cancel:
        return self.cache.create_watch(request, respond)

    def current_version(self, node_id: str, type_url: str) -> str | None:
        return self.cache.current_version(node_id, type_url)

    def create_delta_watch(
        self, request: DeltaWatchRequest, respond: Callable[[DeltaWatchResponse], None]
    ) -> Cancel:
        self._ids += 1
        key = self._ids
        self.open[key] = request
        self.held[key] = dict(request.client_versions)

        def checked(resp: DeltaWatchResponse) -> None:
            del self.open[key]
            assert dict(request.client_versions) == self.held.pop(key)
            snapshot = self.cache.get_snapshot(request.node_id)
            assert snapshot is not None
            self._event("answered")
            assert resp == full_answer(snapshot, request)
            respond(resp)

        self.followed = False
        cancel = self.cache.create_delta_watch(request, checked)
        if key in self.open:
            self._event("parked")
            self.check_parked()

        def cancelled() -> None:
            self.open.pop(key, None)
            self.held.pop(key, None)
            cancel()

        return cancelled

    def _event(self, what: str) -> None:
        if currently_in_test_context():
            event(f"{what}: " + ("changes followed" if self.followed else "full comparison"))
        self.followed = False

    def check_parked(self) -> None:
        for key, request in self.open.items():
            assert dict(request.client_versions) == self.held[key]
            snapshot = self.cache.get_snapshot(request.node_id)
            if snapshot is not None:
                assert full_answer(snapshot, request) is None, request


class DeltaAnswers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.cache = SnapshotCache()
        self.watcher = Checking(self.cache)
        self.snapshot = Snapshot({t: [MADE[t][n][0] for n in NAMES[:8]] for t in TYPES})
        self.history = [self.snapshot]
        self.cache.set_snapshot(NODE, self.snapshot)
        self._new_stream()

    def teardown(self) -> None:
        self.watcher.restore()

    def _new_stream(self, carry: dict[str, dict[str, str]] | None = None) -> None:
        self.stream = DeltaStream(self.watcher, StatusTracker())
        self.carry = carry or {}  # initial_resource_versions for the first request of a type
        self.unanswered: dict[str, list[str]] = {t: [] for t in TYPES}
        self.answered: list[tuple[str, str]] = []

    def _drain(self) -> None:
        while not self.stream.queue.empty():
            data = self.stream.queue.get_nowait()
            assert data is not None
            resp = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
            self.unanswered[resp.type_url].append(resp.nonce)

    def _set(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.history.append(snapshot)
        self.cache.set_snapshot(NODE, snapshot)
        self._drain()

    @rule(
        kind=st.sampled_from(["update"] * 6 + ["rebuild", "go back"]),
        type_url=st.sampled_from(TYPES),
        upserts=st.dictionaries(st.sampled_from(NAMES), st.integers(0, VARIANTS - 1), max_size=3),
        removed=st.lists(st.sampled_from(NAMES), max_size=2),
        back=st.integers(0, 10),
    )
    def change(
        self, kind: str, type_url: str, upserts: dict[str, int], removed: list[str], back: int
    ) -> None:
        if kind == "rebuild":  # equal content in new TypeSets, with no lineage to the old ones
            self._set(Snapshot({t: self.snapshot.resources(t).values() for t in TYPES}))
        elif kind == "go back":  # an older snapshot again; later updates branch from it
            self._set(self.history[max(0, len(self.history) - 1 - back)])
        else:
            made = [MADE[type_url][n][v] for n, v in upserts.items()]
            self._set(self.snapshot.updated({type_url: (made, removed)}))

    @rule(
        type_url=st.sampled_from(TYPES),
        reply=st.sampled_from(
            ["ack"] * 4 + ["nack"] * 2 + ["none"] * 3 + ["stale", "reconnect", "resume"]
        ),
        which=st.sampled_from([0, 0, 1, 2]),
        subscribe=st.lists(st.sampled_from((*NAMES, "*")), max_size=3),
        unsubscribe=st.lists(st.sampled_from((*NAMES, "*")), max_size=2),
        initial=st.dictionaries(st.sampled_from(NAMES), st.sampled_from(VERSIONS), max_size=4),
    )
    def request(
        self,
        type_url: str,
        reply: str,
        which: int,
        subscribe: list[str],
        unsubscribe: list[str],
        initial: dict[str, str],
    ) -> None:
        if reply in ("reconnect", "resume"):
            # a new stream; on "resume" its first requests state what the client ACKed on the
            # old one, else whatever `initial` is
            self.stream.close()
            held = {t: dict(s.client) for t, s in self.stream.types.items()}
            self._new_stream(held if reply == "resume" else None)
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=subscribe,
            resource_names_unsubscribe=unsubscribe,
        )
        req.node.id = NODE
        if type_url not in self.stream.types:
            req.initial_resource_versions.update(self.carry.get(type_url, initial))
        waiting = self.unanswered[type_url]
        if reply in ("ack", "nack") and waiting:
            # the oldest response, as Envoy does, or (which > 0) a later one first
            nonce = waiting.pop(min(which, len(waiting) - 1))
            req.response_nonce = nonce
            self.answered.append((type_url, nonce))
            if reply == "nack":
                req.error_detail.code = 3
                req.error_detail.message = "rejected"
        elif reply == "stale" and self.answered:
            req.type_url, req.response_nonce = self.answered[-1 - which % len(self.answered)]
        self.stream.handle(req)
        self._drain()

    @invariant()
    def parked_watches_would_wait_anyway(self) -> None:
        self.watcher.check_parked()

    @invariant()
    def at_most_two_responses_of_a_type_are_unanswered(self) -> None:
        for type_url in TYPES:
            assert len(self.unanswered[type_url]) <= 2


TestDeltaAnswers = DeltaAnswers.TestCase
TestDeltaAnswers.settings = settings(
    max_examples=300,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def chain_of_updates(
    steps: list[tuple[int, dict[str, int], list[str]]],
) -> list[TypeSet]:
    """TypeSets made by `updated()`, each from one of the earlier ones (so they branch)."""
    sets = [TypeSet(MADE[types.ENDPOINT][n][0] for n in NAMES[:4])]
    for back, upserts, removed in steps:
        parent = sets[max(0, len(sets) - 1 - back)]
        made = [MADE[types.ENDPOINT][n][v] for n, v in upserts.items()]
        sets.append(parent.updated(made, removed))
    return sets


def differ(a: TypeSet, b: TypeSet) -> set[str]:
    return {n for n in {*a.items, *b.items} if a.items.get(n) is not b.items.get(n)}


update_steps = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 0, 1, 3]),
        st.dictionaries(st.sampled_from(NAMES), st.integers(0, VARIANTS - 1), max_size=3),
        st.lists(st.sampled_from(NAMES), max_size=2),
    ),
    max_size=3 * LINEAGE,
)


@settings(max_examples=300, deadline=None)
@given(update_steps)
def test_changed_since_names_every_difference_or_nothing(
    steps: list[tuple[int, dict[str, int], list[str]]],
) -> None:
    sets = chain_of_updates(steps)
    for old in sets:
        for new in sets:
            changed = new.changed_since(old.token, len(NAMES))
            if changed is not None:
                assert changed >= differ(old, new)
    assert sets[-1].changed_since(sets[-1].token, 0) == set()


@settings(max_examples=300, deadline=None)
@given(update_steps)
def test_an_updated_set_has_the_version_and_order_of_one_made_whole(
    steps: list[tuple[int, dict[str, int], list[str]]],
) -> None:
    """`updated()` hashes again only the buckets it touched: every set of a branching chain
    must still carry the version (and sorted names) of a set made from its resources at once,
    and its parents must keep theirs."""
    sets = chain_of_updates(steps)
    versions = [s.version for s in sets]
    for ts in sets:
        whole = TypeSet(ts.items.values())
        assert ts.version == whole.version
        assert ts._order == whole._order
    assert [s.version for s in sets] == versions
    # equal content, equal version; different content, different version
    by_content: dict[frozenset[tuple[str, str]], str] = {}
    for ts in sets:
        content = frozenset((n, r.version) for n, r in ts.items.items())
        assert by_content.setdefault(content, ts.version) == ts.version
    assert len(set(by_content.values())) == len(by_content)


def test_changed_since_follows_a_straight_chain_for_lineage_steps_and_no_further() -> None:
    sets = chain_of_updates([(0, {NAMES[i % 8]: i % VARIANTS}, []) for i in range(4 * LINEAGE)])
    last = sets[-1]
    assert last.changed_since(sets[-1 - LINEAGE].token, len(NAMES)) is not None
    assert last.changed_since(sets[-2 - LINEAGE].token, len(NAMES)) is None
    assert last.changed_since(sets[-2].token, 0) is None  # one name changed: over the limit
    assert last.changed_since(sets[-2].token, 1) == {NAMES[(4 * LINEAGE - 1) % 8]}


def test_an_acked_delta_stream_is_answered_without_comparing_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    many = [Resource.from_message(R.endpoints(f"e{i}", 1000)) for i in range(100)]
    snapshot = Snapshot({types.ENDPOINT: many})
    cache = SnapshotCache()
    cache.set_snapshot(NODE, snapshot)
    stream = DeltaStream(cache, StatusTracker())
    first = discovery_pb2.DeltaDiscoveryRequest(
        type_url=types.ENDPOINT, resource_names_subscribe=[r.name for r in many]
    )
    first.node.id = NODE
    stream.handle(first)
    sent = discovery_pb2.DeltaDiscoveryResponse.FromString(stream.queue.get_nowait() or b"")
    assert len(sent.resources) == 100

    def compare_all(*_: object) -> None:
        raise AssertionError("compared every resource")

    monkeypatch.setattr(_cache, "_compare_all", compare_all)
    stream.handle(
        discovery_pb2.DeltaDiscoveryRequest(type_url=types.ENDPOINT, response_nonce=sent.nonce)
    )
    changed = Resource.from_message(R.endpoints("e7", 2000))
    cache.set_snapshot(NODE, snapshot.updated({types.ENDPOINT: ([changed], ["e9"])}))
    second = discovery_pb2.DeltaDiscoveryResponse.FromString(stream.queue.get_nowait() or b"")
    assert [r.name for r in second.resources] == ["e7"]
    assert list(second.removed_resources) == ["e9"]
