"""TrafficPolicy -> per (Service, port) resilience settings, with conditions.

Precedence, most specific first: a targetRef with `sectionName` (one port) beats one without;
among equals the oldest policy (creationTimestamp, then namespace/name) wins, section by section
(retry, timeouts, circuitBreaker, outlierDetection, loadBalancer, faultInjection). Route rules
override a policy's retry and request timeout field by field (see `_routes.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from nodemesh.controlplane.builder._util import (
    Problems,
    as_list,
    as_map,
    creation,
    int_in,
    parse_duration,
)
from nodemesh.controlplane.builder.service import ServiceModel, no_http_port
from nodemesh.xds.translate import ir

__all__ = [
    "RETRY_ON",
    "PolicySettings",
    "RetrySpec",
    "TrafficPolicyModel",
    "read_traffic_policy",
    "settings_for",
]

RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "reset-before-request",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "reset")
SECTIONS = (
    "retry",
    "timeouts",
    "circuitBreaker",
    "outlierDetection",
    "loadBalancer",
    "faultInjection",
)


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """Retry settings where None means "not set here" (so layers can be merged)."""

    retry_on: tuple[str, ...] | None = None
    status_codes: tuple[int, ...] | None = None
    attempts: int | None = None
    per_try_timeout_ms: int | None = None
    backoff_base_ms: int | None = None
    backoff_max_ms: int | None = None
    skip_previous_hosts: bool | None = None

    def over(self, under: RetrySpec | None) -> RetrySpec:
        """These settings, with unset fields taken from `under`. A backoff base taken from here
        above a maximum taken from `under` (a route's `backoff: 1s` over a policy's
        `maxInterval: 250ms`) raises the maximum to the base: Envoy refuses a maximum below
        the base, and that NACK would hold back the RouteConfiguration of every Service."""
        if under is None:
            return self
        merged = RetrySpec(
            **{
                f.name: getattr(self, f.name)
                if getattr(self, f.name) is not None
                else getattr(under, f.name)
                for f in fields(self)
            }
        )
        base, most = merged.backoff_base_ms, merged.backoff_max_ms
        if base is not None and most is not None and most < base:
            merged = replace(merged, backoff_max_ms=base)
        return merged

    def to_ir(self) -> ir.Retry:
        retry_on = self.retry_on if self.retry_on is not None else DEFAULT_RETRY_ON
        if self.status_codes and "retriable-status-codes" not in retry_on:
            retry_on = (*retry_on, "retriable-status-codes")
        return ir.Retry(
            retry_on=retry_on,
            status_codes=self.status_codes or (),
            num_retries=self.attempts,
            per_try_timeout_ms=self.per_try_timeout_ms,
            backoff_base_ms=self.backoff_base_ms,
            backoff_max_ms=self.backoff_max_ms,
            skip_previous_hosts=bool(self.skip_previous_hosts),
        )


@dataclass(frozen=True, slots=True)
class PolicySettings:
    retry: RetrySpec | None = None
    budget_percent: float | None = None
    budget_min_concurrency: int | None = None
    request_timeout_ms: int | None = None
    idle_timeout_ms: int | None = None
    connect_timeout_ms: int | None = None
    circuit_breaker: ir.CircuitBreaker | None = None
    outlier: ir.OutlierDetection | None = None
    lb: ir.LoadBalancer | None = None
    fault: ir.Fault | None = None
    origins: tuple[str, ...] = ()

    @property
    def route_level(self) -> bool:
        return any(
            v is not None
            for v in (self.retry, self.request_timeout_ms, self.idle_timeout_ms, self.fault)
        )

    def cluster_breaker(self) -> ir.CircuitBreaker | None:
        cb = self.circuit_breaker
        if self.budget_percent is None and self.budget_min_concurrency is None:
            return cb
        return replace(
            cb or ir.CircuitBreaker(),
            retry_budget_percent=self.budget_percent,
            retry_budget_min_concurrency=self.budget_min_concurrency,
        )


@dataclass(frozen=True, slots=True)
class Target:
    namespace: str
    name: str
    section: str  # a port name, or "" for every port


@dataclass(slots=True)
class TrafficPolicyModel:
    key: str  # "TrafficPolicy/ns/name"
    order: tuple[str, str]  # (creationTimestamp, ns/name): older first
    targets: list[Target]
    sections: dict[str, PolicySettings]  # section -> the settings it contributes
    problems: Problems = field(default_factory=Problems)
    unresolved: list[str] = field(default_factory=list)
    # (section, winning policy) -> the (namespace, Service, port)s where it won over this one
    overridden: dict[tuple[str, str], set[tuple[str, str, int]]] = field(default_factory=dict)
    headless: list[str] = field(default_factory=list)  # targets with clusterIP: None


def _retry(spec: Mapping[str, Any], p: Problems) -> tuple[RetrySpec, float | None, int | None]:
    path = "spec.retry"
    retry_on = None
    if "retryOn" in spec:
        values = as_list(spec.get("retryOn"))
        bad = [v for v in values if v not in RETRY_ON]
        if bad or not values:
            p.add(f"{path}.retryOn", f"unsupported values {bad!r}; allowed: {', '.join(RETRY_ON)}")
        retry_on = tuple(v for v in values if v in RETRY_ON)
    codes = None
    if "retriableStatusCodes" in spec:
        raw = as_list(spec.get("retriableStatusCodes"))
        codes = tuple(
            c
            for i, c in enumerate(raw)
            if int_in(c, f"{path}.retriableStatusCodes[{i}]", p, 400, 599)
        )
    backoff = as_map(spec.get("backoff"))
    base = parse_duration(backoff.get("baseInterval"), f"{path}.backoff.baseInterval", p)
    top = parse_duration(backoff.get("maxInterval"), f"{path}.backoff.maxInterval", p)
    if base is not None and top is not None and top < base:
        p.add(f"{path}.backoff", "maxInterval must be at least baseInterval")
    if base == 0:
        p.add(f"{path}.backoff.baseInterval", "must be greater than 0")
    if top == 0:
        p.add(f"{path}.backoff.maxInterval", "must be greater than 0")
    if top is not None and base is None:
        p.add(f"{path}.backoff", "maxInterval needs baseInterval")
    budget = as_map(spec.get("budget"))
    percent = budget.get("percent")
    if percent is not None and (
        isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100
    ):
        p.add(f"{path}.budget.percent", f"must be a number in [0, 100], got {percent!r}")
        percent = None
    min_conc = int_in(
        budget.get("minConcurrency"), f"{path}.budget.minConcurrency", p, 1, (1 << 31) - 1
    )
    if "budget" in spec and percent is None and min_conc is None:
        # `budget: {}` is a budget of Envoy's defaults (20%, at least 3); with neither field
        # set, no retry_budget would be written and maxRetries would still limit retries.
        percent = 20.0
    skip = spec.get("skipPreviousHosts")
    if skip is not None and not isinstance(skip, bool):
        p.add(f"{path}.skipPreviousHosts", "must be a boolean")
        skip = None
    per_try = parse_duration(spec.get("perTryTimeout"), f"{path}.perTryTimeout", p)
    if per_try == 0:
        p.add(f"{path}.perTryTimeout", "must be greater than 0")
    retry = RetrySpec(
        retry_on=retry_on,
        status_codes=codes,
        attempts=int_in(spec.get("attempts"), f"{path}.attempts", p, 0, 100),
        per_try_timeout_ms=per_try,
        backoff_base_ms=base,
        backoff_max_ms=top,
        skip_previous_hosts=skip,
    )
    return retry, float(percent) if percent is not None else None, min_conc


# The CRD's patterns and maxLength for `hashOn.header` (an RFC 9110 token) and `cookie.name`
_HASH_HEADER = re.compile(r"[A-Za-z0-9!#$%&'*+\-.^_`|~]{1,256}")
_HASH_COOKIE = re.compile(r"[A-Za-z0-9_\-.]{1,256}")


def _lb(spec: Mapping[str, Any], p: Problems) -> ir.LoadBalancer | None:
    """The CRD's rules, by presence as CEL's `has()` tests it: an empty `hashOn: {}` is there
    (so RoundRobin refuses it) and hashes on nothing (so RingHash refuses it too)."""
    if "type" not in spec:
        p.add("spec.loadBalancer.type", "required: RoundRobin, LeastRequest, RingHash or Maglev")
        return None
    kind = spec["type"]
    if kind not in ("RoundRobin", "LeastRequest", "RingHash", "Maglev"):
        p.add("spec.loadBalancer.type", f"unsupported value {kind!r}")
        return None
    hash_on = as_map(spec.get("hashOn"))
    header = hash_on.get("header", "")
    cookie = as_map(hash_on.get("cookie"))
    if kind in ("RingHash", "Maglev") and "hashOn" not in spec:
        p.add("spec.loadBalancer.hashOn", f"{kind} needs hashOn.header or hashOn.cookie")
    if kind not in ("RingHash", "Maglev") and "hashOn" in spec:
        p.add("spec.loadBalancer.hashOn", f"only RingHash and Maglev hash; {kind} does not")
    if "hashOn" in spec and ("header" in hash_on) == ("cookie" in hash_on):
        p.add("spec.loadBalancer.hashOn", "set exactly one of header or cookie")
    if "header" in hash_on and not header:
        p.add("spec.loadBalancer.hashOn.header", "must not be empty")
    elif header and not _HASH_HEADER.fullmatch(str(header)):
        # The CRD's pattern, checked here for files mode: a CR, LF or NUL in the name makes
        # Envoy refuse the outbound RouteConfiguration, which holds every Service's routes.
        p.add(
            "spec.loadBalancer.hashOn.header",
            f"must be a header name of at most 256 letters, digits and !#$%&'*+-.^_`|~, "
            f"got {header!r}",
        )
    if "cookie" in hash_on and not cookie.get("name"):
        p.add("spec.loadBalancer.hashOn.cookie.name", "required")
    elif "cookie" in hash_on and not _HASH_COOKIE.fullmatch(str(cookie["name"])):
        # The CRD's pattern: Envoy writes the name into the Set-Cookie header it adds.
        p.add(
            "spec.loadBalancer.hashOn.cookie.name",
            f"must be a cookie name of at most 256 letters, digits and _-., got {cookie['name']!r}",
        )
    return ir.LoadBalancer(
        policy=kind,
        hash_header=str(header).lower(),
        hash_cookie=str(cookie.get("name", "")),
        hash_cookie_ttl_ms=parse_duration(
            cookie.get("ttl"), "spec.loadBalancer.hashOn.cookie.ttl", p
        ),
    )


def _percent(value: Any, path: str, p: Problems) -> float:
    if value is None:
        return 100.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        p.add(path, f"must be a number in [0, 100], got {value!r}")
        return 0.0
    return float(value)


def _fault(spec: Mapping[str, Any], p: Problems) -> ir.Fault:
    delay = as_map(spec.get("delay"))
    abort = as_map(spec.get("abort"))
    if not delay and not abort:
        p.add("spec.faultInjection", "set delay, abort or both")
    # Envoy refuses a zero fixed_delay, and that NACK would hold back every Service's routes.
    delay_ms = _positive_duration(
        delay.get("fixedDelay"), "spec.faultInjection.delay.fixedDelay", p
    )
    if delay and delay_ms is None and "fixedDelay" not in delay:
        p.add("spec.faultInjection.delay.fixedDelay", "required")
    status = int_in(abort.get("httpStatus"), "spec.faultInjection.abort.httpStatus", p, 200, 599)
    if abort and "httpStatus" not in abort:
        p.add("spec.faultInjection.abort.httpStatus", "required")
    return ir.Fault(
        delay_ms=delay_ms,
        delay_percent=_percent(delay.get("percent"), "spec.faultInjection.delay.percent", p),
        abort_status=status,
        abort_percent=_percent(abort.get("percent"), "spec.faultInjection.abort.percent", p),
    )


def read_traffic_policy(obj: Mapping[str, Any]) -> TrafficPolicyModel:
    meta = as_map(obj.get("metadata"))
    ns, name = str(meta.get("namespace", "default")), str(meta.get("name", ""))
    spec = as_map(obj.get("spec"))
    p = Problems()
    key = f"TrafficPolicy/{ns}/{name}"
    targets: list[Target] = []
    refs = as_list(spec.get("targetRefs"))
    if not refs:
        p.add("spec.targetRefs", "at least one targetRef is required")
    for i, ref in enumerate(refs):
        ref = as_map(ref)
        if ref.get("group", "") != "" or ref.get("kind") != "Service":
            p.add(f"spec.targetRefs[{i}]", 'only Services (group "", kind Service) can be targeted')
            continue
        if not ref.get("name"):
            p.add(f"spec.targetRefs[{i}].name", "required")
            continue
        targets.append(Target(ns, str(ref["name"]), str(ref.get("sectionName", ""))))

    sections: dict[str, PolicySettings] = {}
    origins = (key,)
    if "retry" in spec:
        retry, percent, min_conc = _retry(as_map(spec["retry"]), p)
        sections["retry"] = PolicySettings(
            # A section with only a budget (cluster-level) asks for no retries: without this,
            # every route of the Service got a retry policy of Envoy's defaults. An empty
            # `retry: {}` does ask for them.
            retry=None if retry == RetrySpec() and "budget" in as_map(spec["retry"]) else retry,
            budget_percent=percent,
            budget_min_concurrency=min_conc,
            origins=origins,
        )
    if "timeouts" in spec:
        t = as_map(spec["timeouts"])
        if not t:
            # The CRD's minProperties: an empty section would still win the whole section
            # over a newer policy's timeouts and set none.
            p.add("spec.timeouts", "set at least one of connect, request, idle")
        connect = parse_duration(t.get("connect"), "spec.timeouts.connect", p)
        if connect == 0:
            p.add("spec.timeouts.connect", "must be greater than 0")
        sections["timeouts"] = PolicySettings(
            request_timeout_ms=parse_duration(t.get("request"), "spec.timeouts.request", p),
            idle_timeout_ms=parse_duration(t.get("idle"), "spec.timeouts.idle", p),
            connect_timeout_ms=connect,
            origins=origins,
        )
    if "circuitBreaker" in spec:
        cb = as_map(spec["circuitBreaker"])
        if not cb:
            p.add(
                "spec.circuitBreaker",
                "set at least one of maxConnections, maxPendingRequests, maxRequests, maxRetries",
            )
        limits = {
            f: int_in(cb.get(k), f"spec.circuitBreaker.{k}", p, 1, (1 << 31) - 1)
            for k, f in (
                ("maxConnections", "max_connections"),
                ("maxPendingRequests", "max_pending_requests"),
                ("maxRequests", "max_requests"),
                ("maxRetries", "max_retries"),
            )
        }
        sections["circuitBreaker"] = PolicySettings(
            circuit_breaker=ir.CircuitBreaker(**limits), origins=origins
        )
    if "outlierDetection" in spec:
        od = as_map(spec["outlierDetection"])
        path = "spec.outlierDetection"
        if "consecutive5xx" not in od and "consecutiveGatewayErrors" not in od:
            p.add(path, "set consecutive5xx, consecutiveGatewayErrors or both")
        sections["outlierDetection"] = PolicySettings(
            outlier=ir.OutlierDetection(
                consecutive_5xx=int_in(
                    od.get("consecutive5xx"), f"{path}.consecutive5xx", p, 1, 1000
                ),
                consecutive_gateway_errors=int_in(
                    od.get("consecutiveGatewayErrors"),
                    f"{path}.consecutiveGatewayErrors",
                    p,
                    1,
                    1000,
                ),
                interval_ms=_positive_duration(od.get("interval"), f"{path}.interval", p),
                base_ejection_time_ms=_positive_duration(
                    od.get("baseEjectionTime"), f"{path}.baseEjectionTime", p
                ),
                max_ejection_percent=int_in(
                    od.get("maxEjectionPercent"), f"{path}.maxEjectionPercent", p, 0, 100
                ),
            ),
            origins=origins,
        )
    if "loadBalancer" in spec:
        sections["loadBalancer"] = PolicySettings(
            lb=_lb(as_map(spec["loadBalancer"]), p), origins=origins
        )
    if "faultInjection" in spec:
        sections["faultInjection"] = PolicySettings(
            fault=_fault(as_map(spec["faultInjection"]), p), origins=origins
        )
    if not sections:
        p.add("spec", f"set at least one of {', '.join(SECTIONS)}")
    return TrafficPolicyModel(key, (creation(obj), f"{ns}/{name}"), targets, sections, p)


def _positive_duration(value: Any, path: str, p: Problems) -> int | None:
    ms = parse_duration(value, path, p)
    if ms == 0:
        p.add(path, "must be greater than 0")
    return ms


def _merge(a: PolicySettings, b: PolicySettings) -> PolicySettings:
    """Fields set in `a` win; origins are the union."""
    values = {
        f.name: getattr(a, f.name) if getattr(a, f.name) is not None else getattr(b, f.name)
        for f in fields(a)
        if f.name != "origins"
    }
    origins = tuple(sorted({*a.origins, *b.origins}))
    return PolicySettings(**values, origins=origins)


def settings_for(
    policies: Iterable[TrafficPolicyModel], services: Mapping[tuple[str, str], ServiceModel]
) -> dict[tuple[str, str, int], PolicySettings]:
    """Resolve targets (recording unresolved ones) and merge: (ns, service, port) -> settings."""
    # candidates per (service, port): (specificity, order, policy)
    per_port: dict[tuple[str, str, int], list[tuple[int, tuple[str, str], TrafficPolicyModel]]] = {}
    for pol in policies:
        if pol.problems:
            continue
        for t in pol.targets:
            svc = services.get((t.namespace, t.name))
            if svc is None:
                pol.unresolved.append(f"Service {t.namespace}/{t.name} not found")
                continue
            ports = (
                svc.ports if not t.section else tuple(p for p in svc.ports if p.name == t.section)
            )
            if not ports:
                pol.unresolved.append(
                    f"Service {t.namespace}/{t.name} has no port named {t.section!r}"
                    if t.section
                    # (a UDP-only Service: the mesh carries TCP ports only)
                    else f"Service {t.namespace}/{t.name} has no TCP port"
                )
                continue
            why = no_http_port(ports)
            if why:
                # Its connections stay L4, kernel-direct: the policy would apply nowhere, as
                # a route's parentRef there would (NoMatchingParent).
                pol.unresolved.append(
                    f"Service {t.namespace}/{t.name} has no HTTP port to apply to ({why})"
                )
                continue
            ref = f"{t.namespace}/{t.name}"
            if svc.headless and ref not in pol.headless:
                pol.headless.append(ref)
            for port in ports:
                if port.not_http:
                    # Its connections stay L4 (see `why`): the policy would apply nowhere
                    # there, yet take its place (said Programmed, and overridden on it).
                    continue
                specificity = 0 if t.section else 1
                per_port.setdefault((t.namespace, t.name, port.port), []).append(
                    (specificity, pol.order, pol)
                )
    out: dict[tuple[str, str, int], PolicySettings] = {}
    for port_key, candidates in per_port.items():
        candidates.sort(key=lambda c: (c[0], c[1]))
        merged = PolicySettings()
        winners: dict[str, TrafficPolicyModel] = {}
        for _, _, pol in candidates:
            for section, settings in pol.sections.items():
                winner = winners.get(section)
                if winner is not None and winner is not pol:
                    pol.overridden.setdefault((section, winner.key), set()).add(port_key)
                    continue
                winners[section] = pol
                merged = _merge(merged, settings)
        out[port_key] = merged
    return out
