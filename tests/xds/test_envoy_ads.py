"""A real Envoy 1.40 against the ADS server, in delta and state-of-the-world modes."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import Any

from aiohttp import web
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf.message import Message

from nodemesh.envoy import EnvoyProcess
from nodemesh.xds import types
from nodemesh.xds.cache import Snapshot
from tests.support import Backend, eventually, fetch, free_port, http_get
from tests.xds import resources as R
from tests.xds.conftest import ControlPlane

ALL = (types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE)


def snap(*messages: Message) -> Snapshot:
    return Snapshot.from_messages(messages)


def base(listen: int, a_port: int, route: route_pb2.RouteConfiguration | None = None) -> list[Any]:
    return [
        R.eds_cluster("a"),
        R.endpoints("a", a_port),
        R.http_listener("web", listen, "web-routes"),
        route if route is not None else R.routes("web-routes", ("/a", "a")),
    ]


def dump_versions(envoy: EnvoyProcess) -> dict[str, dict[str, str]]:
    """Per type, resource name -> version_info as Envoy reports it in /config_dump."""
    out: dict[str, dict[str, str]] = {"cds": {}, "eds": {}, "lds": {}, "rds": {}}
    for c in envoy.config_dump()["configs"]:
        kind = c["@type"].rsplit(".", 1)[-1]
        if kind == "ClustersConfigDump":
            for x in c.get("dynamic_active_clusters", []):
                out["cds"][x["cluster"]["name"]] = x["version_info"]
        elif kind == "EndpointsConfigDump":
            for x in c.get("dynamic_endpoint_configs", []):
                # Envoy keeps no version for EDS in its dump: compare the names only.
                out["eds"][x["endpoint_config"]["cluster_name"]] = ""
        elif kind == "ListenersConfigDump":
            for x in c.get("dynamic_listeners", []):
                if "active_state" in x:
                    out["lds"][x["name"]] = x["active_state"]["version_info"]
        elif kind == "RoutesConfigDump":
            for x in c.get("dynamic_route_configs", []):
                out["rds"][x["route_config"]["name"]] = x["version_info"]
    return out


def expected_versions(snapshot: Snapshot, mode: str) -> dict[str, dict[str, str]]:
    """SotW: every resource carries the type version; delta: its own content hash."""
    out = {}
    for t in ALL:
        items = snapshot.resources(t)
        out[types.short_name(t)] = {
            n: ""
            if t == types.ENDPOINT
            else (r.version if mode == "delta" else snapshot.version(t) or "")
            for n, r in items.items()
        }
    return out


def all_acked(cp: ControlPlane, node: str, snapshot: Snapshot) -> bool:
    for t in ALL:
        ts = cp.server.status.type_status(node, t)
        if ts.version_acked != snapshot.version(t):
            return False
    return True


def body_of(url: str, expect: int = 200) -> str | None:
    r = http_get(url)
    return r.body.strip() if r.status == expect else None


async def serving(control_plane: ControlPlane, start_envoy: Any, s: Snapshot, mode: str) -> Any:
    """Node "n" on snapshot `s`: its Envoy started (delta or SotW) and every type ACKed."""
    control_plane.cache.set_snapshot("n", s)
    envoy = start_envoy("n", control_plane.address, delta=mode == "delta")
    await eventually(lambda: all_acked(control_plane, "n", s))
    return envoy


async def test_envoy_acks_every_type_and_serves_requests(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    a = await backends("a")
    listen = free_port()
    s1 = snap(*base(listen, a.port))
    control_plane.cache.set_snapshot("node-1", s1)
    envoy = start_envoy("node-1", control_plane.address, delta=mode == "delta")

    await eventually(envoy.ready, what="envoy /ready")
    await eventually(lambda: all_acked(control_plane, "node-1", s1), what="ACK of every type")
    assert dump_versions(envoy) == expected_versions(s1, mode)
    await eventually(
        lambda: body_of(f"http://127.0.0.1:{listen}/a/x") == "a",
        what=f"{f'http://127.0.0.1:{listen}/a/x'} answers " + "a",
    )
    assert a.paths[-1] == "/a/x"
    node = control_plane.server.status.snapshot()["node-1"]
    assert node["connected"] is True
    assert {t: node["types"][t]["version_acked"] for t in ("cds", "eds", "lds", "rds")} == {
        types.short_name(t): s1.version(t) for t in ALL
    }


async def test_changes_take_effect_and_removed_resources_disappear(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    a, a2, b = await backends("a"), await backends("a2"), await backends("b")
    listen = free_port()
    url = f"http://127.0.0.1:{listen}"
    control_plane.cache.set_snapshot("n", snap(*base(listen, a.port)))
    envoy = start_envoy("n", control_plane.address, delta=mode == "delta")
    await eventually(lambda: body_of(url + "/a") == "a", what=f"{url + '/a'} answers " + "a")

    # A new cluster and a route to it.
    s2 = snap(
        *base(listen, a.port, R.routes("web-routes", ("/a", "a"), ("/b", "b")))[:3],
        R.routes("web-routes", ("/a", "a"), ("/b", "b")),
        R.eds_cluster("b"),
        R.endpoints("b", b.port),
    )
    control_plane.cache.set_snapshot("n", s2)
    await eventually(lambda: body_of(url + "/b") == "b", what=f"{url + '/b'} answers " + "b")

    # Changed endpoints: the same cluster now points at another backend.
    s3 = snap(
        R.eds_cluster("a"),
        R.endpoints("a", a2.port),
        R.http_listener("web", listen, "web-routes"),
        R.routes("web-routes", ("/a", "a"), ("/b", "b")),
        R.eds_cluster("b"),
        R.endpoints("b", b.port),
    )
    control_plane.cache.set_snapshot("n", s3)
    await eventually(lambda: body_of(url + "/a") == "a2", what=f"{url + '/a'} answers " + "a2")

    # Removed route and cluster: /b is gone, and so is cluster b from Envoy's config.
    s4 = snap(*base(listen, a2.port))
    control_plane.cache.set_snapshot("n", s4)
    assert await eventually(lambda: http_get(url + "/b").status == 404)
    await eventually(lambda: "b" not in dump_versions(envoy)["cds"], what="cluster b removed")
    await eventually(lambda: all_acked(control_plane, "n", s4), what="ACK of the last version")
    assert dump_versions(envoy) == expected_versions(s4, mode)
    assert (await fetch(url + "/a")).body.strip() == "a2"


async def test_nack_reports_envoys_message_and_is_not_resent(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    a, a2 = await backends("a"), await backends("a2")
    listen = free_port()
    url = f"http://127.0.0.1:{listen}/a"
    good = snap(*base(listen, a.port))
    envoy = await serving(control_plane, start_envoy, good, mode)

    bad_routes = R.bad_regex_routes("web-routes", "a")
    bad = snap(*base(listen, a.port, bad_routes))
    control_plane.cache.set_snapshot("n", bad)
    rds = control_plane.server.status.type_status("n", types.ROUTE)
    await eventually(lambda: rds.last_nack is not None, what="a NACK for the bad route")
    nack = rds.last_nack
    assert nack is not None
    assert nack.version == bad.version(types.ROUTE)
    assert nack.resource_names == ("web-routes",)
    assert "regex" in nack.message.lower() or "missing" in nack.message.lower(), nack.message
    report = control_plane.server.status.snapshot()["n"]["types"]["rds"]["last_nack"]
    assert report["message"] == nack.message
    assert rds.version_acked == good.version(types.ROUTE)  # the last good version stays
    assert (await fetch(url)).body.strip() == "a"  # ...and keeps serving
    responses_at_nack = rds.responses_sent

    # An unrelated change goes through; the rejected routes are not sent again meanwhile.
    s3 = snap(*base(listen, a2.port, bad_routes))
    control_plane.cache.set_snapshot("n", s3)
    eds = control_plane.server.status.type_status("n", types.ENDPOINT)
    await eventually(lambda: eds.version_acked == s3.version(types.ENDPOINT))
    await eventually(lambda: body_of(url) == "a2", what=f"{url} answers " + "a2")
    assert rds.responses_sent == responses_at_nack
    rejected = envoy.stats("rds.web-routes.update_rejected")
    assert sum(rejected.values()) == 1, rejected

    # A fixed version is accepted and clears the NACK.
    fixed = snap(*base(listen, a2.port, R.routes("web-routes", ("/a", "a"), ("/z", "a"))))
    control_plane.cache.set_snapshot("n", fixed)
    await eventually(lambda: rds.version_acked == fixed.version(types.ROUTE))
    assert rds.last_nack is None
    assert rds.responses_sent == responses_at_nack + 1
    assert await eventually(lambda: body_of(url.replace("/a", "/z"))) == "a2"


async def test_restart_keeps_serving_and_ends_with_the_same_versions(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    a, a2 = await backends("a"), await backends("a2")
    listen = free_port()
    url = f"http://127.0.0.1:{listen}/a"
    s1 = snap(*base(listen, a.port))
    envoy = await serving(control_plane, start_envoy, s1, mode)
    before = dump_versions(envoy)
    port = control_plane.port

    await control_plane.stop()
    assert (
        await fetch(url)
    ).body.strip() == "a"  # Envoy serves the last config while the control plane is gone

    restarted = await ControlPlane().start(port)
    try:
        restarted.cache.set_snapshot("n", snap(*base(listen, a.port)))  # rebuilt from scratch
        status = restarted.server.status

        def resynced() -> bool:
            node = status.node("n")
            if node is None or not node.connected:
                return False
            for t in ALL:
                ts = status.type_status("n", t)
                if mode == "delta":
                    want = {n: r.version for n, r in s1.resources(t).items()}
                    if ts.acked_resources != want:
                        return False
                elif ts.version_acked != s1.version(t):
                    return False
            return True

        await eventually(resynced, timeout=20, what="Envoy reconnected with its versions")
        assert dump_versions(envoy) == before
        for t in ALL:  # nothing was resent: Envoy already held every resource
            assert status.type_status("n", t).resources_sent == 0, types.short_name(t)
        assert (await fetch(url)).body.strip() == "a"

        # The new stream is live: a change made after the restart reaches Envoy.
        restarted.cache.set_snapshot("n", snap(*base(listen, a2.port)))
        await eventually(lambda: body_of(url) == "a2", what=f"{url} answers " + "a2")
        assert status.type_status("n", types.ENDPOINT).resources_sent == 1
    finally:
        await restarted.stop()


async def test_each_node_gets_its_own_snapshot(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    a, b = await backends("a"), await backends("b")
    l1, l2 = free_port(), free_port()
    control_plane.cache.set_snapshot("node-1", snap(*base(l1, a.port)))
    control_plane.cache.set_snapshot("node-2", snap(*base(l2, b.port)))
    start_envoy("node-1", control_plane.address, delta=mode == "delta")
    start_envoy("node-2", control_plane.address, delta=mode == "delta")
    await eventually(
        lambda: body_of(f"http://127.0.0.1:{l1}/a") == "a",
        what=f"{f'http://127.0.0.1:{l1}/a'} answers " + "a",
    )
    await eventually(
        lambda: body_of(f"http://127.0.0.1:{l2}/a") == "b",
        what=f"{f'http://127.0.0.1:{l2}/a'} answers " + "b",
    )
    assert (await fetch(f"http://127.0.0.1:{l1}/a")).body.strip() == "a"
    nodes = control_plane.server.status.snapshot()
    assert set(nodes) == {"node-1", "node-2"}
    assert (
        nodes["node-1"]["types"]["eds"]["version_acked"]
        != (nodes["node-2"]["types"]["eds"]["version_acked"])
    )


async def test_a_changed_cluster_warms_with_its_unchanged_endpoints(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """Envoy re-warms a changed cluster and waits for its endpoints, but does not ask again for
    a name it already watches: the server must resend them, or the cluster hangs in warming
    until the initial fetch timeout (60 s here)."""
    a = await backends("a")
    listen = free_port()
    s1 = snap(*base(listen, a.port))
    envoy = await serving(control_plane, start_envoy, s1, mode)

    changed = snap(R.eds_cluster("a", connect_timeout_s=2), *base(listen, a.port)[1:])
    assert changed.version(types.ENDPOINT) == s1.version(types.ENDPOINT)
    control_plane.cache.set_snapshot("n", changed)

    def warmed() -> bool:
        dump = envoy.config_dump()
        clusters = next(c for c in dump["configs"] if c["@type"].endswith("ClustersConfigDump"))
        active = {
            x["cluster"]["name"]: x["cluster"].get("connect_timeout")
            for x in clusters.get("dynamic_active_clusters", [])
        }
        return active.get("a") == "2s" and not clusters.get("dynamic_warming_clusters")

    await eventually(warmed, timeout=20, what="the changed cluster leaves warming")
    await eventually(lambda: all_acked(control_plane, "n", changed), what="CDS ACK")
    await eventually(lambda: body_of(f"http://127.0.0.1:{listen}/a") == "a", what="serving")


async def test_a_listener_added_after_a_nack_gets_routes_that_already_existed(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """A NACK holds the rejected RDS version, not a route configuration Envoy asks for after
    it (a node's Listener gains a consumer chain whose routes other nodes already use, so the
    RDS version does not change): held too, the new Listener warmed until
    initial_fetch_timeout (15 s) and then served without its routes (delta).

    And that request is no ACK of the rejected version: SotW Envoy repeats the last nonce,
    without error_detail, in every request until the next response, and it counted as one
    (version_acked became the rejected version, so Programmed took its routes as programmed)."""
    a = await backends("a")
    listen, listen2 = free_port(), free_port()
    other = R.routes("other-routes", ("/a", "a"))
    good = snap(*base(listen, a.port), other)
    await serving(control_plane, start_envoy, good, mode)

    bad = snap(*base(listen, a.port, R.bad_regex_routes("web-routes", "a")), other)
    control_plane.cache.set_snapshot("n", bad)
    rds = control_plane.server.status.type_status("n", types.ROUTE)
    await eventually(lambda: rds.last_nack is not None, what="a NACK for the bad route")

    more = snap(
        *base(listen, a.port, R.bad_regex_routes("web-routes", "a")),
        other,
        R.http_listener("web2", listen2, "other-routes"),
    )
    assert more.version(types.ROUTE) == bad.version(types.ROUTE)
    control_plane.cache.set_snapshot("n", more)
    url = f"http://127.0.0.1:{listen2}/a"
    await eventually(lambda: body_of(url) == "a", timeout=10, what=f"{url} answers a")
    assert rds.last_nack is not None  # web-routes is still rejected
    assert rds.version_acked == good.version(types.ROUTE)


async def test_a_cluster_changed_while_envoy_was_away_warms_with_its_unchanged_endpoints(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """A control plane that comes back with a changed cluster (an upgrade that changes every
    cluster's settings, say), its endpoints unchanged: Envoy re-warms the cluster and waits for
    its endpoints, which the new stream must send, though Envoy states it holds them."""
    a = await backends("a")
    listen = free_port()
    url = f"http://127.0.0.1:{listen}/a"
    s1 = snap(*base(listen, a.port))
    envoy = await serving(control_plane, start_envoy, s1, mode)
    port = control_plane.port
    await control_plane.stop()

    restarted = await ControlPlane().start(port)
    try:
        s2 = snap(R.eds_cluster("a", connect_timeout_s=2), *base(listen, a.port)[1:])
        assert s2.version(types.ENDPOINT) == s1.version(types.ENDPOINT)
        restarted.cache.set_snapshot("n", s2)

        def warmed() -> bool:
            dump = envoy.config_dump()["configs"]
            clusters = next(c for c in dump if c["@type"].endswith("ClustersConfigDump"))
            return not clusters.get("dynamic_warming_clusters") and any(
                x["cluster"]["name"] == "a" and x["cluster"]["connect_timeout"] == "2s"
                for x in clusters.get("dynamic_active_clusters", [])
            )

        # well within the clusters' initial_fetch_timeout (60 s), reconnecting included
        await eventually(warmed, timeout=30, what="cluster a warmed with its new settings")
        assert (await fetch(url)).body.strip() == "a"
        cds = restarted.server.status.type_status("n", types.CLUSTER)
        await eventually(lambda: cds.version_acked == s2.version(types.CLUSTER))
    finally:
        await restarted.stop()


class HeldHealthBackend(Backend):
    """A backend that answers its health check (`/healthz`) only once `release()` is called, so
    a cluster of it stays warming as long as the test wants: Envoy warms a cluster with active
    health checking until each host's first check has passed."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.health_checks = 0
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path != "/healthz":
            return await super()._handle(request)
        self.health_checks += 1
        await self._released.wait()
        return web.Response(text="ok")


class Poller:
    """GETs `url` in a thread, one after another, until `stop()`: (status, body) of each."""

    def __init__(self, url: str) -> None:
        self.seen: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(url,))
        self._thread.start()

    def _poll(self, url: str) -> None:
        while not self._stop.is_set():
            r = http_get(url)
            self.seen.append((r.status, r.body.strip()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)


def health_checked(name: str) -> cluster_pb2.Cluster:
    c = R.eds_cluster(name)
    hc = c.health_checks.add()
    hc.timeout.FromSeconds(60)
    hc.interval.FromSeconds(60)
    hc.unhealthy_threshold.value = 1
    hc.healthy_threshold.value = 1
    hc.http_health_check.path = "/healthz"
    return c


async def test_a_route_to_a_new_cluster_never_answers_503_while_it_is_applied(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """A route moves to a new cluster b. Sent right after b's CDS response, the route reached
    Envoy while b was still warming (waiting for its endpoints, here also for its first health
    check), and Envoy answered 503 (no cluster) until b was warm. The route is sent once Envoy
    has ACKed b, which it does when b is warm; requests meanwhile go to a."""
    a = await backends("a")
    b = await HeldHealthBackend("b").start()
    listen = free_port()
    url = f"http://127.0.0.1:{listen}/new"
    s1 = snap(*base(listen, a.port, R.routes("web-routes", ("/", "a"))))
    await serving(control_plane, start_envoy, s1, mode)
    s2 = snap(
        *base(listen, a.port, R.routes("web-routes", ("/", "b"))),
        health_checked("b"),
        R.endpoints("b", b.port),
    )

    poller = Poller(url)
    seen = poller.seen
    try:
        await eventually(lambda: seen, what="the first answer")
        control_plane.cache.set_snapshot("n", s2)
        await eventually(lambda: b.health_checks, what="Envoy health-checks b: b is warming")
        rds = control_plane.server.status.type_status("n", types.ROUTE)
        assert rds.version_sent == s1.version(types.ROUTE), "the route to b waits for b"
        warming = len(seen)
        await eventually(lambda: len(seen) > warming + 20, what="requests while b warms")
        b.release()
        await eventually(lambda: seen[-1] == (200, "b"), what="the route to b is applied")
    finally:
        await poller.stop()
        b.release()
        await b.stop()
    assert Counter(status for status, _ in seen) == {200: len(seen)}, Counter(seen)
    assert {body for _, body in seen} == {"a", "b"}
    await eventually(lambda: all_acked(control_plane, "n", s2), what="every type ACKed")


async def test_a_route_to_a_cluster_of_a_later_build_never_answers_503(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """Two builds within one CDS round trip: build 1 adds cluster b and moves the route to it;
    build 2 comes while b warms, adds c and moves the route to c. Envoy's answer to b's
    Clusters let the route go with build 2's content, right behind c's Clusters, and Envoy
    answered 503 (no cluster) for as long as c warmed. The route to c now waits for Envoy's
    answer to c's Clusters; requests meanwhile go to a, then b."""
    a = await backends("a")
    b = await HeldHealthBackend("b").start()
    c = await HeldHealthBackend("c").start()
    listen = free_port()
    url = f"http://127.0.0.1:{listen}/x"
    s1 = snap(*base(listen, a.port, R.routes("web-routes", ("/", "a"))))
    await serving(control_plane, start_envoy, s1, mode)
    with_b = [health_checked("b"), R.endpoints("b", b.port)]
    s2 = snap(*base(listen, a.port, R.routes("web-routes", ("/", "b"))), *with_b)
    s3 = snap(
        *base(listen, a.port, R.routes("web-routes", ("/", "c"))),
        *with_b,
        health_checked("c"),
        R.endpoints("c", c.port),
    )
    poller = Poller(url)
    seen = poller.seen
    try:
        await eventually(lambda: seen, what="the first answer")
        control_plane.cache.set_snapshot("n", s2)
        await eventually(lambda: b.health_checks, what="Envoy health-checks b: b is warming")
        control_plane.cache.set_snapshot("n", s3)  # build 2, while b warms
        b.release()
        await eventually(lambda: c.health_checks, what="Envoy health-checks c: c is warming")
        warming = len(seen)
        await eventually(lambda: len(seen) > warming + 20, what="requests while c warms")
        c.release()
        await eventually(lambda: seen[-1] == (200, "c"), what="the route to c is applied")
    finally:
        await poller.stop()
        b.release()
        c.release()
        await b.stop()
        await c.stop()
    assert Counter(status for status, _ in seen) == {200: len(seen)}, Counter(seen)
    await eventually(lambda: all_acked(control_plane, "n", s3), what="every type ACKed")


async def test_a_new_cluster_warms_at_once_when_more_clusters_follow_it(
    control_plane: ControlPlane, start_envoy: Any, backends: Any, mode: str
) -> None:
    """Cluster b and a route to it come, and cluster c before Envoy asks for b's endpoints (two
    rebuilds within one CDS round trip, as a burst of new Services gives on a big mesh). b's
    endpoints were held behind c, c behind Envoy's answer to b, which Envoy sends only once b
    has warmed: b and the route waited for b's initial fetch timeout (60 s here, 15 s by
    default)."""
    a, b = await backends("a"), await backends("b")
    listen = free_port()
    s1 = snap(*base(listen, a.port, R.routes("web-routes", ("/", "a"))))
    await serving(control_plane, start_envoy, s1, mode)
    with_b = [
        *base(listen, a.port, R.routes("web-routes", ("/", "b"))),
        R.eds_cluster("b"),
        R.endpoints("b", b.port),
    ]
    s3 = snap(*with_b, R.eds_cluster("c"), R.endpoints("c", a.port))
    control_plane.cache.set_snapshot("n", snap(*with_b))
    started = time.monotonic()
    control_plane.cache.set_snapshot("n", s3)
    url = f"http://127.0.0.1:{listen}/x"
    assert await eventually(lambda: body_of(url) == "b", timeout=10, what="the route to b")
    took = time.monotonic() - started
    assert took < 10, f"b warmed after {took:.1f} s: its initial fetch timeout, not its endpoints"
    assert await eventually(lambda: all_acked(control_plane, "n", s3), what="every type ACKed")


async def test_an_envoy_told_localhost_reaches_a_control_plane_on_ipv4(
    control_plane: ControlPlane, start_envoy: Any, backends: Any
) -> None:
    """`nodemesh bootstrap --xds localhost:18000`, the control plane on its default
    127.0.0.1:18000: Envoy's resolver answers `localhost` with ::1 first, and the Envoy never
    connected, with no word but its own log's. The bootstrap prefers IPv4 addresses."""
    a = await backends("a")
    s = snap(*base(free_port(), a.port))
    control_plane.cache.set_snapshot("n", s)
    port = control_plane.address.rsplit(":", 1)[1]
    start_envoy("n", f"localhost:{port}")
    assert await eventually(lambda: all_acked(control_plane, "n", s), what="every type ACKed")
