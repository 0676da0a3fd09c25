"""Command-line options of the Kubernetes source (`nodemesh controlplane --source kubernetes`)."""

from __future__ import annotations

import argparse
from typing import Any

from nodemesh.controlplane.kube._operator import OperatorOptions, default_identity

__all__ = ["add_arguments", "options_from_args", "stray_flags"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kubernetes source")
    actions: list[argparse.Action] = []

    def add(*flags: str, **kwargs: Any) -> None:
        actions.append(group.add_argument(*flags, **kwargs))

    add(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="watch only this namespace (repeatable); all namespaces when absent",
    )
    add(
        "--identity",
        default=default_identity(),
        help="this replica's name in the leader-election Lease (default: $POD_NAME or hostname)",
    )
    add(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="write status without holding the Lease (a single replica)",
    )
    add(
        "--lease-namespace",
        help="default: the service account's namespace (the kubeconfig context's, outside a "
        "pod), else 'default'",
    )
    add("--lease-name", default="nodemesh-controlplane", help="the leader-election Lease")
    add(
        "--peers-service",
        help="with several replicas: the control plane's Service (in the Lease's namespace); "
        "the leader counts the node Envoys of the replicas behind it in Programmed",
    )
    add(
        "--peers-port",
        default="http",
        help="the name of that Service's port for --http-listen (default: http)",
    )
    add(
        "--status-interval",
        type=float,
        default=1.0,
        help="at most one status write per object per this many seconds (default: 1.0)",
    )

    # what `stray_flags` compares with: given with --source files, they would do nothing
    parser.set_defaults(kube_flags=tuple((a.option_strings[0], a.dest, a.default) for a in actions))


def stray_flags(args: argparse.Namespace) -> list[str]:
    """The flags of the kubernetes source given (not at their defaults) in `args`."""
    return [
        flag
        for flag, dest, default in getattr(args, "kube_flags", ())
        if getattr(args, dest, default) != default
    ]


def options_from_args(args: argparse.Namespace) -> OperatorOptions:
    return OperatorOptions(
        namespaces=tuple(getattr(args, "namespaces", ()) or ()),
        identity=getattr(args, "identity", None) or default_identity(),
        leader_election=getattr(args, "leader_election", True),
        lease_namespace=getattr(args, "lease_namespace", None),
        lease_name=getattr(args, "lease_name", "nodemesh-controlplane"),
        status_interval=getattr(args, "status_interval", 1.0),
        peers_service=getattr(args, "peers_service", None),
        peers_port=getattr(args, "peers_port", "http"),
    )
