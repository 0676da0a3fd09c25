"""`LeaseElector`: leader election on a `coordination.k8s.io/v1` Lease, as client-go does it.

Why not kopf peering: a kopf peer that is not the leader pauses all its watch streams, and
every nodemesh replica must keep watching to serve xDS. So every replica runs kopf in standalone
mode and only the status writes are gated on this Lease.

Expiry is judged by the local clock since the record was last seen to change (client-go's
approach), so replicas do not depend on synchronised clocks. Writes carry the observed
`resourceVersion`, so a real API server refuses (409) a takeover that raced another one.
Besides the operator's own lists (`_listing.py`) and the status writes, the one place that
talks to the API server outside kopf; it uses kopf's credentials.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import kopf

from nodemesh.controlplane.kube._errors import LeaseError
from nodemesh.controlplane.kube._resources import LEASE

__all__ = ["LeaseElector"]

log = logging.getLogger("nodemesh.controlplane.kube")


def _microtime(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Acquires and renews one Lease; `is_leader` says whether this replica holds it.

    Usage::

        elector = LeaseElector(conn, "nodemesh-system", "nodemesh-controlplane", "pod-a")
        task = asyncio.create_task(elector.run())
        ...
        await elector.release()   # on shutdown, so a peer takes over at once
        task.cancel()
    """

    def __init__(
        self,
        connection: kopf.ConnectionInfo,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool], None] | None = None,
        on_problem: Callable[[str | None], None] | None = None,
    ) -> None:
        self._conn = connection
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self._duration = lease_duration
        self._renew_deadline = renew_deadline
        self._retry = retry_period
        self._clock = clock
        self._on_change = on_change
        # told why this replica cannot take or renew the Lease, once that has lasted a lease
        # duration, and None when it can again (the operator shows it in /status)
        self._on_problem = on_problem
        self._leader = False
        self._last_renew = 0.0
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._released = False
        # The Lease's resourceVersion as this replica last wrote it: the release's precondition
        self._written: str | None = None
        self.transitions = 0

    @property
    def is_leader(self) -> bool:
        # A leader that could not renew within the deadline must stop acting as one at once.
        return self._leader and self._clock() - self._last_renew < self._renew_deadline

    @property
    def url(self) -> str:
        base = f"{self._conn.server.rstrip('/')}/apis/{LEASE.group}/{LEASE.version}"
        return f"{base}/namespaces/{self.namespace}/{LEASE.plural}"

    async def run(self) -> None:
        """Try to acquire or renew every `retry_period` until cancelled."""
        failed = 0  # tries in a row: an API server outage is one WARNING, not one per try
        since, since_wall, reported = 0.0, "", False
        try:
            while True:
                try:
                    await self.try_acquire_or_renew()
                except LeaseError as exc:
                    failed += 1
                    if failed == 1:
                        since = self._clock()
                        since_wall = datetime.datetime.now(datetime.UTC).strftime(
                            "%Y-%m-%dT%H:%M:%SZ"
                        )
                        # A Lease namespace that does not exist, or a name the Role does not
                        # grant: waiting mends neither, and no replica writes status meanwhile.
                        refused = exc.status in (401, 403, 404)
                        log.log(
                            logging.ERROR if refused else logging.WARNING,
                            "lease %s/%s: %s (said once until a try succeeds)%s",
                            self.namespace,
                            self.name,
                            exc,
                            "; check --lease-namespace, --lease-name and the Role"
                            if refused
                            else "",
                        )
                    else:
                        log.debug("lease %s/%s: %s", self.namespace, self.name, exc)
                    self._set_leader(self.is_leader)
                    # An API server that answers and refuses (4xx): a setting to fix. One that
                    # does not answer, or answers 5xx or 429, is an outage, which the operator
                    # reports already (its `api-server` entry).
                    refusal = exc.status is not None and 400 <= exc.status < 500
                    if (
                        self._on_problem is not None
                        and refusal
                        and exc.status != 429
                        and self._clock() - since >= self._duration
                    ):
                        self._on_problem(
                            f"cannot take or renew Lease {self.namespace}/{self.name} since "
                            f"{since_wall} ({exc}): this replica does not lead, so it writes "
                            "no status"
                        )
                        reported = True
                else:
                    if failed:
                        log.info(
                            "lease %s/%s: the API server answers again, after %d failed tries",
                            self.namespace,
                            self.name,
                            failed,
                        )
                    failed = 0
                    if reported and self._on_problem is not None:
                        self._on_problem(None)
                        reported = False
                await asyncio.sleep(self._retry)
        finally:
            await self._close()

    async def try_acquire_or_renew(self) -> bool:
        if self._released:
            return False  # released on shutdown: never take it back
        now = self._clock()
        lease = await self._get()
        if lease is None:
            created = await self._create()
            if created:
                self._last_renew = now
            self._set_leader(created)
            return created
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self._duration)
        expired = now - self._observed_at >= duration
        if holder and holder != self.identity and not expired:
            self._set_leader(False)
            return False
        new_spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self._duration),
            "renewTime": _microtime(),
        }
        if holder != self.identity:
            new_spec["acquireTime"] = new_spec["renewTime"]
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        version = (lease.get("metadata") or {}).get("resourceVersion")
        ok = await self._patch(new_spec, version)
        if ok:
            self._last_renew = now
            self._observed = (self.identity, new_spec["renewTime"], int(self._duration))
            self._observed_at = now
        self._set_leader(ok)
        return ok

    async def release(self) -> None:
        """Give the lease up (holder cleared, 1s duration) so that a peer takes over quickly.
        The elector does not try to acquire it again afterwards."""
        self._released = True
        if not self._leader:
            await self._close()
            return
        self._leader = False
        try:
            # On the Lease as this replica last wrote it: an elector that failed and was not
            # started again (see `Operator._supervise`) still takes it for its own, and
            # another replica may have taken it since, whose hold an unconditional release
            # cleared.
            spec = {"holderIdentity": None, "leaseDurationSeconds": 1, "renewTime": _microtime()}
            if await self._patch(spec, self._written):
                log.info("lease %s/%s released by %s", self.namespace, self.name, self.identity)
            else:
                log.info(
                    "lease %s/%s: not released by %s, written by another since",
                    self.namespace,
                    self.name,
                    self.identity,
                )
        except LeaseError as exc:
            log.warning("lease %s/%s: release failed: %s", self.namespace, self.name, exc)
        finally:
            await self._close()

    async def use(self, connection: kopf.ConnectionInfo) -> None:
        """Talk to the API server with these credentials from now on (a token read again)."""
        self._conn = connection
        await self._close()

    # -- HTTP ------------------------------------------------------------------------------
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            try:
                # Loads the files a kubeconfig names: they may be gone or half written (a
                # certificate being renewed), and the next try may find them whole.
                tls = self._conn.as_ssl_context()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise LeaseError(f"the TLS credentials cannot be loaded: {exc}") from exc
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=tls),
                headers=self._conn.as_http_headers(),
                timeout=aiohttp.ClientTimeout(total=max(1.0, self._retry)),
            )
        return self._session

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self) -> dict[str, Any] | None:
        try:
            async with self._http().get(f"{self.url}/{self.name}") as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise LeaseError(f"GET {self.url}/{self.name}: HTTP {resp.status}", resp.status)
                body: dict[str, Any] = await resp.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LeaseError(f"GET {self.url}/{self.name}: {exc!r}") from exc

    async def _create(self) -> bool:
        now = _microtime()
        body = {
            "apiVersion": LEASE.api_version,
            "kind": LEASE.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self._duration),
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        }
        try:
            async with self._http().post(self.url, json=body) as resp:
                if resp.status == 409:
                    return False  # a peer created it first
                if resp.status not in (200, 201):
                    raise LeaseError(f"POST {self.url}: HTTP {resp.status}", resp.status)
                self._written = await _resource_version(resp)
                return True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LeaseError(f"POST {self.url}: {exc!r}") from exc

    async def _patch(self, spec: dict[str, Any], resource_version: str | None) -> bool:
        body: dict[str, Any] = {"spec": spec}
        if resource_version:
            # In a merge patch, a resourceVersion is a precondition: 409 if someone else wrote.
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            async with self._http().patch(
                f"{self.url}/{self.name}",
                json=body,
                headers={"Content-Type": "application/merge-patch+json"},
            ) as resp:
                if resp.status == 409:
                    return False
                if resp.status != 200:
                    raise LeaseError(
                        f"PATCH {self.url}/{self.name}: HTTP {resp.status}", resp.status
                    )
                self._written = await _resource_version(resp)
                return True
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LeaseError(f"PATCH {self.url}/{self.name}: {exc!r}") from exc

    def _set_leader(self, leader: bool) -> None:
        if leader == self._leader:
            return
        self._leader = leader
        self.transitions += 1
        if leader:
            log.info("lease %s/%s: %s is now the leader", self.namespace, self.name, self.identity)
        else:
            log.info("lease %s/%s: %s is not the leader", self.namespace, self.name, self.identity)
        if self._on_change is not None:
            self._on_change(leader)


async def _resource_version(resp: aiohttp.ClientResponse) -> str | None:
    """The resourceVersion of the Lease an API server answered a write with, or None."""
    try:
        body = await resp.json(content_type=None)
    except ValueError:  # (json.JSONDecodeError) not the Lease: no precondition then
        return None
    meta = body.get("metadata") if isinstance(body, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return str(version) if version else None
