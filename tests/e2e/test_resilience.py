"""Retries, timeouts, circuit breaking, outlier ejection and fault injection, as a client sees
them through a real node Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.e2e.conftest import Backends
from tests.e2e.mesh import HttpBackend, Mesh, endpoint_slice, service
from tests.e2e.objects import http_route, policy, to

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def served(mesh: Mesh, backends: Backends, name: str, *objects: Any) -> HttpBackend:
    """A backend, Service `name` and its EndpointSlice, with `objects` (routes, policies)
    applied, as the node Envoy holds them."""
    b = await backends.get(name)
    mesh.apply(service(name), endpoint_slice(name, b.port), *objects)
    await mesh.converge()
    return b


async def test_route_retry_turns_503s_into_a_200(mesh: Mesh, backends: Backends) -> None:
    flaky = await backends.get("retry-flaky")
    mesh.apply(
        service("retry"),
        endpoint_slice("retry", flaky.port),
        http_route("retry", "retry", [
            {"backendRefs": [to("retry")],
             "retry": {"codes": [503], "attempts": 2, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    await mesh.converge()
    flaky.fail_next(2, 503)
    reply = await mesh.get("retry.shop")
    assert (reply.status, reply.body) == (200, "retry-flaky")
    assert flaky.hits == 3  # two failures, then the retry that worked


async def test_retries_of_many_concurrent_requests_all_happen(
    mesh: Mesh, backends: Backends
) -> None:
    """Eight requests at once, each failing once: all eight are retried. Envoy's default lets
    a cluster have 3 retries in flight per Envoy, and all the pods of a node share their node
    Envoy; the other five were answered 503 (nodemesh sets no limit unless a TrafficPolicy
    does)."""
    slow = await backends.get("concurrent-retry")
    mesh.apply(
        service("cretry"),
        endpoint_slice("cretry", slow.port),
        http_route("cretry", "cretry", [
            {"backendRefs": [to("cretry")],
             "retry": {"codes": [503], "attempts": 1, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    await mesh.converge()
    slow.delay = 0.5  # every answer takes 0.5 s: the eight retries overlap
    slow.fail_next(8, 503)
    replies = await asyncio.gather(*(mesh.get("cretry.shop") for _ in range(8)))
    assert [r.status for r in replies] == [200] * 8
    assert slow.hits == 16


async def test_retries_stop_after_attempts(mesh: Mesh, backends: Backends) -> None:
    flaky = await backends.get("retry2-flaky")
    mesh.apply(
        service("retry2"),
        endpoint_slice("retry2", flaky.port),
        http_route("retry2", "retry2", [
            {"backendRefs": [to("retry2")],
             "retry": {"codes": [503], "attempts": 1, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    await mesh.converge()
    flaky.fail_next(5, 503)
    reply = await mesh.get("retry2.shop")
    assert reply.status == 503
    assert flaky.hits == 2  # the first try and one retry


async def test_policy_retry_applies_when_the_route_sets_none(
    mesh: Mesh, backends: Backends
) -> None:
    flaky = await served(
        mesh, backends, "pretry",
        policy("pretry", "pretry", retry={
            "retryOn": ["gateway-error"], "attempts": 3, "backoff": {"baseInterval": "5ms"},
        }),
    )  # fmt: skip
    flaky.fail_next(3, 502)
    reply = await mesh.get("pretry.shop")
    assert reply.status == 200 and flaky.hits == 4


async def test_a_route_backoff_above_the_policys_maximum_is_programmed(
    mesh: Mesh, backends: Backends
) -> None:
    """The route's backoff (50ms) over the policy's maxInterval (10ms): Envoy refuses a
    maximum below the base, and that NACK held back every Service's routes. The maximum is
    raised to the route's base; the retry works. Likewise a backoff of 0s (1 ms)."""
    flaky = await backends.get("bretry")
    mesh.apply(
        service("bretry"),
        endpoint_slice("bretry", flaky.port),
        policy("bretry", "bretry", retry={
            "retryOn": ["gateway-error"], "attempts": 3,
            "backoff": {"baseInterval": "5ms", "maxInterval": "10ms"},
        }),
        http_route("bretry", "bretry", [
            {"backendRefs": [to("bretry")],
             "retry": {"codes": [503], "attempts": 2, "backoff": "50ms"}},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/now"}}],
             "backendRefs": [to("bretry")],
             "retry": {"codes": [503], "attempts": 2, "backoff": "0s"}},  # Envoy refuses 0
        ]),
    )  # fmt: skip
    await mesh.converge()  # ACKed, not NACKed
    flaky.fail_next(1, 503)
    reply = await mesh.get("bretry.shop")
    assert reply.status == 200 and flaky.hits == 2
    flaky.fail_next(1, 503)
    reply = await mesh.get("bretry.shop", "/now")
    assert reply.status == 200 and flaky.hits == 4


