"""`unlisted`: asks the API server whether any watched kind has an object, to tell an empty
cluster from a listing that is not done (kopf calls no handler in either case).

Used only while the first listing is not complete; the one other piece that talks to the API
server outside kopf besides the Lease, with kopf's credentials and the `list` verb it has.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
import kopf

from nodemesh.controlplane.kube._resources import RESOURCES, WatchedResource

__all__ = ["unlisted"]


def _urls(r: WatchedResource, server: str, namespaces: Sequence[str]) -> list[str]:
    server = server.rstrip("/")
    base = f"{server}/apis/{r.group}/{r.version}" if r.group else f"{server}/api/{r.version}"
    if not r.namespaced or not namespaces:
        return [f"{base}/{r.plural}"]
    return [f"{base}/namespaces/{ns}/{r.plural}" for ns in namespaces]


async def unlisted(
    connection: kopf.ConnectionInfo, namespaces: Sequence[str], *, timeout: float = 5.0
) -> str | None:
    """None when every watched kind lists empty (in `namespaces`, or everywhere if none);
    else why the cluster may hold objects that are not indexed yet: the first kind that has
    one, or whose list failed."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=connection.as_ssl_context()),
        headers=connection.as_http_headers(),
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as session:
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
