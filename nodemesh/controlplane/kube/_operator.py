"""`Operator`: kopf embedded next to the other servers, feeding the store and writing status."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import functools
import itertools
import logging
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable, Collection, Coroutine, Generator, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
import kopf
import yaml

from nodemesh.controlplane.kube._errors import OperatorError
from nodemesh.controlplane.kube._feed import Feed
from nodemesh.controlplane.kube._handlers import CONTEXT_KEY, Context, build_registry
from nodemesh.controlplane.kube._lease import LeaseElector
from nodemesh.controlplane.kube._listing import answers, existing, unlisted
from nodemesh.controlplane.kube._peers import peer_targets
from nodemesh.controlplane.kube._resources import by_kind
from nodemesh.controlplane.kube._status import Leadership, StatusSource, StatusWriter, always_leader
from nodemesh.controlplane.peers import Peers
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
    # kopf stops on what it does not retry for good: a watch stream's ERROR event that is not
    # 410 Gone, an API server answering 5xx or 403 to every try of a request (kopf's tries are
    # `request_backoffs` apart, None: kopf's own 1, 1, 2, 3, 5, 8, 13, 21 s), its credentials
    # refused (401). It is started again after `restart_delay`, doubling to `max_restart_delay`
    # while it stops before it has listed the cluster, however long the API server takes, the
    # store and xDS serving what they had; at once when the API server answers again. Only
    # before the first complete listing do refused credentials (401, 403) end the operator
    # (OperatorError): a wrong token or missing RBAC, which waiting does not heal.
    # The operator's own tasks (the feed, the status writer, the Lease elector, the API server
    # check) are started again after the same delays when they fail (see `Operator._supervise`).
    restart_delay: float = 1.0
    max_restart_delay: float = 30.0
    request_backoffs: tuple[float, ...] | None = None
    # How often the operator asks the API server (a list of one Node) whether it answers, once
    # the cluster is listed: to tell an outage (logs, `report`) and when it ends.
    api_check_interval: float = 5.0
    # Programmed across replicas: the control plane's own Service (in the Lease's namespace)
    # whose ready endpoints are the peers, and its port serving their `/programmed` (see
    # `nodemesh.controlplane.peers`); None: this replica counts only its own node Envoys.
    peers_service: str | None = None
    peers_port: str = "http"
    peers_interval: float = 1.0


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
        except kopf.LoginError as exc:  # no current context: an empty kubeconfig, say
            raise OperatorError(f"cannot read Kubernetes credentials: {exc}") from exc
        except (KeyError, TypeError, AttributeError) as exc:
            # kopf's reader does not check a kubeconfig's shape: one caught while it is
            # written (kubectl writes it in place) may end before the user its context names
            raise OperatorError(
                "cannot read Kubernetes credentials: the kubeconfig is incomplete or not one "
                f"({type(exc).__name__}: {exc})"
            ) from exc
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
        if task.done() and not task.cancelled():
            # Said already, by kopf's stop. kopf leaves errors in tasks nobody awaits (the
            # watchers that failed after the first one stopped it, one of its two discovery
            # requests), which asyncio logs with a traceback each, at every restart of kopf
            # while the API server is down.
            task.exception()


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


# Where the operator reports what is wrong, by where: {} when nothing is, else
# {"api-server": why} while it does not follow the cluster, and {"<task>": why} while one of its
# tasks fails (see `Operator._supervise`). The CLI passes `pipeline.set_source_errors` for
# source "kubernetes", which shows it in /status.
Report = Callable[[Mapping[str, str]], None]


def _no_report(errors: Mapping[str, str]) -> None:
    pass


class _Problems:
    """What is wrong now, by where; `report`ed whole at each change."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self._now: dict[str, str] = {}

    def set(self, where: str, why: str | None) -> None:
        """`why` is wrong at `where` (None: nothing is any more)."""
        if self._now.get(where) == why:
            return
        if why is None:
            del self._now[where]
        else:
            self._now[where] = why
        self._report(dict(self._now))


