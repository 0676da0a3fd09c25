"""`Operator`: kopf embedded next to the other servers, feeding the store and writing status."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import os
import signal
import socket
import threading
import weakref
from collections.abc import Collection, Coroutine, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import kopf
import yaml

from nodemesh.controlplane.kube._errors import OperatorError
from nodemesh.controlplane.kube._feed import Feed
from nodemesh.controlplane.kube._handlers import CONTEXT_KEY, Context, build_registry
from nodemesh.controlplane.kube._lease import LeaseElector
from nodemesh.controlplane.kube._listing import existing, unlisted
from nodemesh.controlplane.kube._resources import by_kind
from nodemesh.controlplane.kube._status import Leadership, StatusSource, StatusWriter, always_leader
from nodemesh.controlplane.store import ObjectKey, Store

__all__ = ["FINALIZER", "Operator", "OperatorOptions", "default_connection", "run_operator"]

log = logging.getLogger("nodemesh.controlplane.kube")

# The finalizer an older nodemesh had kopf put on routes and policies, for its status timers.
# Named in kopf's settings, so that kopf removes it wherever it is left (see `build_registry`).
FINALIZER = "nodemesh.io/status-writer"


@dataclass(frozen=True, slots=True)
class OperatorOptions:
    """How the operator runs. The defaults suit one replica watching all namespaces."""

    namespaces: tuple[str, ...] = ()  # () means all namespaces (cluster-wide)
    identity: str = field(default_factory=lambda: default_identity())
    leader_election: bool = True
    lease_namespace: str | None = None  # default: the service account's namespace, else "default"
    lease_name: str = "nodemesh-controlplane"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    status_interval: float = 1.0  # per object: at most one status write per interval
    status_rate: float = 50.0  # all objects: at most this many status writes per second
    # After this long without a complete listing, and every this long after, the operator asks
    # the API server whether the cluster is empty (ready) or not listed yet (log, keep waiting).
    initial_sync_timeout: float = 10.0
    # kopf stops on a watch stream's ERROR event that is not 410 Gone (an API server's 500):
    # it is started again after `restart_delay` (doubling, at most 30 s), keeping the store and
    # xDS. After `restart_limit` stops in a row, each within a minute of its start, the
    # operator ends (OperatorError): the cluster cannot be followed.
    restart_delay: float = 1.0
    restart_limit: int = 5


def default_identity() -> str:
    """The Lease holder name: the pod's name (downward API `POD_NAME`), else the hostname."""
    return os.environ.get("POD_NAME") or socket.gethostname()


def _no_status(key: ObjectKey) -> Mapping[str, Any] | None:
    return None


def default_connection() -> kopf.ConnectionInfo:
    """In-cluster service account credentials, else the kubeconfig (kopf's own readers)."""
    settings = kopf.OperatorSettings()
    for login in (kopf.login_with_service_account, kopf.login_with_kubeconfig):
        try:
            info = login(settings=settings, logger=log)
        except (OSError, ValueError, yaml.YAMLError) as exc:  # a $KUBECONFIG naming no file
            raise OperatorError(f"cannot read Kubernetes credentials: {exc}") from exc
        if info is not None:
            assert isinstance(info, kopf.ConnectionInfo)
            return info
    raise OperatorError("no Kubernetes credentials: neither a service account nor a kubeconfig")


class _NoSweep(Collection["asyncio.Task[Any]"]):
    """For `kopf.run_tasks(ignored=...)`: a collection that contains every task.

    `kopf.operator()` passes the tasks that existed at its start, and at exit waits 5 s for, then
    cancels, every other task on the loop: the ADS server's streams, and in tests the other
    replica's kopf. kopf's root tasks already stop what they spawned, so nothing is swept.
    """

    def __contains__(self, task: object) -> bool:
        return True

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(())

    def __len__(self) -> int:
        return 0


# The tasks of the kopf run that is creating them, each with its place in the order of creation
# (see `_TaskTracker`).
_Owned = weakref.WeakKeyDictionary[asyncio.Future[Any], int]
_KOPF_TASKS: contextvars.ContextVar[_Owned | None] = contextvars.ContextVar(
    "nodemesh_kopf_tasks", default=None
)
_created = itertools.count()
_T = TypeVar("_T")


