"""The snapshot cache: versions, watches answered once, ordering, subscriptions, deltas."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2

from nodemesh.xds import types
from nodemesh.xds.cache import (
    DeltaWatchRequest,
    DeltaWatchResponse,
    Resource,
    Snapshot,
    SnapshotCache,
    WatchRequest,
    WatchResponse,
)
from tests.xds import resources as R


def full(port: int = 8080, extra_cluster: str | None = None) -> Snapshot:
    msgs = [
        R.eds_cluster("a"),
        R.endpoints("a", port),
        R.http_listener("web", 15001, "routes"),
        R.routes("routes", ("/", "a")),
    ]
    if extra_cluster:
        msgs += [R.eds_cluster(extra_cluster), R.endpoints(extra_cluster, port + 1)]
    return Snapshot.from_messages(msgs)


def test_equal_content_gives_equal_versions_in_any_build() -> None:
    assert full().version(types.CLUSTER) == full().version(types.CLUSTER)
    assert full(8080).version(types.ENDPOINT) != full(8081).version(types.ENDPOINT)
    assert full(8080).version(types.CLUSTER) == full(8081).version(types.CLUSTER)


def test_resource_version_is_a_hash_of_its_bytes() -> None:
    r1 = Resource.from_message(R.endpoints("a", 1))
    r2 = Resource.from_message(R.endpoints("a", 1))
    r3 = Resource.from_message(R.endpoints("a", 2))
    assert r1.version == r2.version != r3.version
    assert r1.name == "a" and r1.type_url == types.ENDPOINT


def test_consistent_reports_missing_endpoints_and_routes() -> None:
    broken = Snapshot.from_messages(
        [R.eds_cluster("a"), R.http_listener("web", 15001, "missing-routes")]
    )
    assert broken.consistent() == [
        "cluster 'a' needs endpoints 'a'",
        "a listener needs route configuration 'missing-routes'",
    ]
    assert full().consistent() == []


def test_consistent_follows_updates_that_add_remove_or_change_names() -> None:
    """The answer is reused while the referred names stay the same, and recomputed when a
    name comes or goes (a removed ClusterLoadAssignment or RouteConfiguration is caught)."""
    base = full(extra_cluster="b")
    assert base.consistent() == []
    changed = base.updated({types.ENDPOINT: ([Resource.from_message(R.endpoints("a", 9))], [])})
    assert changed.version(types.ENDPOINT) != base.version(types.ENDPOINT)
    assert changed.consistent() == []
    gone = changed.updated({types.ENDPOINT: ([], ["b"])})
    assert gone.consistent() == ["cluster 'b' needs endpoints 'b'"]
    back = gone.updated({types.ENDPOINT: ([Resource.from_message(R.endpoints("b", 1))], [])})
    assert back.consistent() == []
    no_routes = back.updated({types.ROUTE: ([], ["routes"])})
    assert no_routes.consistent() == ["a listener needs route configuration 'routes'"]
    new_cluster = back.updated({types.CLUSTER: ([Resource.from_message(R.eds_cluster("c"))], [])})
    assert new_cluster.consistent() == ["cluster 'c' needs endpoints 'c'"]


def test_duplicate_names_are_refused() -> None:
    try:
        Snapshot.from_messages([cluster_pb2.Cluster(name="a"), cluster_pb2.Cluster(name="a")])
    except ValueError as exc:
        assert "duplicate cds resource 'a'" in str(exc)
    else:
        raise AssertionError("a duplicate cluster name was accepted")


def test_a_watch_is_answered_once() -> None:
    cache = SnapshotCache()
    got: list[WatchResponse] = []
    cache.set_snapshot("n", full())
    cache.create_watch(WatchRequest("n", types.CLUSTER, "", None), got.append)
    cache.set_snapshot("n", full(extra_cluster="b"))
    assert len(got) == 1
    assert [r.name for r in got[0].resources] == ["a"]
    assert cache.watch_count() == 0


def test_a_watch_waits_while_the_client_holds_the_current_version() -> None:
    cache = SnapshotCache()
    got: list[WatchResponse] = []
    s1 = full()
    cache.set_snapshot("n", s1)
    known = s1.version(types.CLUSTER) or ""
    cache.create_watch(WatchRequest("n", types.CLUSTER, known, None), got.append)
    cache.set_snapshot("n", full(port=9999))  # clusters unchanged: still nothing to say
    assert got == [] and cache.watch_count("n") == 1
    cache.set_snapshot("n", full(extra_cluster="b"))
    assert [r.name for r in got[0].resources] == ["a", "b"]


def test_one_change_answers_watches_in_envoys_order() -> None:
    cache = SnapshotCache()
    order: list[str] = []
    for t in (types.ROUTE, types.LISTENER, types.ENDPOINT, types.CLUSTER):
        cache.create_watch(
            WatchRequest("n", t, "", None), lambda r: order.append(types.short_name(r.type_url))
        )
    cache.set_snapshot("n", full())
    assert order == ["cds", "eds", "lds", "rds"]


def test_named_subscription_gets_only_its_names_and_a_grown_set_is_answered() -> None:
    cache = SnapshotCache()
    s = full(extra_cluster="b")
    cache.set_snapshot("n", s)
    got: list[WatchResponse] = []
    cache.create_watch(WatchRequest("n", types.ENDPOINT, "", frozenset({"b", "zz"})), got.append)
    assert [r.name for r in got[0].resources] == ["b"]
    version = s.version(types.ENDPOINT) or ""
    cache.create_watch(
        WatchRequest("n", types.ENDPOINT, version, frozenset({"a", "b"}), names_changed=True),
        got.append,
    )
    assert [r.name for r in got[1].resources] == ["a", "b"]


def test_cancel_removes_an_open_watch() -> None:
    cache = SnapshotCache()
    got: list[WatchResponse] = []
    cancel = cache.create_watch(WatchRequest("n", types.CLUSTER, "", None), got.append)
    cancel()
    cache.set_snapshot("n", full())
    assert got == [] and cache.watch_count() == 0


def test_fallback_snapshot_serves_nodes_without_their_own() -> None:
    cache = SnapshotCache()
    got: list[WatchResponse] = []
    cache.create_watch(WatchRequest("unknown", types.CLUSTER, "", None), got.append)
    cache.set_fallback_snapshot(full())
    assert [r.name for r in got[0].resources] == ["a"]


def test_the_same_resource_object_serves_every_node() -> None:
    shared = Resource.from_message(R.eds_cluster("a"))
    s1 = Snapshot({types.CLUSTER: [shared]})
    s2 = Snapshot({types.CLUSTER: [shared]})
    cache = SnapshotCache()
    cache.set_snapshot("n1", s1)
    cache.set_snapshot("n2", s2)
    got: list[WatchResponse] = []
    cache.create_watch(WatchRequest("n1", types.CLUSTER, "", None), got.append)
    cache.create_watch(WatchRequest("n2", types.CLUSTER, "", None), got.append)
    assert got[0].resources[0] is got[1].resources[0] is shared
    assert got[0].resources[0].sotw_entry is shared.sotw_entry  # bytes reused, not re-encoded


def delta(
    node: str = "n",
    *,
    client: dict[str, str] | None = None,
    wildcard: bool = True,
    names: frozenset[str] = frozenset(),
    hold: str | None = None,
    answer_empty: bool = False,
) -> DeltaWatchRequest:
    return DeltaWatchRequest(
        node, types.ENDPOINT, wildcard, names, client or {}, hold, answer_empty
    )


def test_delta_sends_only_changed_and_removed_resources() -> None:
    cache = SnapshotCache()
    s1 = full(extra_cluster="b")
    cache.set_snapshot("n", s1)
    held = {n: r.version for n, r in s1.resources(types.ENDPOINT).items()}
    got: list[DeltaWatchResponse] = []
    cache.create_delta_watch(delta(client=held), got.append)
    assert got == []  # the client already holds everything
    cache.set_snapshot("n", full(port=7000))  # a changes, b disappears
    assert [r.name for r in got[0].updated] == ["a"]
    assert got[0].removed == ("b",)


def test_delta_named_subscription_ignores_other_resources() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n", full(extra_cluster="b"))
    got: list[DeltaWatchResponse] = []
    cache.create_delta_watch(delta(wildcard=False, names=frozenset({"b"})), got.append)
    assert [r.name for r in got[0].updated] == ["b"]


def test_delta_hold_blocks_the_rejected_version_until_a_new_one() -> None:
    cache = SnapshotCache()
    s1 = full()
    cache.set_snapshot("n", s1)
    got: list[DeltaWatchResponse] = []
    cache.create_delta_watch(delta(hold=s1.version(types.ENDPOINT)), got.append)
    assert got == []
    cache.set_snapshot("n", full(port=1234))
    assert [r.name for r in got[0].updated] == ["a"]


def test_delta_answers_an_empty_type_when_asked() -> None:
    cache = SnapshotCache()
    cache.set_snapshot("n", Snapshot({types.ENDPOINT: []}))
    got: list[DeltaWatchResponse] = []
    cache.create_delta_watch(delta(), got.append)
    assert got == []
    cache.create_delta_watch(delta(answer_empty=True), got.append)
    assert got[0].updated == () and got[0].removed == ()


def test_a_watch_reopened_while_answering_another_stays_open() -> None:
    """A stream may replace a node's other parked watch from inside an answer (the delta
    stream does, to resend endpoints after changed clusters). When that was the node's last
    watch, the new one must still be parked afterwards, and answered on the next change."""
    cache = SnapshotCache()
    s1 = full()
    cache.set_snapshot("n", s1)
    held = {n: r.version for n, r in s1.resources(types.ENDPOINT).items()}
    got: list[DeltaWatchResponse] = []
    cancel_eds = [cache.create_delta_watch(delta(client=held), got.append)]

    def reopen_eds(_: WatchResponse) -> None:
        cancel_eds[0]()
        cancel_eds[0] = cache.create_delta_watch(delta(client=held), got.append)

    cache.create_watch(
        WatchRequest("n", types.CLUSTER, s1.version(types.CLUSTER) or "", None), reopen_eds
    )
    cache.set_snapshot("n", full(extra_cluster="b").updated({types.ENDPOINT: ([], ["b"])}))
    assert got == [] and cache.watch_count("n") == 1
    cache.set_snapshot("n", full(port=9))
    assert [r.name for r in got[0].updated] == ["a"]


def test_current_version_is_that_of_the_snapshot_a_nodes_watches_are_answered_from() -> None:
    """The server orders a node's responses by it: a node with a snapshot of its own (its own
    Listener) by that one, any other by the fallback."""
    cache = SnapshotCache()
    assert cache.current_version("n", types.CLUSTER) is None
    shared, own = full(), full(extra_cluster="b")
    cache.set_fallback_snapshot(shared)
    cache.set_snapshot("n", own)
    assert cache.current_version("n", types.CLUSTER) == own.version(types.CLUSTER)
    assert cache.current_version("m", types.CLUSTER) == shared.version(types.CLUSTER)
    assert cache.current_version("m", types.SECRET) is None  # a type no snapshot serves
    cache.clear_snapshot("n")
    assert cache.current_version("n", types.CLUSTER) == shared.version(types.CLUSTER)
