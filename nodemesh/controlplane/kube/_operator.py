"""`Operator`: kopf embedded next to the other servers, feeding the store and writing status."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf
import yaml

from nodemesh.controlplane.kube._errors import OperatorError
from nodemesh.controlplane.kube._feed import Feed
from nodemesh.controlplane.kube._handlers import CONTEXT_KEY, Context, build_registry
from nodemesh.controlplane.kube._lease import LeaseElector
from nodemesh.controlplane.kube._listing import existing, unlisted
from nodemesh.controlplane.kube._status import Leadership, StatusSource, StatusWriter, always_leader
from nodemesh.controlplane.store import ObjectKey, Store

__all__ = ["FINALIZER", "Operator", "OperatorOptions", "default_connection", "run_operator"]

log = logging.getLogger("nodemesh.controlplane.kube")

# kopf puts this finalizer on objects that have a status timer, so that it can stop the timer.
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
        self.status = StatusWriter(status or _no_status, leadership, rate=self.options.status_rate)

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
        tasks = [asyncio.create_task(self.feed.run(ready), name="nodemesh-kube-feed")]
        if self.elector is not None:
            tasks.append(asyncio.create_task(self.elector.run(), name="nodemesh-kube-lease"))
        log.info(
            "operator %s starting: %s",
            self.options.identity,
            f"namespaces {', '.join(ns)}" if ns else "all namespaces",
        )
        try:
            # Not kopf.operator(): see `_NoSweep`.
            operator_tasks = await kopf.spawn_tasks(
                registry=build_registry(status_interval=self.options.status_interval),
                settings=self.settings(),
                memo=memo,
                clusterwide=not ns,
                namespaces=list(ns),
                standalone=True,
                stop_flag=stop,
            )
            _take_back_signals(stop)
            await kopf.run_tasks(operator_tasks, ignored=_NoSweep())
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self.status.stop()
            if self.elector is not None:
                await self.elector.release()
            log.info("operator %s stopped", self.options.identity)
        if not stop.is_set():
            raise OperatorError("kopf exited without a stop request")


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
