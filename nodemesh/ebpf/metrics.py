"""`nodemesh agent --metrics-listen HOST:PORT`: the agent's `/metrics` (Prometheus text), read
when scraped: the kernel data plane's counters (`nm_stats`, summed over CPUs) and the agent's
stream to the control plane. Names and meanings: docs/ebpf.md, "Metrics"."""

from __future__ import annotations

import logging

from aiohttp import web

from nodemesh._http import listen
from nodemesh._prometheus import CONTENT_TYPE, Exposition
from nodemesh.api import SERVICE_TYPE_URL
from nodemesh.ebpf.agent import Agent
from nodemesh.ebpf.errors import NodemeshEbpfError
from nodemesh.ebpf.maps import NodeMaps

__all__ = ["STATS_HELP", "AgentMetrics", "render"]

log = logging.getLogger(__name__)

# nm_stats fields (nodemesh.h), each a counter `nodemesh_agent_<field>_total`
STATS_HELP = {
    "msg_redirected": "Messages sk_msg carried socket to socket.",
    "bytes_redirected": "Bytes sk_msg carried socket to socket.",
    "msg_passed": "Messages sk_msg left to TCP.",
    "l7_redirects": "Connections connect4/6 sent to the node Envoy (L7 Services).",
    "l4_picks": "Connections connect4/6 sent straight to a backend (L4 Services).",
    "misses": "Connections to an address and port that is no Service of the map.",
    "refused": "Connections connect4/6 refused (no backend, no Envoy for an L7 Service, an "
    "entry still changing).",
    "sockhash_inserts": "Sockets sockops put into the sockhash.",
    "orig_dst_answered": "SO_ORIGINAL_DST questions of the node Envoy answered.",
    "orig_dst_missing": "SO_ORIGINAL_DST questions with no original destination recorded.",
    "fallback_backlog": "Connections moved to TCP: the peer had too much unread.",
    "fallback_nopeer": "Connections moved to TCP: the peer was not in the sockhash.",
    "bytes_consumed": "Redirected bytes applications read from counted sockets.",
    "bytes_clamped": "Of those, read beyond the count (0 unless the count is off).",
    "untracked_full": "Sockets left on TCP: the per-socket maps were full.",
    "fallback_unrecorded": "Fallbacks with no per-socket entry to mark.",
    "entries_freed": "Sockets whose per-socket entries went at close.",
    "sockhash_detached": "Sockets taken out of the sockhash before they closed.",
    "cas_exhausted": "Per-socket count updates given up after too many races.",
    "bytes_tcp_read": "Bytes counted sockets read from their TCP queue.",
    "lookup_races": "Map entries read again: the agent replaced them meanwhile.",
    "envoy_refused": "Connections to the node Envoy's port refused by its guard (not sent "
    "there by the agent, not the node's own).",
}


def render(agent: Agent) -> str:
    exposition = Exposition()
    add = exposition.add
    add(
        "nodemesh_agent_responses_total",
        "counter",
        "Responses received from the control plane, over every stream.",
        [({}, agent.responses)],
    )
    add(
        "nodemesh_agent_nacks_total",
        "counter",
        "Responses rejected (a map the kernel maps could not take, a bad entry).",
        [({}, agent.nacks)],
    )
    add(
        "nodemesh_agent_rejecting",
        "gauge",
        "1 while the last response was rejected or the maps wait for a repair.",
        [({}, 1 if agent.last_error else 0)],
    )
    add(
        "nodemesh_agent_last_response_timestamp_seconds",
        "gauge",
        "When the last response came (Unix time; 0: none since start).",
        [({}, agent.last_response_at)],
    )
    add(
        "nodemesh_agent_services",
        "gauge",
        "MeshService resources the agent holds (one per Service).",
        [({}, len(agent.versions.get(SERVICE_TYPE_URL, {})))],
    )
    try:
        with NodeMaps(agent.dataplane.pin_root) as maps:
            stats = maps.stats()
    except (OSError, NodemeshEbpfError) as exc:  # not installed yet, or removed
        log.debug("metrics: no kernel counters: %s", exc)
        stats = None
    add(
        "nodemesh_agent_kernel_counters",
        "gauge",
        "1 when the kernel counters below could be read (the data plane is installed).",
        [({}, 0 if stats is None else 1)],
    )
    for field, help_text in STATS_HELP.items():
        if stats is not None:
            add(f"nodemesh_agent_{field}_total", "counter", help_text, [({}, stats[field])])
    return exposition.text()


class AgentMetrics:
    """The HTTP listener of `/metrics` (and `/livez`: the agent process answers)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=render(self.agent).encode(), headers={"Content-Type": CONTENT_TYPE}
        )

    async def _livez(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start(self, host: str, port: int) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        self._runner, self.port = await listen(app, host, port, keepalive=15.0)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