class _TaskTracker:
    """A loop task factory that adds each task to the set in `_KOPF_TASKS` of its creator's
    context. Tasks inherit their creator's context, so a kopf run's set ends up holding every
    task that run created, directly or not, and no other: not the ADS server's, nor another
    operator's on the same loop.

    Why: kopf stops on a watch stream's error leaving the other watch streams and their workers
    running (its own `run_tasks` would cancel every task born after it started, which `_NoSweep`
    prevents); those are cancelled before kopf is started again."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, _T] | Generator[Any, None, _T],
        /,
        **kwargs: Any,
    ) -> asyncio.Future[_T]:
        task: asyncio.Future[_T]
        if self.previous is not None:
            task = self.previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        owned = _KOPF_TASKS.get()
        if owned is not None:
            owned[task] = next(_created)
        return task


def _track_tasks() -> None:
    loop = asyncio.get_running_loop()
    factory = loop.get_task_factory()
    if not isinstance(factory, _TaskTracker):
        loop.set_task_factory(_TaskTracker(factory))


async def _cancel(owned: _Owned) -> None:
    """Cancel the tasks in `owned` one at a time, oldest first: a task that started others
    stops them in its own way (kopf's watch stream closes its connection before its pause
    waiter ends; cancelled the other way round, kopf fails an assertion)."""
    current = asyncio.current_task()
    for task, _ in sorted(owned.items(), key=lambda item: item[1]):
        if not task.done() and task is not current:
            task.cancel()
            await asyncio.wait({task}, timeout=5)


def _take_back_signals(stop: asyncio.Event) -> None:
    """kopf.spawn_tasks() points SIGINT/SIGTERM of the main thread's loop at itself, and the
    host (the CLI, which drains the ADS server on these signals) would never hear of them.
    Point them at `stop`: the host passes the same event its own handlers set."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