async def test_request_timeout_answers_504(mesh: Mesh, backends: Backends) -> None:
    slow = await served(
        mesh, backends, "slow",
        http_route("slow", "slow", [
            {"backendRefs": [to("slow")], "timeouts": {"request": "300ms"}},
        ]),
    )  # fmt: skip
    slow.delay = 3.0
    reply = await mesh.get("slow.shop")
    assert reply.status == 504
    assert 0.25 <= reply.seconds < 2.0


async def test_backend_request_timeout_is_per_try_and_retried(
    mesh: Mesh, backends: Backends
) -> None:
    slow = await served(
        mesh, backends, "pertry",
        policy("pertry", "pertry", retry={"retryOn": ["gateway-error"], "attempts": 2}),
        http_route("pertry", "pertry", [
            {"backendRefs": [to("pertry")],
             "timeouts": {"request": "5s", "backendRequest": "200ms"}},
        ]),
    )  # fmt: skip
    slow.delay = 2.0
    reply = await mesh.get("pertry.shop")
    assert reply.status == 504
    assert slow.hits == 3  # every try timed out after 200 ms: 1 + 2 retries
    assert reply.seconds < 2.0


async def test_circuit_breaker_sheds_excess_concurrent_requests(
    mesh: Mesh, backends: Backends
) -> None:
    b = await served(
        mesh, backends, "cb",
        policy("cb", "cb", circuitBreaker={
            "maxConnections": 1, "maxPendingRequests": 1, "maxRequests": 1,
        }),
    )  # fmt: skip
    b.delay = 0.5
    replies = await asyncio.gather(*(mesh.get("cb.shop") for _ in range(8)))
    statuses = sorted(r.status for r in replies)
    overflowed = [r for r in replies if r.status == 503]
    assert 200 in statuses and overflowed, statuses
    assert all(r.headers.get("x-envoy-overloaded") == "true" for r in overflowed)
    assert b.hits < 8


async def test_max_connections_alone_queues_requests_on_its_connections(
    mesh: Mesh, backends: Backends
) -> None:
    """`maxConnections` caps connections, not requests: with no `maxPendingRequests`, a
    request that finds its one connection busy waits for it (Envoy queues it as pending),
    and none is shed. The docs said such a request was answered 503."""
    b = await served(mesh, backends, "cbconn", policy("cbconn", "cbconn", circuitBreaker={
        "maxConnections": 1}))  # fmt: skip
    b.delay = 0.3
    replies = await asyncio.gather(*(mesh.get("cbconn.shop") for _ in range(4)))
    assert [r.status for r in replies] == [200] * 4
    assert b.hits == 4
    # one connection carries one HTTP/1.1 request at a time: the last waited for three
    assert max(r.seconds for r in replies) >= 4 * 0.3 * 0.9


async def test_outlier_detection_ejects_a_failing_endpoint(mesh: Mesh, backends: Backends) -> None:
    good, bad = await backends.get("od-good"), await backends.get("od-bad")
    bad.fail_always = 500
    mesh.apply(
        service("od"),
        endpoint_slice("od", good.port, suffix="good"),
        endpoint_slice("od", bad.port, suffix="bad"),
        policy("od", "od", outlierDetection={
            "consecutive5xx": 2, "interval": "100ms", "baseEjectionTime": "30s",
            "maxEjectionPercent": 50,
        }),
    )  # fmt: skip
    await mesh.converge()
    for _ in range(20):
        await mesh.get("od.shop")
    # Ejection is immediate on the second consecutive 5xx; round robin sends every other
    # request to "bad" until then, so it sees only a few.
    assert bad.hits <= 4, bad.hits
    replies = [await mesh.get("od.shop") for _ in range(20)]
    assert all(r.status == 200 and r.body == "od-good" for r in replies)


