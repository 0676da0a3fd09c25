"""Command-line options of the Kubernetes source (`nodemesh controlplane --source kubernetes`)."""

from __future__ import annotations

import argparse

from nodemesh.controlplane.kube._operator import OperatorOptions, default_identity

__all__ = ["add_arguments", "options_from_args"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("kubernetes source")
    group.add_argument(
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        help="watch only this namespace (repeatable); all namespaces when absent",
    )
    group.add_argument(
        "--identity",
        default=default_identity(),
        help="this replica's name in the leader-election Lease (default: $POD_NAME or hostname)",
    )
    group.add_argument(
        "--no-leader-election",
        dest="leader_election",
        action="store_false",
        help="write status without holding the Lease (a single replica)",
    )
    group.add_argument(
        "--lease-namespace",
        help="default: the service account's namespace (the kubeconfig context's, outside a "
        "pod), else 'default'",
    )
    group.add_argument(
        "--lease-name", default="nodemesh-controlplane", help="the leader-election Lease"
    )
    group.add_argument(
        "--status-interval",
        type=float,
        default=1.0,
        help="at most one status write per object per this many seconds (default: 1.0)",
    )


def options_from_args(args: argparse.Namespace) -> OperatorOptions:
    return OperatorOptions(
        namespaces=tuple(getattr(args, "namespaces", ()) or ()),
        identity=getattr(args, "identity", None) or default_identity(),
        leader_election=getattr(args, "leader_election", True),
        lease_namespace=getattr(args, "lease_namespace", None),
        lease_name=getattr(args, "lease_name", "nodemesh-controlplane"),
        status_interval=getattr(args, "status_interval", 1.0),
    )
