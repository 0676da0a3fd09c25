"""The API server goes away for longer than a restart or two (a managed cluster's upgrade, an
etcd failure): the operator outlives it with the store as it was, says so once, and follows
the cluster again as soon as the API server answers. Credentials the API server refuses from
the start end it, since waiting does not heal them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodemesh.controlplane.kube import Operator, OperatorError, OperatorOptions
from nodemesh.controlplane.store import ObjectKey, Store
from tests.kube.conftest import DEADLINE, ApiFront, Kube, Pki, eventually, running_kube
from tests.kube.test_feed import service

# kopf's own tries of a request 0.1 s apart, restarts from 0.05 s doubling to 0.4 s (before
# 2026-11-22 the fifth stop in a row ended the operator: here within 2 s of an outage), and
# the API server asked whether it answers every 0.2 s.
FAST = dict(
    request_backoffs=(0.1, 0.1), restart_delay=0.05, max_restart_delay=0.4, api_check_interval=0.2
)
OUTAGE = 4.0

WEB = ObjectKey("Service", "shop", "web")
API = ObjectKey("Service", "shop", "api")


@contextlib.asynccontextmanager
async def own_operator(
    identity: str,
    store: Store | None = None,
    *,
    status: Any = None,
    report: Any = None,
    **options: Any,
) -> AsyncIterator[tuple[Operator, asyncio.Task[None]]]:
    """An operator with credentials of its own ($KUBECONFIG's, read again after a 401), FAST,
    once it has listed the cluster; stopped at the end."""
    options = {"initial_sync_timeout": 2.0, **FAST, **options}
    operator = Operator(
        store or Store(), status, OperatorOptions(identity=identity, **options), report=report
    )
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(operator.run(stop=stop, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), DEADLINE)
        yield operator, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def outage(front: ApiFront, how: str) -> None:
    if how == "refused":
        await front.refuse()
    else:
        await front.answer(int(how))


@pytest.mark.parametrize("how", ["refused", "503", "500", "401", "403"])
async def test_an_outage_longer_than_a_few_restarts_is_outlived_and_followed_after(
    kube: Kube,
    api_front: ApiFront,
    start_operator: Any,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """(401 and 403 too: an API server being upgraded answers them while its authenticator and
    authorizer start.) Before 2026-11-22 the operator ended at kopf's fifth stop in a row (the
    control plane exited 1, and its pod went into CrashLoopBackOff for minutes after the API
    server was back): after 16 s of 401s, 4 min 46 s of 503s or 403s."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    for name in ("web", "api"):
        await kube.create(service(name))
    store, errors = Store(), []
    handle = await start_operator(store, server=api_front.server, report=errors.append, **FAST)
    await eventually(lambda: store.get(WEB) and store.get(API), "web and api in the store")
    kept = {k: store.get(k) for k in store.keys()}

    await outage(api_front, how)
    began = time.monotonic()
    while time.monotonic() - began < OUTAGE:
        assert not handle.task.done(), f"the operator ended: {handle.task.exception()!r}"
        assert {k: store.get(k) for k in store.keys()} == kept, "the store changed"
        await asyncio.sleep(0.05)
    assert errors, "the outage was not reported"
    assert list(errors[-1]) == ["api-server"]
    assert errors[-1]["api-server"].startswith("not following the cluster since "), errors[-1]
    # meanwhile, in the cluster: api deleted, web changed (kopf's events for them are missed)
    await kube.delete("Service", "shop", "api")
    await kube.patch("Service", "shop", "web", {"spec": {"ports": [{"name": "http", "port": 81}]}})

    await api_front.restore()
    back = time.monotonic()
    await eventually(lambda: store.get(API) is None, "api gone from the store")
    port_81 = [{"name": "http", "port": 81}]
    await eventually(
        lambda: (store.get(WEB) or {}).get("spec", {}).get("ports") == port_81,
        "web's change in the store",
    )
    await kube.create(service("new"))
    await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in the store")
    await eventually(lambda: errors[-1] == {}, "the outage's end reported")
    assert time.monotonic() - back < 5, "slow to follow the cluster again"
    lines = [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "nodemesh.controlplane.kube" and r.levelno >= logging.WARNING
        and not r.getMessage().startswith("lease ")
    ]  # fmt: skip
    assert [level for level, _ in lines] == ["ERROR", "WARNING"], lines
    assert lines[0][1].startswith("not following the cluster since "), lines
    assert lines[1][1].startswith("following the cluster again after "), lines
    assert not handle.task.done()
    # kopf leaves errors in tasks nobody awaits (watchers failing after another one stopped
    # it, the second of its two discovery requests): asyncio logged each, with a 25-line
    # traceback, at every restart of kopf
    gc.collect()
    assert [r for r in caplog.records if "never retrieved" in r.getMessage()] == []


