"""Programmed across control-plane replicas: each replica's verdicts for the node Envoys
connected to it, fetched from the other replicas (`GET /programmed` on their HTTP listener).

With several replicas, a node Envoy is connected to one of them, and only that replica sees its
ACKs and NACKs. The replica that writes status (the leader) polls its peers' verdicts and
counts their nodes in `Programmed` (see `Pipeline.use_peers`). A peer that does not answer for
`stale_after` seconds is left out: its nodes then count as not connected (a Ready Node whose
Envoy is connected nowhere keeps objects Pending), until it answers again.

A node that a fresh report listed and none lists any more is `departed()` for `move_grace`
seconds when its replica went away (it stopped answering, or serving) or drains (a rolling
update stops it: its report says `draining`) and did not see that Envoy go on its own (its
report's `left`), not when it left a replica that goes on (its Envoy stopped, or restarted
and holds nothing): its Envoy is on its way to another replica, and keeps the config it holds
meanwhile (Envoy does not drop its config when its xDS stream ends). The pipeline counts it
with the last verdicts of the replica it left, for each object whose content those verdicts
were for (`PeerReport.objects`' content digest) is the content now.

`Peers(targets, ...)`: `targets()` returns {peer name: base URL} (see
`nodemesh.controlplane.kube.peer_targets`: the ready endpoints of the control plane's
Service); `await peers.run()` polls them every `interval` seconds until cancelled;
`peers.reports()` are the fresh reports, `peers.departed()` the nodes on their way to another
replica; `peers.subscribe(callback)` calls `callback()` on the event loop whenever either
changes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

__all__ = ["PeerReport", "Peers", "Verdict"]

log = logging.getLogger(__name__)

# (status, reason, message) of one Programmed condition (per parentRef for routes)
Verdict = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class PeerReport:
    """What one peer said: the nodes connected to it, and per object ("Kind/ns/name") its uid
    ("" when the source has none), the generation its verdicts are for, per parent its
    verdict for those nodes only, and the digest of the content they are for (the versions
    of the resources that carry the object: `Pipeline._content_digest`; "" from a version
    that did not say). `draining`: the peer is shutting down (its store no longer follows
    the cluster); `left`: the nodes whose Envoy closed its stream on its own in the last
    minute, not cut by the peer's drain (it stopped, or restarted: not a move)."""

    peer: str
    nodes: tuple[str, ...]
    objects: Mapping[str, tuple[str, int, Mapping[str, Verdict], str]]
    etag: str = ""
    received: float = 0.0  # time.monotonic()
    draining: bool = False
    left: frozenset[str] = frozenset()

    @staticmethod
    def from_json(peer: str, body: Mapping[str, Any], etag: str, received: float) -> PeerReport:
        objects: dict[str, tuple[str, int, Mapping[str, Verdict], str]] = {}
        raw = body.get("objects")
        for origin, entry in raw.items() if isinstance(raw, Mapping) else ():
            if not isinstance(entry, Mapping):
                continue
            parents = entry.get("parents")
            verdicts = {
                str(parent): (str(v[0]), str(v[1]), str(v[2]))
                for parent, v in (parents.items() if isinstance(parents, Mapping) else ())
                if isinstance(v, list) and len(v) == 3
            }
            objects[str(origin)] = (
                str(entry.get("uid", "")),
                int(entry["generation"]),
                verdicts,
                str(entry.get("content", "")),
            )
        nodes = body.get("nodes")
        return PeerReport(
            peer,
            tuple(str(n) for n in nodes) if isinstance(nodes, list) else (),
            objects,
            etag,
            received,
            body.get("draining") is True,
            frozenset(str(n) for n in left)
            if isinstance(left := body.get("left"), list)
            else frozenset(),
        )


@dataclass(slots=True)
class _Peer:
    url: str
    since: float  # added, or last answered (the Peers' clock)
    report: PeerReport | None = None
    failing: str = ""  # why the last poll failed ("" while it answers)
    warned: bool = False  # this outage was logged as a warning


