"""The control plane: input objects (store), build (objects -> IR + conditions), the pipeline
that translates the IR into per-node snapshots, and status (ACK/NACK -> `Programmed`).

Public modules: `store` (the input contract for sources), `pipeline` (rebuilds and conditions).
"""

from __future__ import annotations

__all__: list[str] = []
