"""Helpers shared by test modules. `need()`: a missing prerequisite fails in CI, skips elsewhere."""

from __future__ import annotations

import os
import socket
import sys

import pytest

IN_CI = os.environ.get("CI") == "true"


def need(condition: object, reason: str) -> None:
    """Stop the test when a prerequisite is missing: fail under CI=true, skip (printed) otherwise."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {reason}", pytrace=False)
    print(f"SKIP: {reason}", file=sys.stderr)
    pytest.skip(reason)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for listeners that Envoy binds itself)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
