"""What a user sees with `nodemesh controlplane --source kubernetes`: objects created in the
cluster (the emulator, through the real kopf) program a real node Envoy, and the objects'
status tells the truth."""

from __future__ import annotations

from typing import Any

from tests.e2e.mesh import endpoint_slice, service
from tests.e2e.objects import http_route, to
from tests.kube.conftest import Cluster, Kube, eventually


def parent_conditions(obj: dict[str, Any] | None) -> dict[str, str]:
    if not obj:
        return {}
    parents = (obj.get("status") or {}).get("parents") or []
    return {c["type"]: c["status"] for p in parents for c in p.get("conditions", [])}


async def status_shows(kube: Kube, kind: str, name: str, want: dict[str, str]) -> dict[str, str]:
    async def check() -> dict[str, str] | None:
        got = parent_conditions(await kube.get(kind, "shop", name))
        return got if all(got.get(k) == v for k, v in want.items()) else None

    result: dict[str, str] = await eventually(check, f"{kind} {name} status {want}")
    return result


async def test_route_with_retries_serves_and_reports_programmed(cluster: Cluster) -> None:
    kube = cluster.kube
    flaky = await cluster.backend("flaky")
    replica = await cluster.replica()
    envoy = await cluster.envoy(replica)
    await kube.create(service("web"))
    await kube.create(endpoint_slice("web", flaky.port))
    await kube.create(
        http_route("web", "web", [
            {"backendRefs": [to("web")],
             "retry": {"codes": [503], "attempts": 2, "backoff": "10ms"}},
        ])
    )  # fmt: skip
    await eventually(lambda: replica.store.revision >= 3, "three objects in the store")
    await replica.converge()
    flaky.fail_next(2, 503)
    reply = await envoy.get("web.shop")
    assert (reply.status, reply.body) == (200, "flaky")
    assert flaky.hits == 3  # two 503s, then the retry that worked
    await status_shows(
        kube, "HTTPRoute", "web", {"Accepted": "True", "ResolvedRefs": "True", "Programmed": "True"}
    )


async def test_changes_and_deletions_follow_and_a_deleted_backend_unresolves(
    cluster: Cluster,
) -> None:
    kube = cluster.kube
    blue, green = await cluster.backend("blue"), await cluster.backend("green")
    replica = await cluster.replica()
    envoy = await cluster.envoy(replica)
    for obj in (
        service("app"), endpoint_slice("app", blue.port),
        service("green"), endpoint_slice("green", green.port),
        http_route("app", "app", [{"backendRefs": [to("app")]}]),
    ):  # fmt: skip
        await kube.create(obj)
    await eventually(lambda: replica.store.revision >= 5, "five objects in the store")
    await replica.converge()
    assert (await envoy.get("app.shop")).body == "blue"

    # Change: point the route at the green Service.
    await kube.patch(
        "HTTPRoute", "shop", "app", {"spec": {"rules": [{"backendRefs": [to("green")]}]}}
    )

    async def serves(body: str) -> bool:
        return (await envoy.get("app.shop")).body == body

    await eventually(lambda: serves("green"), "Envoy routes app to green")

    # Deleting the backend Service: the route no longer resolves, and says so.
    await kube.delete("Service", "shop", "green")
    await status_shows(kube, "HTTPRoute", "app", {"ResolvedRefs": "False"})

    # Deleting the route: Envoy falls back to the Service's own default route (blue).
    await kube.delete("HTTPRoute", "shop", "app")
    await eventually(lambda: serves("blue"), "Envoy routes app to its own endpoints")
    assert await kube.get("HTTPRoute", "shop", "app") is None, "the finalizer was not released"