async def test_fault_abort_answers_without_calling_the_backend(
    mesh: Mesh, backends: Backends
) -> None:
    b = await served(
        mesh,
        backends,
        "abort",
        policy("abort", "abort", faultInjection={"abort": {"httpStatus": 418, "percent": 100}}),
    )
    replies = [await mesh.get("abort.shop") for _ in range(5)]
    assert [r.status for r in replies] == [418] * 5
    assert b.hits == 0


async def test_fault_abort_percentage_is_statistical(mesh: Mesh, backends: Backends) -> None:
    b = await served(
        mesh,
        backends,
        "abort50",
        policy("abort50", "abort50", faultInjection={"abort": {"httpStatus": 503, "percent": 50}}),
    )
    n = 300
    aborted = sum(r.status == 503 for r in await mesh.get_many(n, "abort50.shop"))
    # Binomial(300, 0.5): sd ~8.7; +-5 sd.
    assert 106 <= aborted <= 194, aborted
    assert b.hits == n - aborted


async def test_fault_delay_holds_requests(mesh: Mesh, backends: Backends) -> None:
    await served(
        mesh,
        backends,
        "delay",
        policy("delay", "delay", faultInjection={"delay": {"fixedDelay": "400ms", "percent": 100}}),
    )
    reply = await mesh.get("delay.shop")
    assert reply.status == 200 and reply.seconds >= 0.38


async def test_outlier_detection_without_max_ejection_percent_ejects_one_of_few(
    mesh: Mesh, backends: Backends
) -> None:
    """Envoy's default max_ejection_percent is 10%, and Envoy 1.40 ejects no host that would
    take the ejected share above it: a Service with fewer than 10 endpoints had none ejected
    (the failing one of two got every other request). At least one is ejected now."""
    good, bad = await backends.get("od1-good"), await backends.get("od1-bad")
    bad.fail_always = 500
    mesh.apply(
        service("od1"),
        endpoint_slice("od1", good.port, suffix="good"),
        endpoint_slice("od1", bad.port, suffix="bad"),
        policy("od1", "od1", outlierDetection={"consecutive5xx": 2, "interval": "100ms"}),
    )  # fmt: skip
    await mesh.converge()
    for _ in range(20):
        await mesh.get("od1.shop")
    assert bad.hits <= 4, bad.hits
    replies = [await mesh.get("od1.shop") for _ in range(20)]
    assert all(r.status == 200 and r.body == "od1-good" for r in replies)


async def test_the_affinity_cookie_envoy_sets_holds_for_every_path(
    mesh: Mesh, backends: Backends
) -> None:
    """A client keeping cookies as RFC 6265 says sends the cookie Envoy set on /api/users/7
    with a request to /orders too, and that request goes to the same endpoint. The cookie had
    no Path, so the client kept it for /api/users only: /orders got another cookie and, with
    four endpoints, most often another endpoint."""
    bs = [await backends.get(f"aff{i}") for i in range(4)]
    mesh.apply(
        service("aff"),
        *(endpoint_slice("aff", b.port, suffix=b.name) for b in bs),
        policy("aff", "aff", loadBalancer={
            "type": "RingHash", "hashOn": {"cookie": {"name": "affinity", "ttl": "1h"}},
        }),
    )  # fmt: skip
    await mesh.converge()
    first = await mesh.get("aff.shop", "/api/users/7")
    jar = aiohttp.CookieJar()
    jar.update_cookies(
        SimpleCookie(first.headers["Set-Cookie"]), URL("http://aff.shop/api/users/7")
    )
    sent = jar.filter_cookies(URL("http://aff.shop/orders"))
    assert "affinity" in sent, first.headers["Set-Cookie"]
    cookie = {"Cookie": f"affinity={sent['affinity'].value}"}
    replies = [await mesh.get("aff.shop", "/orders", headers=cookie) for _ in range(8)]
    assert {r.body for r in replies} == {first.body}


