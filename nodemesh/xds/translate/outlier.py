"""IR `OutlierDetection` -> Envoy cluster `OutlierDetection` (passive ejection of bad hosts)."""

from __future__ import annotations

from envoy.config.cluster.v3 import outlier_detection_pb2 as od_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._proto import duration, uint32

__all__ = ["outlier_detection"]


def outlier_detection(od: ir.OutlierDetection) -> od_pb2.OutlierDetection:
    out = od_pb2.OutlierDetection()
    if od.consecutive_5xx is not None:
        out.consecutive_5xx.CopyFrom(uint32(od.consecutive_5xx))
    else:
        # Envoy defaults to 5 consecutive 5xx; a policy that names only gateway errors
        # means "only gateway errors", so switch the 5xx detector off.
        out.enforcing_consecutive_5xx.CopyFrom(uint32(0))
    if od.consecutive_gateway_errors is not None:
        out.consecutive_gateway_failure.CopyFrom(uint32(od.consecutive_gateway_errors))
        out.enforcing_consecutive_gateway_failure.CopyFrom(uint32(100))
    if od.interval_ms is not None:
        out.interval.CopyFrom(duration(od.interval_ms))
    if od.base_ejection_time_ms is not None:
        out.base_ejection_time.CopyFrom(duration(od.base_ejection_time_ms))
    if od.max_ejection_percent is not None:
        out.max_ejection_percent.CopyFrom(uint32(od.max_ejection_percent))
    if od.max_ejection_percent != 0:
        # Envoy ejects no host that would take the ejected share above max_ejection_percent
        # (default 10%): without this, a Service with fewer than 10 endpoints (most) would
        # never have one ejected. 0 stays "eject none".
        out.always_eject_one_host.value = True
    # Success-rate ejection needs request volumes a mesh service rarely has per node.
    out.enforcing_success_rate.CopyFrom(uint32(0))
    return out