# The operator's own tasks: their names (the asyncio tasks'), where /status shows them failing,
# and what the log calls them.
_TASKS = {
    "feed": "the feed (kopf's indexes to the store)",
    "status-writer": "the status writer",
    "lease-elector": "the Lease elector",
    "api-check": "the API server check",
    "peers": "the poll of the peer replicas' verdicts",
}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Outage:
    """Whether the store follows the cluster, said once per outage: an ERROR when it begins,
    a WARNING with how long it lasted when it ends, and `report`ed while it lasts."""

    def __init__(self, problems: _Problems) -> None:
        self._problems = problems
        self.since: float | None = None  # time.monotonic()
        self._wall = ""
        self._why = ""

    @property
    def down(self) -> bool:
        return self.since is not None

    def begin(self, why: str) -> None:
        if self.since is None:
            self.since = time.monotonic()
            self._wall = _now()
            log.error(
                "not following the cluster since %s (%s): serving the config of then, "
                "and retrying until the API server answers",
                self._wall,
                why,
            )
        elif why == self._why:
            return
        self._why = why
        self._problems.set("api-server", f"not following the cluster since {self._wall} ({why})")

    def end(self) -> None:
        if self.since is None:
            return
        lasted = time.monotonic() - self.since
        self.since = None
        log.warning(
            "following the cluster again after %s without it (since %s; last: %s)",
            _duration(lasted),
            self._wall,
            self._why,
        )
        self._problems.set("api-server", None)


def _in_files(connection: kopf.ConnectionInfo) -> bool:
    """Whether TLS material is read from files (a kubeconfig's `client-certificate: <path>`),
    which are read when a session is made."""
    return bool(connection.certificate_path or connection.private_key_path or connection.ca_path)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _describe(why: BaseException | str) -> str:
    """kopf's reason for stopping, in a few words (its API errors' str() is a tuple)."""
    if isinstance(why, kopf.LoginError):
        return "the API server refuses the credentials (HTTP 401)"
    status = getattr(why, "status", None)  # kopf's APIError
    if isinstance(status, int):
        message = getattr(why, "message", None)
        return f"HTTP {status}: {message}" if message else f"HTTP {status}"
    return str(why) or repr(why)


