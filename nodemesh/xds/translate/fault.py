"""IR `Fault` -> the per-route config of Envoy's fault filter (delay and abort, in percent).

The HTTP connection manager always carries an empty fault filter (see `listener.py`); a route
with faults overrides it through `typed_per_filter_config`.
"""

from __future__ import annotations

from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._proto import duration, fraction

__all__ = ["FILTER_NAME", "fault_filter", "route_fault"]

FILTER_NAME = "envoy.filters.http.fault"


def fault_filter() -> fault_pb2.HTTPFault:
    """The listener-level filter: does nothing until a route overrides it."""
    return fault_pb2.HTTPFault()


def route_fault(fault: ir.Fault) -> fault_pb2.HTTPFault:
    out = fault_pb2.HTTPFault()
    if fault.delay_ms is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=duration(fault.delay_ms), percentage=fraction(fault.delay_percent)
            )
        )
    if fault.abort_status is not None:
        out.abort.CopyFrom(
            fault_pb2.FaultAbort(
                http_status=fault.abort_status, percentage=fraction(fault.abort_percent)
            )
        )
    return out
