"""The Prometheus text exposition format (version 0.0.4), written by hand (no client library):
what `/metrics` of the control plane and of the node agent answer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["CONTENT_TYPE", "Exposition", "Sample"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Sample = tuple[Mapping[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    """Metric families in the order added; `text()` is the body to answer."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        """A family: `kind` "gauge" or "counter" (named ..._total), its HELP line and samples
        (labels, value)."""
        help_line = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines += (f"# HELP {name} {help_line}", f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self._lines.append(
                f"{name}{{{text}}} {_number(value)}" if text else f"{name} {_number(value)}"
            )

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"
