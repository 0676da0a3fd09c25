"""Errors raised by the xDS server.

ServerError            the server could not start or bind
"""

from __future__ import annotations

__all__ = ["ServerError"]


class ServerError(Exception):
    """The xDS server could not start (bind failed, address in use)."""
