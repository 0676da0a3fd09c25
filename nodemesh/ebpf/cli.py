"""`nodemesh agent`: run the node agent, or remove the data plane (`--uninstall`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from nodemesh.ebpf.errors import NodemeshEbpfError
from nodemesh.ebpf.loader import DEFAULT_PIN_ROOT, Dataplane
from nodemesh.ebpf.maps import SocketRedirect

__all__ = ["configure", "run"]

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node", help="this node's name (the xDS node id)")
    parser.add_argument("--controlplane", help="HOST:PORT of the control plane's ADS server")
    parser.add_argument("--cgroup", required=True, type=Path, help="cgroup v2 of the mesh's pods")
    parser.add_argument("--envoy-cgroup", type=Path, help="cgroup v2 of the node Envoy")
    parser.add_argument("--pin-root", type=Path, default=DEFAULT_PIN_ROOT, help="bpffs dir")
    parser.add_argument(
        "--socket-redirect",
        choices=("auto", "on", "off"),
        default="auto",
        help="carry same-node payloads socket to socket (sk_msg). auto: for every pod if this "
        "kernel keeps a blocking recv() waiting across a signal and a half-close and lets "
        "splice() read on a socket in a sockmap (a probe at start; 6.18 does not, "
        "docs/ebpf.md), else only between pods annotated nodemesh.io/socket-redirect=on; "
        "on: every pod; off: never. A pod annotated off is left out in every mode",
    )
    parser.add_argument(
        "--uninstall", action="store_true", help="detach everything, remove all pins, and exit"
    )


def run(args: argparse.Namespace) -> int:
    dataplane = Dataplane(args.cgroup, args.pin_root)
    try:
        if args.uninstall:
            dataplane.disable()
            log.info("data plane removed from %s", args.pin_root)
            return 0
        if not args.node or not args.controlplane:
            log.error("--node and --controlplane are required (unless --uninstall)")
            return 2
        if args.envoy_cgroup is not None and not args.envoy_cgroup.is_dir():
            log.error("--envoy-cgroup %s: no such cgroup directory", args.envoy_cgroup)
            return 2
        from nodemesh.ebpf.agent import Agent

        agent = Agent(
            args.node,
            args.controlplane,
            dataplane,
            args.envoy_cgroup,
            socket_redirect=_socket_redirect(args.socket_redirect),
        )
        asyncio.run(_until_signal(agent.run()))
        return 0
    except NodemeshEbpfError as exc:
        log.error("%s", exc)
        return 1


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
