"""`nodemesh controlplane`: the ADS server, the pipeline, a source (files or kubernetes) and the
HTTP status listener, in one process until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import importlib.util
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from nodemesh._ip import ip_version
from nodemesh.controlplane.builder import CLUSTER_DOMAIN, LabelSelector, cluster_domain
from nodemesh.controlplane.files import FilesSource
from nodemesh.controlplane.http import StatusServer
from nodemesh.controlplane.pipeline import Pipeline
from nodemesh.controlplane.store import Store
from nodemesh.xds.cache import SnapshotCache
from nodemesh.xds.server import AdsServer, ServerError

__all__ = ["configure", "run", "split_hostport"]

log = logging.getLogger(__name__)


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # an IPv6 address


def _hostport(value: str) -> str:
    split_hostport(value)  # checked while parsing: a usage error, not a traceback at start
    return value


def _ip_hostport(value: str) -> str:
    """HOST:PORT whose host is an IP address: an Envoy Listener's (a name, `localhost`, made
    every node Envoy refuse the Listener)."""
    host, _ = split_hostport(value)
    if not ip_version(host):
        raise argparse.ArgumentTypeError(
            f"expected IP:PORT (a node Envoy listens on an address, not a name), got {value!r}"
        )
    return value


def _seconds(positive: bool) -> Callable[[str], float]:
    def parse(value: str) -> float:
        try:
            seconds = float(value)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
            least = "more than 0" if positive else "0 or more"
            raise argparse.ArgumentTypeError(f"expected seconds, {least}, got {value!r}")
        return seconds

    return parse


def _label_selector(value: str) -> LabelSelector:
    try:
        return LabelSelector(value)
    except ValueError as exc:  # a usage error, not a traceback at start
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _cluster_domain(value: str) -> str:
    try:
        return cluster_domain(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=("files", "kubernetes"),
        default="files",
        help="where the objects come from: a directory (--config-dir) or the cluster",
    )
    parser.add_argument("--config-dir", help="files mode: directory of YAML objects")
    parser.add_argument(
        "--xds-listen", type=_hostport, default="127.0.0.1:18000", help="ADS gRPC HOST:PORT"
    )
    parser.add_argument(
        "--http-listen", type=_hostport, default="127.0.0.1:18080", help="status HTTP HOST:PORT"
    )
    parser.add_argument(
        "--outbound-listen",
        type=_ip_hostport,
        default="0.0.0.0:15001",
        help="address of the node Envoys' outbound HTTP listener (HOST:PORT)",
    )
    parser.add_argument(
        "--node-selector",
        type=_label_selector,
        default=None,
        help="label selector of the Nodes that run nodemesh (default: every Node); only they "
        "get a service map and count for Programmed",
    )
    parser.add_argument(
        "--cluster-domain",
        type=_cluster_domain,
        default=CLUSTER_DOMAIN,
        help="the cluster's DNS domain, as kubelet's --cluster-domain: node Envoys route "
        f"name.namespace.svc.DOMAIN to each Service (default: {CLUSTER_DOMAIN})",
    )
    parser.add_argument(
        "--access-log",
        default="",
        metavar="PATH",
        help="'stdout' (each node Envoy's standard output) or a file on the node: where node "
        "Envoys write a JSON line per request (default: none)",
    )
    # (0 or less spun a core; nan never looked again)
    parser.add_argument(
        "--poll-interval", type=_seconds(positive=True), default=0.2, help="files mode poll, s"
    )
    parser.add_argument(
        "--drain-seconds",
        type=_seconds(positive=False),
        default=5.0,
        help="on SIGTERM, refuse new xDS streams but keep serving open ones this long",
    )
    if importlib.util.find_spec("nodemesh.controlplane.kube") is not None:
        importlib.import_module("nodemesh.controlplane.kube").add_arguments(parser)


def pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `Pipeline` settings the command line gives."""
    out_host, out_port = split_hostport(args.outbound_listen)
    return {
        "outbound_address": out_host,
        "outbound_port": out_port,
        "node_selector": args.node_selector,
        "access_log": args.access_log,
        "cluster_domain": args.cluster_domain,
    }


