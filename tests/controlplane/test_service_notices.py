"""Service settings that change where kube-proxy sends traffic and that the mesh does not honour
are said, in `/status`, `nodemesh status` and the log, not ignored without a word."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.status_cli import render as render_status
from nodemesh.controlplane.store import ObjectKey, Store
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import StatusTracker

pytestmark = pytest.mark.asyncio


def service(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop"}
    if annotations:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}], **spec},
    }


def routed(*names: str) -> dict[str, Any]:
    """An HTTPRoute on each of `names` (every port): their ports go through the node Envoy."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "routes", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": n} for n in names],
            "rules": [{}],  # (no backendRefs: a 500 for every request; only the ports count)
        },
    }


async def test_unhonoured_service_settings_are_said_and_never_written_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Local, ClientIP and topology-aware routing are honoured by the node agents (no route or
    policy: no notice); the ports the node Envoy takes get one naming them."""

    def write(*objs: dict[str, Any]) -> None:
        (tmp_path / "svc.yaml").write_text(yaml.safe_dump_all(objs))

    services = (
        service(
            "local",
            internalTrafficPolicy="Local",
            sessionAffinity="ClientIP",
            trafficDistribution="PreferSameNode",
        ),
        service("close", trafficDistribution="PreferClose"),
        service("hints", {"service.kubernetes.io/topology-mode": "Auto"}),
        # what the API server writes by default: nothing to say
        service("plain", internalTrafficPolicy="Cluster", sessionAffinity="None"),
        # Services the mesh does not carry, nor kube-proxy balance: nothing to say either
        service("headless", clusterIP="None", sessionAffinity="ClientIP"),
        service("ext", type="ExternalName", externalName="x.example", sessionAffinity="ClientIP"),
        service("udp", ports=[{"name": "dns", "port": 53, "protocol": "UDP"}],
                internalTrafficPolicy="Local"),
    )  # fmt: skip
    write(*services)
    store = Store()
    source = FilesSource(tmp_path, store)
    source.scan()
    p = Pipeline(store, SnapshotCache(), StatusTracker())
    await p.rebuild()
    assert [o for o in p.status_json()["objects"] if o["kind"] == "Service"] == []

    write(*services, routed("local", "close", "hints", "plain"))
    source.scan()
    with caplog.at_level(logging.WARNING, logger="nodemesh.controlplane.pipeline"):
        await p.rebuild()
    said = {
        o["name"]: o["conditions"] for o in p.status_json()["objects"] if o["kind"] == "Service"
    }
    assert sorted(said) == ["close", "hints", "local"]
    for conditions in said.values():
        assert [(c["type"], c["status"], c["reason"]) for c in conditions] == [
            ("Supported", "False", "UnsupportedValue")
        ]
    # (with Local, kube-proxy does not look at zones either)
    assert said["local"][0]["message"].startswith(
        "internalTrafficPolicy Local on port 80: not honoured by the mesh (the node Envoy"
    )
    assert said["close"][0]["message"] == (
        "trafficDistribution PreferClose on port 80: not honoured by the mesh (the node Envoy, "
        "which takes the requests of ports with routes or policies, uses endpoints whatever "
        "their zone)"
    )
    assert said["hints"][0]["message"].startswith("topology-mode Auto on port 80: not honoured")
    warnings = [r.getMessage() for r in caplog.records if "not honoured" in r.getMessage()]
    assert len(warnings) == 3, warnings
    table = render_status(p.status_json())  # what `nodemesh status` prints: each setting
    assert "trafficDistribution PreferClose on port 80: not honoured" in table
    # shown, never written back: the operator gets no status body for a Service
    assert p.kubernetes_status(ObjectKey("Service", "shop", "close")) is None

    write(*(service(n) for n in ("local", "close", "hints", "plain", "headless", "ext", "udp")))
    source.scan()
    await p.rebuild()
    assert [o for o in p.status_json()["objects"] if o["kind"] == "Service"] == []


def mesh(
    tmp_path: Path,
) -> tuple[Callable[..., None], Callable[[], Awaitable[dict[str, str]]]]:
    """In files mode: write(*objects) replaces the mesh's objects; notices() rebuilds and
    returns each Service's notice message by name."""
    store = Store()
    source = FilesSource(tmp_path, store)
    p = Pipeline(store, SnapshotCache(), StatusTracker())

    def write(*objs: dict[str, Any]) -> None:
        (tmp_path / "objs.yaml").write_text(yaml.safe_dump_all(objs))

    async def notices() -> dict[str, str]:
        source.scan()
        await p.rebuild()
        return {
            o["name"]: o["conditions"][0]["message"]
            for o in p.status_json()["objects"]
            if o["kind"] == "Service"
        }

    return write, notices


