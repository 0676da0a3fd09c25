"""IR `Retry` -> Envoy `RetryPolicy`: retry_on, status codes, attempts, per-try timeout, backoff."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._proto import any_of, duration, uint32

__all__ = ["retry_policy"]


def retry_policy(retry: ir.Retry) -> rc.RetryPolicy:
    policy = rc.RetryPolicy(retry_on=",".join(retry.retry_on))
    if retry.num_retries is not None:
        policy.num_retries.CopyFrom(uint32(retry.num_retries))
    if retry.status_codes:
        policy.retriable_status_codes.extend(retry.status_codes)
    if retry.per_try_timeout_ms is not None:
        policy.per_try_timeout.CopyFrom(duration(retry.per_try_timeout_ms))
    if retry.backoff_base_ms is not None:
        policy.retry_back_off.base_interval.CopyFrom(duration(retry.backoff_base_ms))
        if retry.backoff_max_ms is not None:
            policy.retry_back_off.max_interval.CopyFrom(duration(retry.backoff_max_ms))
    if retry.skip_previous_hosts:
        policy.retry_host_predicate.add(
            name="envoy.retry_host_predicates.previous_hosts",
            typed_config=any_of(previous_hosts_pb2.PreviousHostsPredicate()),
        )
        policy.host_selection_retry_max_attempts = 3
    return policy