class Operator:
    """One kopf operator instance writing into `store`; several may share a process.

    Usage::

        op = Operator(store, pipeline_status, OperatorOptions(namespaces=("shop",)))
        await op.run(stop=stop_event, ready=ready_event)   # returns after `stop` is set
    """

    def __init__(
        self,
        store: Store,
        status: StatusSource | None = None,
        options: OperatorOptions | None = None,
        *,
        connection: kopf.ConnectionInfo | None = None,
    ) -> None:
        self.options = options or OperatorOptions()
        self.connection = connection or default_connection()
        self.feed = Feed(
            store,
            initial_sync_timeout=self.options.initial_sync_timeout,
            probe=functools.partial(unlisted, self.connection, self.options.namespaces),
            existing=functools.partial(existing, self.connection, self.options.namespaces),
        )
        self.elector: LeaseElector | None = None
        leadership: Leadership = always_leader
        if self.options.leader_election:
            self.elector = LeaseElector(
                self.connection,
                self.options.lease_namespace or self.connection.default_namespace or "default",
                self.options.lease_name,
                self.options.identity,
                lease_duration=self.options.lease_duration,
                renew_deadline=self.options.renew_deadline,
                retry_period=self.options.retry_period,
            )
            leadership = self.elector
        self.status = StatusWriter(
            status or _no_status,
            leadership,
            rate=self.options.status_rate,
            interval=self.options.status_interval,
        )

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader if self.elector is not None else True

    def settings(self) -> kopf.OperatorSettings:
        settings = kopf.OperatorSettings()
        settings.posting.enabled = False  # we log; no Events RBAC needed
        settings.scanning.disabled = True  # no CRD/namespace watching: restart after adding CRDs
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = 300
        # kopf SIGKILLs its thread (here: the whole control plane, mid-drain) if it is still
        # exiting after this long when stopped by anything but the stop flag.
        settings.process.ultimate_exiting_timeout = None
        return settings

    async def run(self, *, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Run kopf, the feed and the elector until `stop` is set; then release the lease.

        `ready` is set once the store holds the initial listing of every watched kind: start
        serving xDS only then, so that a restarted control plane never publishes a partial
        snapshot (Envoy would drop routes and clusters, then get them back).
        """
        # kopf logs every handler call at INFO ("Handler 'nm_event_pods' succeeded"): thousands
        # of lines per minute in a busy cluster, burying our accepted/rejected lines. Quieten it
        # unless the host configured these loggers itself.
        for name in ("kopf.objects", "kopf.activities"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        memo = kopf.Memo()
        memo[CONTEXT_KEY] = Context(self.feed, self.status, self.connection)
        ns = self.options.namespaces
        self.status.start()
        api = _session(self.connection)
        tasks = [
            asyncio.create_task(self.feed.run(ready), name="nodemesh-kube-feed"),
            asyncio.create_task(
                self.status.run(
                    self.feed.lookup, functools.partial(_patch_status, api, self.connection.server)
                ),
                name="nodemesh-kube-status",
            ),
        ]
        if self.elector is not None:
            tasks.append(asyncio.create_task(self.elector.run(), name="nodemesh-kube-lease"))
        log.info(
            "operator %s starting: %s",
            self.options.identity,
            f"namespaces {', '.join(ns)}" if ns else "all namespaces",
        )
        try:
            await self._run_kopf(stop, memo)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self.status.stop()
            await api.close()
            if self.elector is not None:
                await self.elector.release()
            log.info("operator %s stopped", self.options.identity)

    async def _run_kopf(self, stop: asyncio.Event, memo: kopf.Memo) -> None:
        """Run kopf until `stop` is set, starting it again when it stops on its own (see
        `OperatorOptions.restart_delay`); raises OperatorError once it keeps stopping."""
        _track_tasks()
        loop = asyncio.get_running_loop()
        ns = self.options.namespaces
        failures = 0
        while True:
            started = loop.time()
            owned: _Owned = weakref.WeakKeyDictionary()
            token = _KOPF_TASKS.set(owned)
            why: BaseException | str = "it ended without an error"
            try:
                # Not kopf.operator(): see `_NoSweep`.
                operator_tasks = await kopf.spawn_tasks(
                    registry=build_registry(),
                    settings=self.settings(),
                    memo=memo,
                    clusterwide=not ns,
                    namespaces=list(ns),
                    standalone=True,
                    stop_flag=stop,
                )
                _take_back_signals(stop)
                await kopf.run_tasks(operator_tasks, ignored=_NoSweep())
            except Exception as exc:
                why = exc
            finally:
                _KOPF_TASKS.reset(token)
                await _cancel(owned)
            if stop.is_set():
                return
            failures = failures + 1 if loop.time() - started < _STEADY else 1
            if failures >= self.options.restart_limit:
                raise OperatorError(f"kopf stopped {failures} times in a row: {why}")
            delay = min(_MAX_RESTART_DELAY, self.options.restart_delay * 2 ** (failures - 1))
            log.error(
                "kopf stopped (%s); starting it again in %.0fs, the store and xDS as they were",
                why,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return


def _session(connection: kopf.ConnectionInfo) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=connection.as_ssl_context()),
        headers=connection.as_http_headers(),
        timeout=aiohttp.ClientTimeout(total=10.0),
    )


async def _patch_status(
    session: aiohttp.ClientSession, server: str, key: ObjectKey, body: Any
) -> int:
    """A merge patch to `key`'s status subresource; the HTTP status code."""
    r = by_kind(key.kind)
    path = server.rstrip("/") + (f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}")
    if r.namespaced:
        path += f"/namespaces/{key.namespace}"
    async with session.patch(
        f"{path}/{r.plural}/{key.name}/status",
        json=body,
        headers={"Content-Type": "application/merge-patch+json"},
    ) as resp:
        return resp.status


# A kopf run that lasted this long was no failure to start: the next stop counts from one.
_STEADY = 60.0
_MAX_RESTART_DELAY = 30.0


async def run_operator(
    store: Store,
    status: StatusSource | None = None,
    *,
    options: OperatorOptions | None = None,
    connection: kopf.ConnectionInfo | None = None,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
) -> None:
    """Watch the cluster into `store` and write `status(key)` back, until `stop` is set."""
    await Operator(store, status, options, connection=connection).run(stop=stop, ready=ready)
