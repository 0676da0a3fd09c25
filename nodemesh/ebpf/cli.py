"""`nodemesh agent`: run the node agent, or remove the data plane (`--uninstall`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodemesh.ebpf._maps import MAX_CGROUP_LEVEL
from nodemesh.ebpf.errors import NodemeshEbpfError
from nodemesh.ebpf.loader import DEFAULT_PIN_ROOT, Dataplane
from nodemesh.ebpf.maps import SocketRedirect

if TYPE_CHECKING:
    from nodemesh.ebpf.agent import Agent

__all__ = ["configure", "run"]

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", help="this node's name (the xDS node id)")
    parser.add_argument("--controlplane", help="HOST:PORT of the control plane's ADS server")
    parser.add_argument("--cgroup", required=True, type=Path, help="cgroup v2 of the mesh's pods")
    parser.add_argument(
        "--envoy-cgroup",
        type=Path,
        help="cgroup v2 of the node Envoy, below --cgroup: connections made in it or in any "
        "cgroup below it are never rewritten. In Kubernetes the Envoy pod's cgroup, which "
        "outlives its container's restarts; when the directory is made again (a new cgroup), "
        "the agent follows",
    )
    parser.add_argument("--pin-root", type=Path, default=DEFAULT_PIN_ROOT, help="bpffs dir")
    parser.add_argument(
        "--socket-redirect",
        choices=("auto", "on", "off"),
        default="auto",
        help="carry same-node payloads socket to socket (sk_msg). auto: for every pod if this "
        "kernel keeps a blocking recv() waiting across a signal and a half-close and lets "
        "splice() read on a socket in a sockmap (a probe at start; 6.18 does not, "
        "docs/ebpf.md), else only between pods annotated nodemesh.io/socket-redirect=on; "
        "on: every pod; off: never. A pod annotated off, and any host-network pod, is left out "
        "in every mode",
    )
    parser.add_argument(
        "--envoy-guard",
        choices=("on", "off"),
        default="on",
        help="on: the node Envoy's port takes only the connections the agent sends there and "
        "the node's own, and refuses other machines' (docs/ebpf.md, \"The node Envoy's "
        'port"); off: anything that reaches it is served',
    )
    parser.add_argument(
        "--metrics-listen",
        type=_hostport,
        default="",
        metavar="HOST:PORT",
        help="serve /metrics (Prometheus text: the kernel counters, the stream to the control "
        "plane) and /livez there (default: none)",
    )
    parser.add_argument(
        "--uninstall", action="store_true", help="detach everything, remove all pins, and exit"
    )


def dataplane_of(args: argparse.Namespace) -> Dataplane:
    """The data plane the command line describes (nothing attached yet)."""
    return Dataplane(args.cgroup, args.pin_root, envoy_guard=args.envoy_guard == "on")


def run(args: argparse.Namespace) -> int:
    dataplane = dataplane_of(args)
    try:
        if args.uninstall:
            return _uninstall(dataplane)
        if not args.node or not args.controlplane:
            log.error("--node and --controlplane are required (unless --uninstall)")
            return 2
        if args.envoy_cgroup is not None:
            problem = _envoy_cgroup_problem(args.cgroup, args.envoy_cgroup)
            if problem:
                log.error("%s", problem)
                return 2
        from nodemesh.ebpf.agent import Agent

        agent = Agent(
            args.node,
            args.controlplane,
            dataplane,
            args.envoy_cgroup,
            socket_redirect=_socket_redirect(args.socket_redirect),
        )
        asyncio.run(_until_signal(_serve(agent, args.metrics_listen)))
        return 0
    except NodemeshEbpfError as exc:
        log.error("%s", exc)
        return 1


def _hostport(value: str) -> str:
    if not value:
        return ""  # (the default: none)
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    bare = host[1:-1] if bracketed else host
    if (
        not sep
        or not port.isdigit()
        or not 0 <= int(port) <= 65535
        or not bare
        or any(c in bare for c in "[] \t")
        or (":" in bare and not bracketed)
    ):
        raise argparse.ArgumentTypeError(f"{value!r}: expected HOST:PORT ([IPv6]:PORT)")
    return value


async def _serve(agent: Agent, metrics_listen: str) -> None:
    """The agent, and its /metrics listener when asked for one: opened once the pin root is
    the agent's (in a DaemonSet rollout the next agent waits for it, on the same host port)."""
    from nodemesh.ebpf.metrics import AgentMetrics

    metrics = AgentMetrics(agent) if metrics_listen else None

    async def owned() -> None:
        if metrics is None:
            return
        host, _, port = metrics_listen.rpartition(":")
        try:
            bound = await metrics.start(host.strip("[]"), int(port))
        except OSError as exc:
            raise NodemeshEbpfError(f"--metrics-listen {metrics_listen}: {exc.strerror}") from exc
        log.info("metrics on http://%s:%d/metrics", host, bound)

    try:
        await agent.run(owned)
    finally:
        if metrics is not None:
            await metrics.stop()


