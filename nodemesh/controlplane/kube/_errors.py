"""Errors of the Kubernetes source.

KubeSourceError
├── LeaseError          the Lease could not be read or written (leadership is unknown)
└── OperatorError       kopf stopped for a reason other than a stop request
"""

from __future__ import annotations

__all__ = ["KubeSourceError", "LeaseError", "OperatorError"]


class KubeSourceError(Exception):
    """Base of the errors raised by `nodemesh.controlplane.kube`."""


class LeaseError(KubeSourceError):
    pass


class OperatorError(KubeSourceError):
    pass