@pytest.mark.parametrize("code", [401, 403])
async def test_credentials_refused_from_the_start_end_the_operator(
    kube: Kube, api_front: ApiFront, start_operator: Any, code: int
) -> None:
    """A wrong token or a missing ClusterRoleBinding: nothing was ever listed, waiting does not
    heal it, and a control plane that stays up and not ready would hide it."""
    await kube.create(service("web"))
    await api_front.answer(code)
    handle = await start_operator(Store(), server=api_front.server, wait_ready=False, **FAST)
    done, _ = await asyncio.wait({handle.task}, timeout=DEADLINE)
    assert done, "the operator kept waiting"
    with pytest.raises(OperatorError, match=f"HTTP {code}") as raised:
        handle.task.result()
    assert "check the token or kubeconfig, and the RBAC" in str(raised.value)
    assert not handle.ready.is_set()


async def test_an_outage_before_the_first_listing_is_waited_out(
    kube: Kube, api_front: ApiFront, start_operator: Any
) -> None:
    """The control plane started while the API server is down (a node reboot during the
    upgrade): not ready, and it waits, however many times kopf stops."""
    await kube.create(service("web"))
    await api_front.answer(503)
    store = Store()
    handle = await start_operator(store, server=api_front.server, wait_ready=False, **FAST)
    done, _ = await asyncio.wait({handle.task}, timeout=OUTAGE)
    assert not done, f"the operator ended: {handle.task.exception()!r}"
    assert not handle.ready.is_set() and store.keys() == []
    await api_front.restore()
    await asyncio.wait_for(handle.ready.wait(), DEADLINE)
    assert store.keys("Service") == [WEB]