def _uninstall(dataplane: Dataplane) -> int:
    """Remove the data plane, unless an agent runs on it: that agent would go on ACKing the
    control plane while its maps are no longer used by anything (exit 1)."""
    if not dataplane.installed():
        log.info("nothing installed at %s", dataplane.pin_root)
        return 0
    lock = dataplane.try_lock()
    if lock is None:
        log.error(
            "an agent (%s) runs on the pin root %s: stop it first (delete the DaemonSet, or "
            "stop its service); removing the data plane under it would leave it reporting "
            "success for maps no program reads",
            dataplane.lock_holder(),
            dataplane.pin_root,
        )
        return 1
    try:
        dataplane.disable()
    finally:
        os.close(lock)
    log.info("data plane removed from %s", dataplane.pin_root)
    return 0


def _envoy_cgroup_problem(cgroup: Path, envoy: Path) -> str:
    """Why `envoy` cannot be the node Envoy's cgroup ("" if it can). connect4/6 leave every
    connection made in it or below it alone, and look for it down to a fixed level."""
    if not envoy.is_dir():
        return f"--envoy-cgroup {envoy}: no such cgroup directory"
    if cgroup.is_dir() and _ancestry(envoy)[0] in _ancestry(cgroup):
        return (
            f"--envoy-cgroup {envoy} is --cgroup {cgroup} or holds it: every connection from "
            "below it is left alone, so no pod would be in the mesh. Name the node Envoy's "
            "own cgroup (in Kubernetes, its pod's)"
        )
    level = len(_ancestry(envoy)) - 1
    if level > MAX_CGROUP_LEVEL:
        return (
            f"--envoy-cgroup {envoy} is at level {level} of the cgroup tree; the programs "
            f"look for the node Envoy's cgroup down to level {MAX_CGROUP_LEVEL}"
        )
    return ""


def _ancestry(path: Path) -> list[tuple[int, int]]:
    """(st_dev, st_ino) of `path` and of each directory above it up to its mount's root: the
    cgroup and its ancestors, the root cgroup last when the mount shows the whole tree."""
    path = path.resolve()
    st = os.stat(path)
    out = [(st.st_dev, st.st_ino)]
    while path.parent != path:
        up = os.stat(path.parent)
        if up.st_dev != st.st_dev:
            break
        out.append((up.st_dev, up.st_ino))
        path = path.parent
    return out


def _socket_redirect(mode: str) -> SocketRedirect:
    if mode != "auto":
        log.info("socket redirect %s (--socket-redirect=%s)", mode, mode)
        return SocketRedirect.ALL if mode == "on" else SocketRedirect.NONE
    from nodemesh.ebpf.probe import sockmap_reads_are_safe

    probe = sockmap_reads_are_safe()
    if probe.ok:
        log.info("socket redirect on: %s", probe.detail)
        return SocketRedirect.ALL
    log.warning(
        "socket redirect only between pods annotated nodemesh.io/socket-redirect=on: on this "
        "kernel, readers of a socket in a sockmap do not get what they expect (%s; "
        "docs/ebpf.md, Known limitations); other same-node payloads take the TCP path. "
        "--socket-redirect=on to use it for every pod anyway",
        probe.detail,
    )
    return SocketRedirect.OPTED_IN


async def _until_signal(main: Coroutine[Any, Any, None]) -> None:
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task