async def test_session_affinity_client_ip_keeps_a_client_on_one_endpoint(
    mesh: Mesh, backends: Backends
) -> None:
    """A Service with sessionAffinity ClientIP and three endpoints: the requests of each client
    address (twelve of them, each request on a new connection) all go to one endpoint, and
    the clients do not all share one. Before, each request picked an endpoint."""
    bs = [await backends.get(f"sticky{i}") for i in range(3)]
    svc = service("sticky")
    svc["spec"]["sessionAffinity"] = "ClientIP"
    mesh.apply(svc, *(endpoint_slice("sticky", b.port, suffix=b.name) for b in bs))
    await mesh.converge()
    chosen: dict[str, set[str]] = {}
    for i in range(12):
        source = f"127.0.0.{10 + i}"
        replies = [await mesh.get("sticky.shop", source=source) for _ in range(6)]
        assert all(r.status == 200 for r in replies), replies
        chosen[source] = {r.body for r in replies}
    assert all(len(bodies) == 1 for bodies in chosen.values()), chosen
    assert len(set().union(*chosen.values())) > 1, chosen


async def test_retries_over_max_retries_are_not_made(mesh: Mesh, backends: Backends) -> None:
    """Six requests fail at once, with maxRetries: 1: one is retried; the other five get the
    backend's 503 as it gave it (no x-envoy-overloaded: that is for requests over the other
    limits, which Envoy answers itself)."""
    b = await served(
        mesh, backends, "maxretries",
        policy("maxretries", "maxretries", circuitBreaker={"maxRetries": 1}),
        http_route("maxretries", "maxretries", [
            {"backendRefs": [to("maxretries")],
             "retry": {"codes": [503], "attempts": 1, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    b.delay = 0.5  # the six first tries fail together, while the one retry runs
    b.fail_next(6, 503)
    replies = await asyncio.gather(*(mesh.get("maxretries.shop") for _ in range(6)))
    assert sorted(r.status for r in replies) == [200] + [503] * 5
    failed = [r for r in replies if r.status == 503]
    assert all(r.body == "maxretries failing" for r in failed)
    assert all("x-envoy-overloaded" not in r.headers for r in failed)
    assert b.hits == 7


async def test_a_retry_budget_allows_min_concurrency_retries(
    mesh: Mesh, backends: Backends
) -> None:
    """A budget of 0% with minConcurrency 2: of eight requests failing at once, two are
    retried (0% of eight active requests is none; the minimum allows two)."""
    b = await served(
        mesh, backends, "budget",
        policy("budget", "budget", retry={"budget": {"percent": 0, "minConcurrency": 2}}),
        http_route("budget", "budget", [
            {"backendRefs": [to("budget")],
             "retry": {"codes": [503], "attempts": 1, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    b.delay = 0.5
    b.fail_next(8, 503)
    replies = await asyncio.gather(*(mesh.get("budget.shop") for _ in range(8)))
    assert sorted(r.status for r in replies) == [200] * 2 + [503] * 6
    assert b.hits == 10


async def test_a_routes_backend_request_timeout_is_retried_without_a_policy(
    mesh: Mesh, backends: Backends
) -> None:
    """Gateway API: with a retry stanza, a try that reaches timeouts.backendRequest is retried.
    The route's own retry_on (connect-failure,refused-stream,reset) does: Envoy counts a
    per-try timeout as a reset."""
    slow = await served(
        mesh, backends, "rtry",
        http_route("rtry", "rtry", [
            {"backendRefs": [to("rtry")], "retry": {"attempts": 2, "backoff": "10ms"},
             "timeouts": {"request": "5s", "backendRequest": "200ms"}},
        ]),
    )  # fmt: skip
    slow.delay = 2.0
    reply = await mesh.get("rtry.shop")
    assert reply.status == 504
    assert slow.hits == 3  # the first try and two retries, each cut after 200 ms
    assert reply.seconds < 2.0


async def test_a_zero_backend_request_timeout_lifts_the_policys_per_try_timeout(
    mesh: Mesh, backends: Backends
) -> None:
    """Gateway API: `backendRequest: 0s` SHOULD disable the timeout. The route's 0s wins over
    the policy's perTryTimeout (field by field), so a try of 600 ms is not cut at 200 ms."""
    slow = await served(
        mesh, backends, "nopertry",
        policy("nopertry", "nopertry", retry={"attempts": 2, "perTryTimeout": "200ms"}),
        http_route("nopertry", "nopertry", [
            {"backendRefs": [to("nopertry")], "timeouts": {"backendRequest": "0s"}},
        ]),
    )  # fmt: skip
    slow.delay = 0.6
    reply = await mesh.get("nopertry.shop")
    assert (reply.status, reply.body) == (200, "nopertry")
    assert slow.hits == 1
    assert reply.seconds >= 0.55


async def test_the_request_timeout_bounds_the_retries(mesh: Mesh, backends: Backends) -> None:
    """Ten retries of 200 ms tries would take over 2 s; timeouts.request (500ms) ends them
    with a 504 at 500 ms, as Gateway API requires."""
    slow = await served(
        mesh, backends, "rbound",
        http_route("rbound", "rbound", [
            {"backendRefs": [to("rbound")], "retry": {"attempts": 10, "backoff": "10ms"},
             "timeouts": {"request": "500ms", "backendRequest": "200ms"}},
        ]),
    )  # fmt: skip
    slow.delay = 2.0
    reply = await mesh.get("rbound.shop")
    assert reply.status == 504
    assert 0.45 <= reply.seconds < 1.5
    assert slow.hits <= 3  # tries began at about 0, 200 and 400 ms


async def test_the_idle_timeout_answers_504_while_the_backend_is_silent(
    mesh: Mesh, backends: Backends
) -> None:
    """timeouts.idle (300ms) also bounds how long a backend may take to start answering: a
    backend that takes 2 s has its request answered 504 (stream timeout) at 300 ms, with no
    timeouts.request set."""
    slow = await served(
        mesh,
        backends,
        "idle",
        policy("idle", "idle", timeouts={"idle": "300ms"}),
    )
    slow.delay = 2.0
    reply = await mesh.get("idle.shop")
    assert (reply.status, reply.body) == (504, "stream timeout")
    assert 0.25 <= reply.seconds < 1.5


async def test_an_injected_abort_is_not_retried(mesh: Mesh, backends: Backends) -> None:
    """The fault filter answers before a backend is picked: the route's retry on 503 does not
    retry an injected 503, and the backend is never called."""
    b = await served(
        mesh, backends, "abortretry",
        policy("abortretry", "abortretry", faultInjection={"abort": {"httpStatus": 503}}),
        http_route("abortretry", "abortretry", [
            {"backendRefs": [to("abortretry")],
             "retry": {"codes": [503], "attempts": 3, "backoff": "10ms"}},
        ]),
    )  # fmt: skip
    reply = await mesh.get("abortretry.shop")
    assert reply.status == 503
    assert b.hits == 0


async def test_an_injected_delay_is_outside_the_request_timeout(
    mesh: Mesh, backends: Backends
) -> None:
    """The delay comes before the router starts timeouts.request: a 1 s delay with a 300 ms
    request timeout is answered 200 after 1 s, not 504 at 300 ms."""
    await served(
        mesh, backends, "delaytimeout",
        policy("delaytimeout", "delaytimeout", faultInjection={"delay": {"fixedDelay": "1s"}}),
        http_route("delaytimeout", "delaytimeout", [
            {"backendRefs": [to("delaytimeout")], "timeouts": {"request": "300ms"}},
        ]),
    )  # fmt: skip
    reply = await mesh.get("delaytimeout.shop")
    assert reply.status == 200
    assert reply.seconds >= 0.95


async def test_the_connect_timeout_answers_503_when_the_backend_does_not_accept(
    mesh: Mesh,
) -> None:
    """timeouts.connect (300ms): a backend whose listen queue is full (the kernel drops new
    connections' SYNs) is given up at 300 ms with a 503, where Envoy's default is 5 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = [socket.socket() for _ in range(3)]  # more than the queue holds
    try:
        for s in queued:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
        mesh.apply(
            service("connect"),
            endpoint_slice("connect", port),
            policy("connect", "connect", timeouts={"connect": "300ms"}),
        )
        await mesh.converge()
        reply = await mesh.get("connect.shop")
        assert reply.status == 503 and reply.body.endswith("reset reason: connection timeout")
        assert 0.25 <= reply.seconds < 2.0
    finally:
        for s in queued:
            s.close()
        listener.close()