async def test_a_token_rotated_during_the_run_is_read_again(
    kube: Kube, api_front: ApiFront, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service account token expires (bound tokens last an hour where the API server does
    not extend them) and the kubelet writes a new one into the pod. kopf asks our login
    handler again on a 401, which gave it the token read at start: once 401s no longer ended
    the operator, it would have stayed on the expired token for good, where a restarted
    control plane reads the new one."""

    def kubeconfig(token: str) -> None:
        write_kubeconfig(tmp_path / "kubeconfig", api_front.server, token)

    kubeconfig("first")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    await kube.create(service("web"))
    store, errors = Store(), []
    async with own_operator("rotating", store, report=errors.append) as (_, task):
        api_front.expired_tokens.add("Bearer first")
        await api_front.refuse()  # watch streams end (at the latest after their 5 minutes)
        await api_front.restore()
        await eventually(lambda: errors and errors[-1], "the outage reported")
        kubeconfig("second")  # the kubelet's new token
        await kube.create(service("new"))
        await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in store")
        await eventually(lambda: errors[-1] == {}, "the outage's end reported")
        assert not task.done()
        lease = await eventually(
            lambda: kube.get("Lease", "nodemesh", "nodemesh-controlplane"), "the Lease"
        )
        renewed = lease["spec"]["renewTime"]
        await eventually(
            lambda: _renewed_since(kube, renewed), "the Lease renewed with the new token"
        )


async def _renewed_since(kube: Kube, renewed: str) -> bool:
    lease = await kube.get("Lease", "nodemesh", "nodemesh-controlplane")
    return bool(lease) and lease["spec"]["renewTime"] != renewed  # type: ignore[index]


def write_kubeconfig(path: Path, server: str, token: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "nm", "user": {"token": token}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "nm",
                                                   "namespace": "nodemesh"}}],
    }))  # fmt: skip


async def test_a_kubeconfig_switched_to_another_cluster_is_not_followed(
    kube: Kube,
    api_front: ApiFront,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Credentials are read again after a 401 (a rotated token). A kubeconfig that names
    another API server by then (`kubectl config use-context` on the machine that runs the
    control plane) is another cluster: its objects would replace this cluster's in the store,
    and in every node Envoy, with no word of it. The API server of the start stays."""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    write_kubeconfig(tmp_path / "kubeconfig", api_front.server, "first")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    await kube.create(service("web"))
    store = Store()
    async with running_kube() as other, own_operator("switching", store) as (operator, _):
        await other.create(service("other"))
        write_kubeconfig(tmp_path / "kubeconfig", other.server, "second")
        api_front.expired_tokens.add("Bearer first")  # an API server restarting, say
        await api_front.refuse()
        await api_front.restore()
        elsewhere = ObjectKey("Service", "shop", "other")

        def said_or_switched() -> bool:
            said = any("another API server" in r.getMessage() for r in caplog.records)
            return said or store.get(elsewhere) is not None

        await eventually(said_or_switched, "the kubeconfig's other server said")
        assert store.get(elsewhere) is None, "the other cluster's Service is in the store"
        api_front.expired_tokens.clear()
        await kube.create(service("new"))
        await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new")
        assert [k.name for k in store.keys("Service")] == ["new", "web"]
        assert operator.connection.server == api_front.server


@pytest.mark.parametrize("kubeconfig", ["gone", "empty", "before-its-users"])
async def test_credentials_that_cannot_be_read_again_are_said_once(
    kube: Kube,
    api_front: ApiFront,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kubeconfig: str,
) -> None:
    """The API server refuses the token, and the kubeconfig to read a new one from is gone (or
    not yet written), or caught while kubectl writes it in place: empty, or ending before its
    users. The operator keeps its credentials and tries again at each of kopf's restarts and
    each check of the API server, with one WARNING, until it can read them. (A kubeconfig
    caught mid-write gave errors the operator did not take for unreadable credentials,
    `LoginError: Current context is not set`, `KeyError: 'nm'`: it ended, and the control
    plane exited 1.)"""
    caplog.set_level(logging.INFO, logger="nodemesh.controlplane.kube")
    config = tmp_path / "kubeconfig"
    write_kubeconfig(config, api_front.server, "first")
    monkeypatch.setenv("KUBECONFIG", str(config))
    await kube.create(service("web"))
    store = Store()

    def said(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    async with own_operator("unread", store) as (_, task):
        if kubeconfig == "gone":
            config.unlink()
        else:
            text = config.read_text()
            config.write_text("" if kubeconfig == "empty" else text[: text.index("users:")])
        api_front.expired_tokens.add("Bearer first")
        await api_front.refuse()
        await api_front.restore()

        def restarted_or_ended() -> bool:
            return task.done() or len(said("kopf stopped (")) >= 5

        await eventually(restarted_or_ended, "five restarts of kopf")
        assert not task.done(), f"the operator ended: {task.exception()!r}"
        assert len(said("cannot read Kubernetes credentials")) == 1, said("cannot read")
        write_kubeconfig(config, api_front.server, "second")
        await kube.create(service("new"))
        await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in store")
        assert said("credentials read again")


@pytest.mark.parametrize("where", ["data", "files"])
async def test_status_is_written_with_a_client_certificate_read_again(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A kubeconfig with a client certificate (kubeadm's, kind's, minikube's): the certificate
    is renewed and the old one refused (401). The credentials read again reached kopf, the
    Lease and the lists, but the status writes kept the TLS session of the start, with the old
    certificate: no status was written again until a restart, and `kubectl wait` on a route
    hung. A certificate in a file (`client-certificate: <path>`) was no change at all."""
    pki = Pki()
    front = await ApiFront(kube.server, tls=pki.server_context(tmp_path)).start()
    config = tmp_path / "kubeconfig"

    def kubeconfig(name: str) -> None:
        tls_kubeconfig(config, pki, front.server, name, where)

    kubeconfig("first")
    monkeypatch.setenv("KUBECONFIG", str(config))
    policy = ObjectKey("TrafficPolicy", "shop", "web")
    await kube.create({
        "apiVersion": "nodemesh.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "web", "namespace": "shop"}, "spec": {},
    })  # fmt: skip
    verdict = {"reason": "First"}

    def status(key: ObjectKey) -> dict[str, Any] | None:
        if key != policy:
            return None
        return {"conditions": [{"type": "Accepted", "status": "True", **verdict}]}

    async def live_reason() -> Any:
        obj = await kube.get("TrafficPolicy", "shop", "web")
        return ((obj or {}).get("status") or {}).get("conditions", [{}])[0].get("reason")

    try:
        async with own_operator("renewed", status=status, leader_election=False):
            await eventually(lambda: _is(live_reason(), "First"), "the first status written")
            kubeconfig("second")
            front.expired_certificates.add("first")
            await front.refuse()
            await front.restore()
            verdict["reason"] = "Second"
            patch = {"metadata": {"labels": {"a": "b"}}}
            await kube.patch("TrafficPolicy", "shop", "web", patch)
            await eventually(lambda: _is(live_reason(), "Second"), "the status written again")
            assert await live_reason() == "Second"  # written with the renewed certificate
    finally:
        await front.stop()


async def _is(value: Any, wanted: Any) -> bool:
    return bool(await value == wanted)


def tls_kubeconfig(config: Path, pki: Pki, server: str, name: str, where: str) -> None:
    """A kubeconfig with a client certificate named `name`, in it or in files next to it."""
    cert, key = pki.client(name)
    b64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    user = {"client-certificate-data": b64(cert), "client-key-data": b64(key)}
    if where == "files":
        (config.parent / "client.crt").write_text(cert)
        (config.parent / "client.key").write_text(key)
        user = {
            "client-certificate": str(config.parent / "client.crt"),
            "client-key": str(config.parent / "client.key"),
        }
    config.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {
            "server": server, "certificate-authority-data": b64(pki.ca)}}],
        "users": [{"name": "nm", "user": user}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "nm",
                                                   "namespace": "nodemesh"}}],
    }))  # fmt: skip


async def test_the_lease_outlives_a_client_certificate_file_it_cannot_load(
    kube: Kube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The certificate files a kubeconfig names are loaded again after a 401, and may be half
    written then (or gone): the Lease client stopped for good on the TLS error, and this
    replica never held the Lease again, nor wrote status."""
    pki = Pki()
    front = await ApiFront(kube.server, tls=pki.server_context(tmp_path)).start()
    config = tmp_path / "kubeconfig"
    tls_kubeconfig(config, pki, front.server, "first", "files")
    monkeypatch.setenv("KUBECONFIG", str(config))
    await kube.create(service("web"))
    lease = dict(lease_duration=3.0, renew_deadline=2.0, retry_period=0.3)
    try:
        async with own_operator("loading", **lease) as (operator, _):
            await eventually(lambda: operator.is_leader, "the Lease held")
            (tmp_path / "client.crt").write_text("half written")
            front.expired_certificates.add("first")
            await front.refuse()
            await front.restore()
            await eventually(lambda: not operator.is_leader, "the Lease lost")
            tls_kubeconfig(config, pki, front.server, "second", "files")
            await eventually(lambda: operator.is_leader, "the Lease held again")
            held = await kube.get("Lease", "nodemesh", "nodemesh-controlplane")
            assert held is not None and held["spec"]["holderIdentity"] == "loading", held
    finally:
        await front.stop()


async def test_credentials_read_again_for_this_api_server_under_another_name_are_used(
    kube: Kube, api_front: ApiFront, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kubeconfig written again with the token renewed names the API server by another name
    (a DNS name for its address, a tool's rewrite): the new token is taken, to the API server
    of the start, and the cluster is followed again."""
    write_kubeconfig(tmp_path / "kubeconfig", api_front.server, "first")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    await kube.create(service("web"))
    store = Store()
    async with own_operator("renamed", store) as (operator, _):
        renamed = api_front.server.replace("127.0.0.1", "localhost")
        write_kubeconfig(tmp_path / "kubeconfig", renamed, "second")
        api_front.expired_tokens.add("Bearer first")
        await api_front.refuse()
        await api_front.restore()
        await kube.create(service("new"))
        await eventually(lambda: store.get(ObjectKey("Service", "shop", "new")), "new in store")
        assert operator.connection.server == api_front.server
