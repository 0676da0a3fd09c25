"""Exceptions of the node data plane.

NodemeshEbpfError
├── BpfError          a libbpf or bpf() call failed; carries the operation, the path or
│                     object it was about, and the errno
├── BuildError        clang could not compile a BPF program
└── ServiceMapError   a NodeServiceMap from the control plane cannot be applied (NACKed)
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = ["BpfError", "BuildError", "NodemeshEbpfError", "ServiceMapError"]


class NodemeshEbpfError(Exception):
    """Base of every error raised by `nodemesh.ebpf`."""


class BpfError(NodemeshEbpfError):
    """A libbpf/bpf() operation failed. `str()` reads like "pin link at /sys/fs/bpf/...: EPERM"."""

    def __init__(self, operation: str, errno: int) -> None:
        self.operation = operation
        self.errno = errno
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{operation}: {name} ({os.strerror(errno)})")


class BuildError(NodemeshEbpfError):
    """clang failed; the message holds its diagnostics."""


class ServiceMapError(NodemeshEbpfError):
    """The service map is invalid or does not fit the kernel maps; the agent NACKs it."""
