"""Everything on the Envoy side of the control plane: resource types, snapshot cache, ADS server."""

from __future__ import annotations

__all__: list[str] = []