async def test_internal_traffic_policy_local_is_said_only_for_ports_the_node_envoy_takes(
    tmp_path: Path,
) -> None:
    """The node agents keep a Local Service's connections on the client's node; the node
    Envoy, which takes the ports that routes or policies apply to, does not."""
    ports = [{"name": "http", "port": 80}, {"name": "grpc", "port": 9090}]
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "r", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"kind": "Service", "name": "agent", "port": 80}],
            "rules": [{"backendRefs": [{"name": "agent", "port": 80}]}],
        },
    }

    write, notices = mesh(tmp_path)

    write(service("agent", internalTrafficPolicy="Local", ports=ports))
    assert await notices() == {}
    write(service("agent", internalTrafficPolicy="Local", ports=ports), route)
    assert await notices() == {
        "agent": "internalTrafficPolicy Local on port 80: not honoured by the mesh (the node "
        "Envoy, which takes the requests of ports with routes or policies, sends them to "
        "endpoints on every node and does not refuse them when the client's node has none)"
    }
    # with zones asked for: kube-proxy does not look at them for Local either
    write(
        service(
            "agent", internalTrafficPolicy="Local", trafficDistribution="PreferClose", ports=ports
        ),
        route,
    )
    assert (await notices())["agent"].startswith("internalTrafficPolicy Local on port 80: not")
    assert "trafficDistribution" not in (await notices())["agent"]
    # a route for every port: both said
    every = {
        **route,
        "spec": {**route["spec"], "parentRefs": [{"kind": "Service", "name": "agent"}]},
    }
    write(service("agent", internalTrafficPolicy="Local", ports=ports), every)
    assert (await notices())["agent"].startswith("internalTrafficPolicy Local on ports 80, 9090:")
    write(service("agent", internalTrafficPolicy="Local", ports=ports))  # the route gone
    assert await notices() == {}


async def test_client_ip_affinity_is_said_only_where_a_policys_load_balancer_applies(
    tmp_path: Path,
) -> None:
    """sessionAffinity ClientIP is honoured (the kernel and the node Envoy keep a client pod on
    one endpoint), but a TrafficPolicy's loadBalancer wins on the ports it targets."""
    ports = [{"name": "http", "port": 80}, {"name": "admin", "port": 8080}]
    policy = {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": {"name": "lb", "namespace": "shop"},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "web", "sectionName": "http"}],
            "loadBalancer": {"type": "LeastRequest"},
        },
    }
    timeouts = {**policy, "spec": {**policy["spec"], "timeouts": {"request": "5s"}}}
    del timeouts["spec"]["loadBalancer"]

    write, notices = mesh(tmp_path)

    web = service("web", sessionAffinity="ClientIP", ports=ports)
    write(web)
    assert await notices() == {}
    write(web, timeouts)  # a policy without a loadBalancer: affinity stays
    assert await notices() == {}
    write(web, policy)
    assert await notices() == {
        "web": "sessionAffinity ClientIP on port 80: not honoured by the mesh (a "
        "TrafficPolicy's loadBalancer applies there instead)"
    }
    write(web)
    assert await notices() == {}