class Peers:
    def __init__(
        self,
        targets: Callable[[], Mapping[str, str]],
        *,
        interval: float = 1.0,
        timeout: float = 2.0,
        stale_after: float = 5.0,
        move_grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.targets = targets
        self.interval = interval
        self.timeout = timeout
        self.stale_after = stale_after
        self.move_grace = move_grace
        self._clock = clock
        self._peers: dict[str, _Peer] = {}
        self._fresh: dict[str, PeerReport] = {}
        # node -> (the last fresh report that listed it, when none did any more)
        self._departed: dict[str, tuple[PeerReport, float]] = {}
        self._departed_view: Mapping[str, PeerReport] = {}
        self._subscribers: list[Callable[[], None]] = []
        self.polls = 0  # completed poll rounds

    def reports(self) -> Mapping[str, PeerReport]:
        """The reports of the peers that answered within `stale_after` seconds, by peer name.
        The mapping is replaced, never altered, when they change."""
        return self._fresh

    def departed(self) -> Mapping[str, PeerReport]:
        """The nodes a fresh report listed and none does now, having left a peer that went
        away or drains (see the module's doc), for `move_grace` seconds after (less for a
        node that a report lists again, or whose peer answers again not draining, or says
        the node left on its own): by node, the last report that listed it. The mapping is
        replaced, never altered, when they change."""
        return self._departed_view

    def describe(self) -> dict[str, Any]:
        """Per peer, for `/status`: its URL, its nodes, seconds since it last answered, why
        its last poll failed ("" when it answered), and the nodes that left it and are still
        counted with its verdicts (see `departed`), also for a peer no longer found."""
        now = self._clock()
        moving: dict[str, list[str]] = {}
        for node, report in self._departed_view.items():
            moving.setdefault(report.peer, []).append(node)
        out: dict[str, Any] = {
            name: {
                "url": p.url,
                "nodes": list(p.report.nodes) if p.report is not None else [],
                "answered_seconds_ago": round(now - p.report.received, 1)
                if p.report is not None
                else None,
                "counted": name in self._fresh,
                "error": p.failing,
                "moving": moving.get(name, []),
            }
            for name, p in self._peers.items()
        }
        for name in moving.keys() - out.keys():
            out[name] = {
                "url": "",
                "nodes": [],
                "answered_seconds_ago": None,
                "counted": False,
                "error": "no longer a peer (not serving, or gone)",
                "moving": moving[name],
            }
        return dict(sorted(out.items()))

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                await self.poll(session)
                await asyncio.sleep(self.interval)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """One round: ask every current target, then settle which reports are fresh."""
        try:
            wanted = dict(self.targets())
        except Exception:
            log.exception("cannot list the control plane's peers; keeping the last list")
            wanted = {name: p.url for name, p in self._peers.items()}
        for name in list(self._peers):
            if name not in wanted or self._peers[name].url != wanted[name]:
                del self._peers[name]
        for name, url in wanted.items():
            if name not in self._peers:
                self._peers[name] = _Peer(url, self._clock())
        await asyncio.gather(*(self._ask(session, n, p) for n, p in self._peers.items()))
        self.polls += 1
        now = self._clock()
        fresh = {
            name: p.report
            for name, p in sorted(self._peers.items())
            if p.report is not None and now - p.report.received <= self.stale_after
        }
        for name, p in self._peers.items():
            # once per outage, whether it answered before (its report goes stale) or never
            # did (a --peers-port or --http-listen that does not reach it: the node Envoys
            # connected there would otherwise hold objects Pending with only an INFO line)
            if p.failing and not p.warned and now - p.since > self.stale_after:
                p.warned = True
                log.warning(
                    "peer %s (%s) has not answered %s: its node Envoys are left out of "
                    "Programmed until it does (%s)",
                    name,
                    p.url,
                    f"for {now - p.since:.0f} s"
                    if p.report is not None
                    else f"since it was found {now - p.since:.0f} s ago (check --peers-port, "
                    "and that its --http-listen listens on the pod's address)",
                    p.failing,
                )
        departed = self._depart(fresh, now)
        # (a 304 renews a report's time only: no change for the subscribers)
        changed = {n: r.etag for n, r in fresh.items()} != {
            n: r.etag for n, r in self._fresh.items()
        }
        self._fresh = fresh
        # (a departed node keeps its report until it goes: its name is what can change)
        if departed.keys() != self._departed_view.keys():
            self._departed_view = departed
            changed = True
        if changed:
            for callback in list(self._subscribers):
                try:
                    callback()
                except Exception:
                    log.exception("peers subscriber failed")

    def _depart(self, fresh: Mapping[str, PeerReport], now: float) -> dict[str, PeerReport]:
        """The departed nodes once `fresh` replaces the fresh reports (see `departed`)."""
        listed = {n for r in fresh.values() for n in r.nodes}
        # said to have left on its own by a peer that listed it: not a move, whichever other
        # peer (an old stream not yet seen closed) listed it too
        went = {
            n
            for r in self._fresh.values()
            for n in r.nodes
            if n not in listed and self._went(fresh, r.peer, n)
        }
        # the latest report first: a node two peers listed (a stream not yet seen closed at
        # one of them) keeps the later one's verdicts
        for report in sorted(self._fresh.values(), key=lambda r: r.received, reverse=True):
            for node in report.nodes:
                if node not in listed and node not in self._departed and node not in went:
                    self._departed[node] = (report, now)
        self._departed = {
            n: (r, since)
            for n, (r, since) in self._departed.items()
            if n not in listed
            and now - since < self.move_grace
            # a peer that answers again, not draining: the node did not move, it went
            and not self._went(fresh, r.peer, n)
        }
        return {n: r for n, (r, _) in sorted(self._departed.items())}

    @staticmethod
    def _went(fresh: Mapping[str, PeerReport], peer: str, node: str) -> bool:
        """Whether `node`'s Envoy, no longer listed by `peer`, left it on its own (it stopped,
        or restarted, and holds nothing): `peer` answers and does not drain, or drains and
        saw that Envoy close its stream before the end of the drain."""
        report = fresh.get(peer)
        return report is not None and (not report.draining or node in report.left)

    async def _ask(self, session: aiohttp.ClientSession, name: str, peer: _Peer) -> None:
        headers = {"If-None-Match": peer.report.etag} if peer.report is not None else {}
        try:
            async with session.get(f"{peer.url}/programmed", headers=headers) as resp:
                now = self._clock()
                if resp.status == 304 and peer.report is not None:
                    peer.report = replace(peer.report, received=now)
                elif resp.status == 200:
                    body = await resp.json()
                    peer.report = PeerReport.from_json(
                        name, body, resp.headers.get("ETag", ""), self._clock()
                    )
                else:
                    raise _Refused(f"HTTP {resp.status}")
        except Exception as exc:  # unreachable, or an answer it cannot read: not counted
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not peer.failing:
                log.info("peer %s (%s) did not answer: %s", name, peer.url, why)
            peer.failing = why
            return
        if peer.failing:
            log.info("peer %s (%s) answers again", name, peer.url)
        peer.failing = ""
        peer.warned = False
        peer.since = self._clock()


class _Refused(Exception):
    pass