async def serve(args: argparse.Namespace, ready: asyncio.Event | None = None) -> int:
    xds_host, xds_port = split_hostport(args.xds_listen)
    http_host, http_port = split_hostport(args.http_listen)
    store = Store()
    cache = SnapshotCache()
    server = AdsServer(cache)
    pipeline = Pipeline(store, cache, server.status, **pipeline_options(args))
    status = StatusServer(pipeline)
    files: FilesSource | None = None
    kube_task: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    failures: list[str] = []  # why a source stopped on its own
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("%s: stopping (xDS drains for %ss)", sig.name, args.drain_seconds)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        # HTTP first: /livez answers while a cluster's first listing is still coming (which
        # may take minutes), /readyz and /status say what is not ready yet.
        try:
            hport = await status.start(http_host, http_port)
        except OSError as exc:
            raise _CannotListen(f"--http-listen {args.http_listen}: {exc.strerror}") from exc
        if args.source == "files":
            files = FilesSource(args.config_dir, store, pipeline, interval=args.poll_interval)
            await asyncio.to_thread(files.scan)  # /livez answers meanwhile
            if stop.is_set():  # stopped while it read (a big directory): xDS never served
                return 0
        else:
            kube = importlib.import_module("nodemesh.controlplane.kube")
            kube_ready = asyncio.Event()
            kube_task = asyncio.create_task(
                kube.run_operator(
                    store,
                    pipeline.kubernetes_status,
                    options=kube.options_from_args(args),
                    stop=stop,
                    ready=kube_ready,
                    # while the store does not follow the cluster (the API server is down)
                    report=functools.partial(pipeline.set_source_errors, "kubernetes"),
                    use_peers=pipeline.use_peers,
                )
            )
            # Serve xDS only once the store holds the whole cluster: a partial first snapshot
            # would make the Envoys of a restarted control plane drop config and get it back.
            waiting = asyncio.create_task(kube_ready.wait())
            await asyncio.wait({kube_task, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if kube_task.done():
                failed, kube_task = kube_task, None  # nothing left to stop
                try:
                    failed.result()  # the operator's error, or it was stopped during start-up
                except kube.KubeSourceError as exc:  # its own errors (no credentials): one line
                    raise _CannotStart(f"kubernetes source: {exc}") from exc
                return 0

            def operator_done(task: asyncio.Task[None]) -> None:
                if task.cancelled() or stop.is_set():
                    return  # asked to stop
                # Stopped on its own: the store no longer follows the cluster. Exit (non-zero,
                # so that it is restarted and seen) rather than serve a config going stale.
                why = task.exception() or "it ended without an error"
                log.error("the kubernetes source stopped: %s", why)
                failures.append(str(why))
                stop.set()

            kube_task.add_done_callback(operator_done)
        await pipeline.start()
        if stop.is_set():  # stopped during the first build
            return 1 if failures else 0
        try:
            port = await server.start(_join(xds_host, xds_port))
        except ServerError as exc:
            raise _CannotListen(f"--xds-listen {args.xds_listen}: {exc}") from exc
        if files is not None:
            await files.start()
        xds, http = _join(xds_host, port), _join(http_host, hport)
        log.info("xDS on %s, status on http://%s/status", xds, http)
        if ready is not None:
            ready.set()
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        pipeline.drain()  # the other replicas: its node Envoys are about to move
        if kube_task is not None and not kube_task.done():  # done: `operator_done` said why
            # The operator stops on `stop` and hands the Lease over; then the ADS server drains.
            stop.set()
            try:
                # 20 s, then the drain (5 s by default): inside Kubernetes' default grace of
                # 30 s, so that the drain is not cut by SIGKILL
                await asyncio.wait_for(kube_task, 20)
            except Exception:
                log.exception("the kubernetes source did not stop cleanly")
        if files is not None:
            await files.stop()
        # The pipeline and HTTP after the drain: its node Envoys are still connected here
        # meanwhile, and the other replicas count them from this one's /programmed
        # (--peers-service), which follows their streams (the status writer is stopped)
        pipeline.drain(cut_in=args.drain_seconds)  # what goes before is not the drain's cut
        await server.stop(grace=args.drain_seconds)
        await pipeline.stop()
        await status.stop()
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    if args.source == "files" and not args.config_dir:
        print(
            "nodemesh controlplane: --config-dir is required with --source files", file=sys.stderr
        )
        return 2
    stray = (
        importlib.import_module("nodemesh.controlplane.kube").stray_flags(args)
        if args.source == "files" and hasattr(args, "kube_flags")
        else []
    )
    if stray:
        # --peers-service, --namespace, ... would do nothing: say so rather than run without
        print(
            f"nodemesh controlplane: {', '.join(stray)}: only with --source kubernetes",
            file=sys.stderr,
        )
        return 2
    if args.source == "files" and not os.path.isdir(args.config_dir):
        # Served, the empty store would be an empty config: every Envoy that connected (all of
        # them, after a restart with a mistyped path) would drop its listeners and routes.
        problem = "no such directory" if not os.path.exists(args.config_dir) else "not a directory"
        print(f"nodemesh controlplane: --config-dir {args.config_dir}: {problem}", file=sys.stderr)
        return 2
    if args.source == "files":
        try:
            os.listdir(args.config_dir)
        except OSError as exc:  # no read permission: the same empty config
            print(
                f"nodemesh controlplane: --config-dir {args.config_dir}: "
                f"cannot list it: {exc.strerror}",
                file=sys.stderr,
            )
            return 2
    if (
        args.source == "kubernetes"
        and importlib.util.find_spec("nodemesh.controlplane.kube") is None
    ):
        print("nodemesh controlplane: the kubernetes source is not installed", file=sys.stderr)
        return 2
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 0
    except _CannotListen as exc:  # a port in use, an address not on this host: no traceback
        print(f"nodemesh controlplane: cannot listen: {exc}", file=sys.stderr)
        return 1
    except _CannotStart as exc:
        print(f"nodemesh controlplane: {exc}", file=sys.stderr)
        return 1


class _CannotListen(Exception):
    pass


class _CannotStart(Exception):
    pass
