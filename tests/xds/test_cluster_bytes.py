"""The hand-encoded Cluster (no policy, HTTP/1) is byte-identical to protobuf's deterministic
serialization of `cluster(c)`, with the same EDS service name, so versions match."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nodemesh.xds import types
from nodemesh.xds.translate import Translator, ir, translate_messages
from nodemesh.xds.translate.cluster import cluster, cluster_bytes

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)
_clusters = st.builds(
    ir.Cluster,
    name=_text,
    service=_text,
    port=st.integers(0, 65535),
    http2=st.booleans(),
    connect_timeout_ms=st.none() | st.integers(0, 10**7),
    circuit_breaker=st.none() | st.builds(ir.CircuitBreaker, max_requests=st.integers(0, 10**6)),
    outlier=st.none() | st.builds(ir.OutlierDetection, consecutive_5xx=st.integers(0, 100)),
    origins=st.lists(_text, max_size=2).map(tuple),
)


@settings(max_examples=500)
@given(_clusters)
def test_encoded_cluster_equals_protobuf_bytes(c: ir.Cluster) -> None:
    encoded = cluster_bytes(c)
    plain = c.connect_timeout_ms is None and not (c.http2 or c.circuit_breaker or c.outlier)
    assert (encoded is not None) == plain
    if encoded is not None:
        message = cluster(c)
        assert encoded == (
            message.SerializeToString(deterministic=True),
            message.eds_cluster_config.service_name,
        )


@given(st.lists(_clusters, max_size=6, unique_by=lambda c: c.name))
def test_translator_clusters_match_translate_messages(clusters: list[ir.Cluster]) -> None:
    mesh = ir.Mesh(
        clusters=tuple(clusters),
        endpoints=tuple(ir.ClusterEndpoints(c.name, ()) for c in clusters),
    )
    translation = Translator().translate(mesh)
    messages = translate_messages(mesh)
    for t in (types.CLUSTER, types.ENDPOINT):
        assert [r.payload for r in translation.shared[t]] == [
            m.SerializeToString(deterministic=True) for m in messages[t]
        ]
        assert [r.message for r in translation.shared[t]] == messages[t]
    for r in translation.shared[types.CLUSTER]:
        # what the encoder declared is what the message says (consistent() trusts it)
        if r.references is not None:
            assert r.message.type == r.message.EDS
            assert r.references == (r.message.eds_cluster_config.service_name or r.message.name,)
    assert translation.snapshot().consistent() == []
