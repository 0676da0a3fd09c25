"""IR `Cluster` -> Envoy `Cluster`: EDS over ADS, HTTP/2 for gRPC/h2c, timeouts, resilience."""

from __future__ import annotations

import hashlib

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2 as hpo_pb2

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._encode import LEN, VARINT, tag, varint
from nodemesh.xds.translate._proto import any_of, duration
from nodemesh.xds.translate.circuit import NO_LIMITS, circuit_breakers
from nodemesh.xds.translate.lb import apply_lb_policy
from nodemesh.xds.translate.outlier import outlier_detection

__all__ = ["DEFAULT_CONNECT_TIMEOUT_MS", "cluster", "cluster_bytes", "cluster_of_eds_name"]

DEFAULT_CONNECT_TIMEOUT_MS = 5000
_HPO_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# Made once and copied into every cluster (never altered): 10,000 clusters add up.
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.V3,
)
_DEFAULT_CONNECT_TIMEOUT = duration(DEFAULT_CONNECT_TIMEOUT_MS)


def cluster(c: ir.Cluster) -> cluster_pb2.Cluster:
    out = cluster_pb2.Cluster(name=c.name, type=cluster_pb2.Cluster.EDS)
    out.connect_timeout.CopyFrom(
        _DEFAULT_CONNECT_TIMEOUT if c.connect_timeout_ms is None else duration(c.connect_timeout_ms)
    )
    out.eds_cluster_config.eds_config.CopyFrom(_ADS)
    if c.http2:
        options = hpo_pb2.HttpProtocolOptions()
        options.explicit_http_config.http2_protocol_options.SetInParent()
        out.typed_extension_protocol_options[_HPO_KEY].CopyFrom(any_of(options))
    out.circuit_breakers.CopyFrom(
        NO_LIMITS if c.circuit_breaker is None else circuit_breakers(c.circuit_breaker)
    )
    if c.outlier is not None:
        out.outlier_detection.CopyFrom(outlier_detection(c.outlier))
    if c.lb is not None:
        apply_lb_policy(out, c.lb.policy)
    # Envoy re-warms a changed EDS cluster and waits for its endpoints, but over delta ADS it
    # sends no new EDS request for a name it already watches: the warming cluster would wait
    # for the initial fetch timeout (15 s). Naming the EDS resource after the cluster's content
    # makes every changed cluster subscribe to a new name, which the server answers at once.
    digest = hashlib.blake2b(out.SerializeToString(deterministic=True), digest_size=4).hexdigest()
    out.eds_cluster_config.service_name = f"{c.name}@{digest}"
    return out


def _field(tag_bytes: bytes, payload: bytes) -> bytes:
    return tag_bytes + varint(len(payload)) + payload


_EDS = cluster_pb2.Cluster.EdsClusterConfig
_NAME = tag(cluster_pb2.Cluster, "name", LEN)
_TYPE_EDS = tag(cluster_pb2.Cluster, "type", VARINT) + varint(cluster_pb2.Cluster.EDS)
_EDS_CLUSTER_CONFIG = tag(cluster_pb2.Cluster, "eds_cluster_config", LEN)
_EDS_CONFIG = _field(tag(_EDS, "eds_config", LEN), _ADS.SerializeToString(deterministic=True))
_EDS_SERVICE_NAME = tag(_EDS, "service_name", LEN)
_CONNECT_TIMEOUT = _field(
    tag(cluster_pb2.Cluster, "connect_timeout", LEN),
    _DEFAULT_CONNECT_TIMEOUT.SerializeToString(deterministic=True),
)
_NO_LIMITS = _field(
    tag(cluster_pb2.Cluster, "circuit_breakers", LEN),
    NO_LIMITS.SerializeToString(deterministic=True),
)
_UNNAMED_EDS = _field(_EDS_CLUSTER_CONFIG, _EDS_CONFIG)  # what the digest covers
# The fields cluster_bytes writes, in field-number order (as deterministic serialization does).
_ORDER = ("name", "type", "eds_cluster_config", "connect_timeout", "circuit_breakers")
_NUMBERS = [cluster_pb2.Cluster.DESCRIPTOR.fields_by_name[n].number for n in _ORDER]
assert _NUMBERS == sorted(_NUMBERS)
assert [_EDS.DESCRIPTOR.fields_by_name[n].number for n in ("eds_config", "service_name")] == [1, 2]


def cluster_bytes(c: ir.Cluster) -> tuple[bytes, str] | None:
    """`cluster(c)` serialized deterministically, and its EDS service name, for a cluster with
    nothing but defaults (most: no policy, HTTP/1); None for the others. 10,000 cluster
    messages cost about as much as the rest of a cluster's translation."""
    if (
        c.http2
        or c.connect_timeout_ms is not None
        or c.circuit_breaker is not None
        or c.outlier is not None
        or c.lb is not None
    ):
        return None
    name = c.name.encode()
    head = (_field(_NAME, name) if name else b"") + _TYPE_EDS
    tail = _CONNECT_TIMEOUT + _NO_LIMITS
    digest = hashlib.blake2b(head + _UNNAMED_EDS + tail, digest_size=4).hexdigest()
    eds_name = f"{c.name}@{digest}"
    eds = _EDS_CONFIG + _field(_EDS_SERVICE_NAME, eds_name.encode())
    return head + _field(_EDS_CLUSTER_CONFIG, eds) + tail, eds_name


def cluster_of_eds_name(eds_name: str) -> str:
    """The cluster an EDS resource name belongs to ("ns/svc:80@1a2b3c4d" -> "ns/svc:80")."""
    return eds_name.rsplit("@", 1)[0]
