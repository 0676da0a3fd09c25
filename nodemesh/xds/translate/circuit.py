"""IR `CircuitBreaker` -> Envoy cluster `CircuitBreakers` (limits and the retry budget)."""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2 as cb_pb2
from envoy.type.v3 import percent_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._proto import uint32

__all__ = ["circuit_breakers"]


def circuit_breakers(cb: ir.CircuitBreaker) -> cb_pb2.CircuitBreakers:
    t = cb_pb2.CircuitBreakers.Thresholds()
    for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
        value = getattr(cb, field)
        if value is not None:
            getattr(t, field).CopyFrom(uint32(value))
    if cb.retry_budget_percent is not None or cb.retry_budget_min_concurrency is not None:
        if cb.retry_budget_percent is not None:
            t.retry_budget.budget_percent.CopyFrom(
                percent_pb2.Percent(value=cb.retry_budget_percent)
            )
        if cb.retry_budget_min_concurrency is not None:
            t.retry_budget.min_retry_concurrency.CopyFrom(uint32(cb.retry_budget_min_concurrency))
    return cb_pb2.CircuitBreakers(thresholds=[t])
