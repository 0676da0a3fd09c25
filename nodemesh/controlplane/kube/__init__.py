"""The Kubernetes source: a kopf operator that watches the cluster into the control plane's
`Store` and writes the pipeline's conditions back as status, leader-elected on a Lease.

Entry point: `run_operator(store, status, options=..., stop=..., ready=...)`; `Operator` for
embedding; `add_arguments(parser)` / `options_from_args(args)` for the CLI.
"""

from __future__ import annotations

from nodemesh.controlplane.kube._cli import add_arguments, options_from_args, stray_flags
from nodemesh.controlplane.kube._errors import KubeSourceError, LeaseError, OperatorError
from nodemesh.controlplane.kube._operator import (
    FINALIZER,
    Operator,
    OperatorOptions,
    default_connection,
    run_operator,
)
from nodemesh.controlplane.kube._resources import RESOURCES, WatchedResource
from nodemesh.controlplane.kube._status import ObservableStatusSource, StatusSource

__all__ = [
    "FINALIZER",
    "RESOURCES",
    "KubeSourceError",
    "LeaseError",
    "ObservableStatusSource",
    "Operator",
    "OperatorError",
    "OperatorOptions",
    "StatusSource",
    "WatchedResource",
    "add_arguments",
    "default_connection",
    "options_from_args",
    "run_operator",
    "stray_flags",
]