def _credentials_refused(why: BaseException | str) -> bool:
    return isinstance(why, kopf.LoginError) or getattr(why, "status", None) in (401, 403)


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
        report: Report | None = None,
    ) -> None:
        self.options = options or OperatorOptions()
        # Credentials of its own (not given) are read again when the API server refuses them:
        # the kubelet replaces a service account token before it expires.
        self._reads_credentials = connection is None
        self._other_server = ""  # another API server the credentials read again named, said once
        self._unreadable = ""  # why the credentials could not be read again, said once
        self.connection = connection or default_connection()
        self._problems = _Problems(report or _no_report)
        self._outage = _Outage(self._problems)
        self._memo = kopf.Memo()  # what kopf passes the handlers (see `_handlers.Context`)
        self._kopf_started: float | None = None  # time.monotonic() of the running kopf's start
        self._api_back = asyncio.Event()  # the API server answers again after it did not
        self.feed = Feed(
            store,
            initial_sync_timeout=self.options.initial_sync_timeout,
            probe=lambda: unlisted(self.connection, self.options.namespaces),
            existing=lambda r: existing(self.connection, self.options.namespaces, r),
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
                on_problem=self._lease_problem,
            )
            leadership = self.elector
        self.peers: Peers | None = None
        if self.options.peers_service:
            namespace = (
                self.options.lease_namespace or self.connection.default_namespace or "default"
            )
            watched = self.options.namespaces
            if watched and namespace not in watched:
                raise OperatorError(
                    f"--peers-service {self.options.peers_service}: its namespace {namespace} "
                    f"is not watched (add --namespace {namespace})"
                )
            self.peers = Peers(
                functools.partial(
                    peer_targets,
                    store,
                    namespace,
                    self.options.peers_service,
                    self.options.peers_port,
                    self.options.identity,
                ),
                interval=self.options.peers_interval,
            )
        self.status = StatusWriter(
            status or _no_status,
            leadership,
            rate=self.options.status_rate,
            interval=self.options.status_interval,
        )

    def _lease_problem(self, why: str | None) -> None:
        """The elector's word on a Lease it cannot take (None: it can again). Not shown while
        the operator does not follow the cluster: the same refusal (credentials revoked, the
        Role gone) is that outage, reported as one (`api-server`). The elector says it again
        at each failed try, so it shows once the outage alone is over."""
        self._problems.set("lease", None if self._outage.down else why)

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
        if self.options.request_backoffs is not None:
            settings.networking.error_backoffs = self.options.request_backoffs
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
        memo = self._memo
        memo[CONTEXT_KEY] = Context(self.feed, self.status, self.connection)
        ns = self.options.namespaces
        self.status.start()
        api = _StatusApi(self)
        runs: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            "feed": lambda: self.feed.run(ready),
            "status-writer": lambda: self.status.run(self.feed.lookup, api.patch_status),
        }
        elector = self.elector
        if elector is not None:
            runs["lease-elector"] = elector.run
        runs["api-check"] = self._check_api
        peers = self.peers
        if peers is not None:
            runs["peers"] = peers.run
        tasks = [
            asyncio.create_task(self._supervise(name, run), name=f"nodemesh-kube-{name}")
            for name, run in runs.items()
        ]
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

    async def _supervise(self, name: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run `run()` until cancelled, and again when it fails: a bug, or an answer nobody
        foresaw (a Lease that cannot be read), would otherwise end the task without a word,
        the rest running on: the store no longer following the cluster, or no status written,
        or the Lease never renewed, with /readyz still 200. An ERROR (the traceback the first
        time, and when the error changes), an entry in `report` until the task has run
        `max_restart_delay` without failing, and `run()` again after `restart_delay`, doubling
        to `max_restart_delay` while it fails within that of its start. Not an exit: every
        replica reads the same cluster, and would fail alike, into CrashLoopBackOff; a
        restarted one serves nothing until it has listed the whole cluster again."""
        what = _TASKS[name]
        longest = self.options.max_restart_delay
        loop = asyncio.get_running_loop()
        failures, last, since = 0, "", ""
        healthy: asyncio.TimerHandle | None = None

        def recovered() -> None:
            nonlocal failures, last
            log.info("%s runs again, after %d failure(s) since %s", what, failures, since)
            failures, last = 0, ""
            self._problems.set(name, None)

        try:
            while True:
                started = time.monotonic()
                try:
                    await run()
                    raise RuntimeError("it ended")  # none of them ends unless cancelled
                except Exception as exc:
                    error = exc
                if healthy is not None:
                    healthy.cancel()
                    healthy = None
                if failures == 0 or time.monotonic() - started >= longest:
                    failures, last, since = 0, "", _now()
                failures += 1
                delay = min(longest, self.options.restart_delay * 2 ** min(failures - 1, 16))
                why = f"{type(error).__name__}: {error}"
                log.error(
                    "%s failed (%s); starting it again in %.1fs%s",
                    what,
                    why,
                    delay,
                    "" if why != last else f" (the same error, {failures} times in a row)",
                    exc_info=error if why != last else None,
                )
                last = why
                self._problems.set(
                    name,
                    f"{what} failed {failures} time(s) since {since}, last: {why}; "
                    "started again after each (see the log)",
                )
                await asyncio.sleep(delay)
                healthy = loop.call_later(longest, recovered)
        finally:
            if healthy is not None:
                healthy.cancel()

    async def _run_kopf(self, stop: asyncio.Event, memo: kopf.Memo) -> None:
        """Run kopf until `stop` is set, starting it again whenever it stops on its own (see
        `OperatorOptions.restart_delay`); raises OperatorError if the API server refuses the
        credentials before the cluster was ever listed."""
        _track_tasks()
        ns = self.options.namespaces
        failures = 0
        while True:
            started = self._kopf_started = time.monotonic()
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
                self._kopf_started = None
                _KOPF_TASKS.reset(token)
                await _cancel(owned)
            if stop.is_set():
                return
            if not self.feed.synced and _credentials_refused(why):
                raise OperatorError(
                    f"{_describe(why)}: check the token or kubeconfig, and the RBAC "
                    "(charts/nodemesh/templates/rbac.yaml)"
                )
            if _credentials_refused(why):
                await self._read_credentials()
            # A kopf that listed the cluster was no failure to start: back to the first delay.
            failures = 1 if self.feed.heard > started else failures + 1
            delay = min(
                self.options.max_restart_delay,
                self.options.restart_delay * 2 ** min(failures - 1, 16),
            )
            if self.feed.synced:
                self._outage.begin(f"kopf stopped: {_describe(why)}")
            log.log(
                logging.INFO if self._outage.down else logging.ERROR,
                "kopf stopped (%s); starting it again in %.1fs, the store and xDS as they were",
                _describe(why),
                delay,
            )
            self._api_back.clear()
            waits = {
                asyncio.create_task(stop.wait()),
                asyncio.create_task(self._api_back.wait()),  # no need to wait longer
            }
            try:
                await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if stop.is_set():
                return

    async def _read_credentials(self) -> None:
        """Read the credentials again, if they are the operator's own: kopf's login handler,
        the Lease, the status writes and our own lists use them from now on, with the API
        server of the start."""
        if not self._reads_credentials:
            return
        try:
            connection = default_connection()
        except OperatorError as exc:  # kept: the file may be back by the next try
            # Said once: this is tried at each restart of kopf and each check of the API server.
            if str(exc) != self._unreadable:
                self._unreadable = str(exc)
                log.warning("%s; keeping the credentials read before, and trying again", exc)
            return
        self._unreadable = ""
        if connection == self.connection and not _in_files(connection):
            return
        if connection.server.rstrip("/") != self.connection.server.rstrip("/"):
            # Another cluster (a kubeconfig's context switched), whose objects would replace
            # this cluster's in the store and in every node Envoy; or this one under another
            # name. Either way the server stays: a restart follows another cluster, and this
            # one takes the credentials if they are its own.
            if connection.server != self._other_server:
                self._other_server = connection.server
                log.warning(
                    "credentials read again name another API server, %s: this control plane "
                    "stays on %s (until it is restarted) and tries them there",
                    connection.server,
                    self.connection.server,
                )
            connection = replace(connection, server=self.connection.server)
            if connection == self.connection and not _in_files(connection):
                return
        if connection != self.connection:
            log.info("credentials read again: the API server refused those read before")
        # (else the same paths, whose files may hold a renewed certificate: the TLS sessions,
        # which loaded them when made, are made again)
        self.connection = connection
        self._memo[CONTEXT_KEY] = Context(self.feed, self.status, connection)
        if self.elector is not None:
            await self.elector.use(connection)

    async def _check_api(self) -> None:
        """Ask the API server every `api_check_interval` whether it answers: kopf retries a
        refused or timed-out connection for good without telling, and stops on 5xx only after
        about a minute of its own retries. Begins and ends `_outage`; wakes a kopf waiting to
        be started again when the API server answers after it did not."""
        failing = False
        while True:
            await asyncio.sleep(self.options.api_check_interval)
            if not self.feed.synced:
                continue  # the feed says why the first listing is not complete
            try:
                why = await answers(self.connection)
            except Exception:  # a bug: said, and asked again next time
                log.exception("checking whether the API server answers failed")
                continue
            if why is not None:
                failing = True
                self._outage.begin(f"the API server does not answer: {why}")
                if why == "HTTP 401":  # kopf, at its next login, gets the new ones too
                    await self._read_credentials()
                continue
            if failing:
                failing = False
                self._api_back.set()
            if self._outage.down and self._kopf_follows():
                self._outage.end()

    def _kopf_follows(self) -> bool:
        """kopf runs and has listed the cluster: it ran through the outage (its watch streams
        reconnect when the API server answers, within its own backoff), or a handler was
        called since it started (kopf calls them only once every kind is listed)."""
        started, since = self._kopf_started, self._outage.since
        if started is None or since is None:
            return False
        return started < since or self.feed.heard > started


class _StatusApi:
    """The status writes' HTTP session, with the operator's credentials of the moment (read
    again after a 401): a client certificate and the CA are in the session's TLS context, so
    the session is made again when they change."""

    def __init__(self, operator: Operator) -> None:
        self._operator = operator
        self._session: aiohttp.ClientSession | None = None
        self._connection: kopf.ConnectionInfo | None = None

    async def patch_status(self, key: ObjectKey, body: Any) -> int:
        """A merge patch to `key`'s status subresource; the HTTP status code."""
        connection = self._operator.connection
        if self._session is None or connection is not self._connection:
            await self.close()
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=connection.as_ssl_context()),
                timeout=aiohttp.ClientTimeout(total=10.0),
            )
            self._connection = connection
        r = by_kind(key.kind)
        path = connection.server.rstrip("/")
        path += f"/apis/{r.group}/{r.version}" if r.group else f"/api/{r.version}"
        if r.namespaced:
            path += f"/namespaces/{key.namespace}"
        async with self._session.patch(
            f"{path}/{r.plural}/{key.name}/status",
            json=body,
            headers={
                **connection.as_http_headers(),
                "Content-Type": "application/merge-patch+json",
            },
        ) as resp:
            return resp.status

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def run_operator(
    store: Store,
    status: StatusSource | None = None,
    *,
    options: OperatorOptions | None = None,
    connection: kopf.ConnectionInfo | None = None,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    report: Report | None = None,
    use_peers: Callable[[Peers], None] | None = None,
) -> None:
    """Watch the cluster into `store` and write `status(key)` back, until `stop` is set.
    `report(problems)` at each change of what is wrong: `{"api-server": why}` while the store
    does not follow the cluster, `{"<task>": why}` while one of its tasks fails, `{}` once
    nothing is. `use_peers(peers)` is called before it starts when `options.peers_service` is
    set (`Pipeline.use_peers`)."""
    operator = Operator(store, status, options, connection=connection, report=report)
    if operator.peers is not None and use_peers is not None:
        use_peers(operator.peers)
    await operator.run(stop=stop, ready=ready)
