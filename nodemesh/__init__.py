"""nodemesh: a sidecarless service mesh with a Python control plane."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
