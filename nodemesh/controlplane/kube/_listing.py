"""Lists of our own, for what kopf does not tell: `unlisted` asks whether any watched kind has
an object, to tell an empty cluster from a listing that is not done (kopf calls no handler in
either case); `existing` lists the names of one kind, to find the objects that went while a
watch was down (kopf lists again after a 410 Gone, and sends no DELETED for those); `answers`
lists one Node, to tell whether the API server answers (kopf retries a refused connection
for good without a word to its host).

Besides the Lease and the status writes, the one piece that talks to the API server outside
kopf, with kopf's credentials and the `list` verb it has anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp
import kopf

from nodemesh.controlplane.kube._errors import ListingError
from nodemesh.controlplane.kube._resources import RESOURCES, WatchedResource
from nodemesh.controlplane.store import ObjectKey

__all__ = ["answers", "existing", "unlisted"]

# Names only: a page of metadata, not of whole Pods (a real API server honours this; others
# answer full objects, which parse the same).
_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
_PAGE = 500


def _urls(r: WatchedResource, server: str, namespaces: Sequence[str]) -> list[str]:
    server = server.rstrip("/")
    base = f"{server}/apis/{r.group}/{r.version}" if r.group else f"{server}/api/{r.version}"
    if not r.namespaced or not namespaces:
        return [f"{base}/{r.plural}"]
    return [f"{base}/namespaces/{ns}/{r.plural}" for ns in namespaces]


def _session(connection: kopf.ConnectionInfo, timeout: float) -> aiohttp.ClientSession:
    """Raises `ListingError` if the TLS files a kubeconfig names cannot be loaded (gone, or
    half written while a certificate is renewed)."""
    try:
        tls = connection.as_ssl_context()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ListingError(f"the TLS credentials cannot be loaded: {exc}") from exc
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=tls),
        headers=connection.as_http_headers(),
        timeout=aiohttp.ClientTimeout(total=timeout),
    )


_NODES = next(r for r in RESOURCES if r.kind == "Node")  # cluster-scoped, listed in every mode


async def answers(connection: kopf.ConnectionInfo, *, timeout: float = 5.0) -> str | None:
    """None when the API server answers a list of one Node; else why not (`HTTP 503`, a
    refused connection, a timeout), in a few words."""
    try:
        session = _session(connection, timeout)
    except ListingError as exc:
        return str(exc)
    async with session:
        try:
            url = _urls(_NODES, connection.server, ())[0]
            async with session.get(url, params={"limit": "1"}) as resp:
                if resp.status != 200:
                    return f"HTTP {resp.status}"
                await resp.read()
        except aiohttp.ClientConnectorError as exc:
            return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return repr(exc)
    return None


async def existing(
    connection: kopf.ConnectionInfo,
    namespaces: Sequence[str],
    r: WatchedResource,
    *,
    timeout: float = 30.0,
) -> dict[ObjectKey, str]:
    """The key of every `r` object now, with its uid (in `namespaces`, or everywhere if none),
    page by page. Raises `ListingError` when a page cannot be had, 404 too: an API server
    starting up answers it for a CRD it does not serve yet, which is no proof that nothing of
    it exists."""
    keys: dict[ObjectKey, str] = {}
    async with _session(connection, timeout) as session:
        for url in _urls(r, connection.server, namespaces):
            params = {"limit": str(_PAGE)}
            while True:
                try:
                    async with session.get(
                        url, params=params, headers={"Accept": _METADATA_ONLY}
                    ) as resp:
                        if resp.status != 200:
                            raise ListingError(f"list {r.plural}: HTTP {resp.status}")
                        body: dict[str, Any] = await resp.json(content_type=None)
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    raise ListingError(f"list {r.plural}: {exc!r}") from exc
                for item in body.get("items") or ():
                    meta = item.get("metadata") or {}
                    ns = (meta.get("namespace") or "") if r.namespaced else ""
                    keys[ObjectKey(r.kind, ns, meta.get("name") or "")] = str(meta.get("uid") or "")
                token = (body.get("metadata") or {}).get("continue")
                if not token:
                    break
                params = {"limit": str(_PAGE), "continue": token}
    return keys


async def unlisted(
    connection: kopf.ConnectionInfo, namespaces: Sequence[str], *, timeout: float = 5.0
) -> str | None:
    """None when every watched kind lists empty (in `namespaces`, or everywhere if none);
    else why the cluster may hold objects that are not indexed yet: the first kind that has
    one, or whose list failed."""
    try:
        session = _session(connection, timeout)
    except ListingError as exc:
        return str(exc)
    async with session:
        for r in RESOURCES:
            for url in _urls(r, connection.server, namespaces):
                try:
                    async with session.get(url, params={"limit": "1"}) as resp:
                        if resp.status == 404:
                            continue  # not served (a CRD not installed): kopf skips it too
                        if resp.status != 200:
                            return f"list {r.plural}: HTTP {resp.status}"
                        body = await resp.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    return f"list {r.plural}: {exc!r}"
                if (body or {}).get("items"):
                    return f"{r.plural} exist, kopf has not listed them all yet"
    return None
