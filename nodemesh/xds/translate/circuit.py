"""IR `CircuitBreaker` -> Envoy cluster `CircuitBreakers` (limits and the retry budget)."""

from __future__ import annotations

from envoy.config.cluster.v3 import circuit_breaker_pb2 as cb_pb2
from envoy.type.v3 import percent_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._proto import uint32

__all__ = ["NO_LIMITS", "UNLIMITED", "circuit_breakers"]

# A limit left unset is none. Envoy's own defaults are 1,024 connections, pending requests and
# requests, and 3 concurrent retries, per cluster and Envoy: all the pods of a node share one
# node Envoy, so together they would reach them (a 1,025th WebSocket to one Service, or a
# fourth retry under load, answered 503), where a TrafficPolicy asked for no limit.
UNLIMITED = 0xFFFF_FFFF


def circuit_breakers(cb: ir.CircuitBreaker | None) -> cb_pb2.CircuitBreakers:
    """The cluster's thresholds: `cb`'s limits, and no limit where it sets none (a retry
    budget, when set, stands in for `max_retries`)."""
    if cb is None:
        cb = _NONE
    t = cb_pb2.CircuitBreakers.Thresholds()
    budget = cb.retry_budget_percent is not None or cb.retry_budget_min_concurrency is not None
    for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
        value = getattr(cb, field)
        if value is None and field == "max_retries" and budget:
            continue  # Envoy ignores max_retries next to a budget
        getattr(t, field).CopyFrom(uint32(UNLIMITED if value is None else value))
    if budget:
        if cb.retry_budget_percent is not None:
            t.retry_budget.budget_percent.CopyFrom(
                percent_pb2.Percent(value=cb.retry_budget_percent)
            )
        if cb.retry_budget_min_concurrency is not None:
            t.retry_budget.min_retry_concurrency.CopyFrom(uint32(cb.retry_budget_min_concurrency))
    return cb_pb2.CircuitBreakers(thresholds=[t])


_NONE = ir.CircuitBreaker()
NO_LIMITS = circuit_breakers(None)  # a cluster without a policy's circuit breaker or budget
