"""Errors of the Kubernetes source.

KubeSourceError
├── LeaseError          the Lease could not be read or written (leadership is unknown)
├── ListingError        a list of our own (outside kopf) failed
└── OperatorError       the API server refused the credentials before the cluster was listed
"""

from __future__ import annotations

__all__ = ["KubeSourceError", "LeaseError", "ListingError", "OperatorError"]


class KubeSourceError(Exception):
    """Base of the errors raised by `nodemesh.controlplane.kube`."""


class LeaseError(KubeSourceError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the API server's HTTP status, if it answered


class ListingError(KubeSourceError):
    pass


class OperatorError(KubeSourceError):
    pass
