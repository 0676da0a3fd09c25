"""IR `ClusterEndpoints` -> Envoy `ClusterLoadAssignment`; terminating endpoints drain.

`load_assignment` builds the message; `load_assignment_bytes` encodes the same message straight
to its deterministic wire bytes (100,000 endpoints through the protobuf Python API cost about a
second), with field numbers taken from the descriptors. Both give the same bytes.
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2 as ec_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf.descriptor import FieldDescriptor

from nodemesh.xds.translate import ir
from nodemesh.xds.translate._encode import LEN, VARINT, tag, varint

__all__ = ["load_assignment", "load_assignment_bytes"]


def load_assignment(ce: ir.ClusterEndpoints, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of `ce` as the EDS resource `name` (see `cluster.py` for the naming)."""
    by_zone: dict[str, list[ec_pb2.LbEndpoint]] = {}
    for e in ce.endpoints:
        lb = ec_pb2.LbEndpoint(
            endpoint=ec_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=e.address, port_value=e.port)
                )
            ),
            health_status=health_check_pb2.DRAINING if e.draining else health_check_pb2.HEALTHY,
        )
        by_zone.setdefault(e.zone, []).append(lb)
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for zone in sorted(by_zone):
        locality = out.endpoints.add(lb_endpoints=by_zone[zone])
        if zone:
            locality.locality.zone = zone
    return out


_CLA_NAME = tag(endpoint_pb2.ClusterLoadAssignment, "cluster_name", LEN)
_CLA_ENDPOINTS = tag(endpoint_pb2.ClusterLoadAssignment, "endpoints", LEN)
_LLE_LOCALITY = tag(ec_pb2.LocalityLbEndpoints, "locality", LEN)
_LLE_LB = tag(ec_pb2.LocalityLbEndpoints, "lb_endpoints", LEN)
_LOC_ZONE = tag(base_pb2.Locality, "zone", LEN)
_LB_ENDPOINT = tag(ec_pb2.LbEndpoint, "endpoint", LEN)
_LB_HEALTH = tag(ec_pb2.LbEndpoint, "health_status", VARINT)
_EP_ADDRESS = tag(ec_pb2.Endpoint, "address", LEN)
_ADDR_SOCKET = tag(address_pb2.Address, "socket_address", LEN)
_SA_ADDRESS = tag(address_pb2.SocketAddress, "address", LEN)
_SA_PORT = tag(address_pb2.SocketAddress, "port_value", VARINT)
_HEALTHY = _LB_HEALTH + varint(health_check_pb2.HEALTHY)
_DRAINING = _LB_HEALTH + varint(health_check_pb2.DRAINING)
assert (
    address_pb2.SocketAddress.DESCRIPTOR.fields_by_name["port_value"].type
    == FieldDescriptor.TYPE_UINT32
)


def _lb_endpoint(address: str, port: int, draining: bool) -> bytes:
    """One `LocalityLbEndpoints.lb_endpoints` entry (tag, length and the LbEndpoint)."""
    a = address.encode()
    # port_value is in a oneof, so it has presence: 0 is written too.
    sa = (_SA_ADDRESS + varint(len(a)) + a if a else b"") + _SA_PORT + varint(port)
    addr = _ADDR_SOCKET + varint(len(sa)) + sa
    ep = _EP_ADDRESS + varint(len(addr)) + addr
    body = _LB_ENDPOINT + varint(len(ep)) + ep + (_DRAINING if draining else _HEALTHY)
    return _LLE_LB + varint(len(body)) + body


# The one-byte tags of an LbEndpoint entry, outermost first, for the fast path below.
_ONE_BYTE_TAGS = all(
    len(t) == 1
    for t in (_LLE_LB, _LB_ENDPOINT, _EP_ADDRESS, _ADDR_SOCKET, _SA_ADDRESS, _SA_PORT, _LB_HEALTH)
)
_T_LLE_LB, _T_LB_ENDPOINT, _T_EP_ADDRESS, _T_ADDR_SOCKET, _T_SA_ADDRESS = (
    _LLE_LB[0],
    _LB_ENDPOINT[0],
    _EP_ADDRESS[0],
    _ADDR_SOCKET[0],
    _SA_ADDRESS[0],
)


# Per length of the tail (port_value and health_status): the tags and lengths before an
# address of each length up to the one-byte limit (index 0: an empty address, not this path).
_HEADS: dict[int, list[bytes]] = {}


def _heads(tail_size: int) -> list[bytes]:
    heads = _HEADS.get(tail_size)
    if heads is None:
        heads = [b""]
        for a in range(1, 120 - tail_size):
            n = a + tail_size  # the SocketAddress size
            heads.append(
                bytes(
                    (_T_LLE_LB, n + 8, _T_LB_ENDPOINT, n + 4, _T_EP_ADDRESS)
                    + (n + 2, _T_ADDR_SOCKET, n, _T_SA_ADDRESS, a)
                )
            )
        _HEADS[tail_size] = heads
    return heads


def _locality_head(zone: str, size: int) -> tuple[bytes, ...]:
    """The head of one `endpoints` entry (a LocalityLbEndpoints) whose lb_endpoints take
    `size` bytes: its tag and length, and the locality when the zone is set."""
    z = zone.encode()
    if not z:
        return (_CLA_ENDPOINTS, varint(size))
    loc = _LOC_ZONE + varint(len(z)) + z
    locality = _LLE_LOCALITY + varint(len(loc)) + loc
    return (_CLA_ENDPOINTS, varint(size + len(locality)), locality)


def _uniform_bytes(ce: ir.ClusterEndpoints, name: str) -> bytes | None:
    """`load_assignment_bytes` when every endpoint has the same port, draining flag and zone
    (one locality, one tail) and a short address (one-byte lengths): most clusters. None when
    that is not so."""
    _, port, draining, _, zone, _ = ce.endpoints[0]
    if not _ONE_BYTE_TAGS or type(port) is not int or not 0 <= port <= 0xFFFF_FFFF:
        return None
    tail = _SA_PORT + varint(port) + (_DRAINING if draining else _HEALTHY)
    heads = _heads(len(tail))
    limit = len(heads)
    pieces: list[bytes] = []
    total = 0
    for address, p, d, _, z, _ in ce.endpoints:
        if p != port or d != draining or z != zone:
            return None
        a = address.encode()
        n = len(a)
        if not 0 < n < limit:
            return None
        pieces += (heads[n], a, tail)
        total += n
    size = total + len(ce.endpoints) * (len(heads[1]) + len(tail))
    cla_name = name.encode()
    out = [_CLA_NAME, varint(len(cla_name)), cla_name] if cla_name else []
    out += _locality_head(zone, size)
    out += pieces
    return b"".join(out)


def load_assignment_bytes(ce: ir.ClusterEndpoints, name: str) -> bytes:
    """`load_assignment(ce, name).SerializeToString(deterministic=True)`, without the message."""
    if ce.endpoints:
        uniform = _uniform_bytes(ce, name)
        if uniform is not None:
            return uniform
    by_zone: dict[str, list[bytes]] = {}  # zone -> the pieces of its lb_endpoints entries
    sizes: dict[str, int] = {}
    # (port, draining) -> the bytes after the address: port_value, then health_status.
    tails: dict[tuple[int, bool], bytes] = {}
    # (SocketAddress size, address size) -> the tags and lengths before the address.
    heads: dict[tuple[int, int], bytes] = {}
    for address, port, draining, _node, zone_name, _ in ce.endpoints:
        tail = tails.get((port, draining))
        if tail is None:
            if type(port) is not int or not 0 <= port <= 0xFFFF_FFFF:
                # Out of range for uint32: let protobuf raise what it raises.
                payload: bytes = load_assignment(ce, name).SerializeToString(deterministic=True)
                return payload
            tail = _SA_PORT + varint(port) + (_DRAINING if draining else _HEALTHY)
            tails[(port, draining)] = tail
        a = address.encode()
        # SocketAddress size: the address field (tag, length, bytes) and the port field.
        n = len(a) + len(tail)
        zone = by_zone.get(zone_name)
        if zone is None:
            by_zone[zone_name] = zone = []
            sizes[zone_name] = 0
        if _ONE_BYTE_TAGS and a and n < 120:  # every length fits in one byte
            head = heads.get((n, len(a)))
            if head is None:
                head = bytes(
                    (
                        _T_LLE_LB,
                        n + 8,
                        _T_LB_ENDPOINT,
                        n + 4,
                        _T_EP_ADDRESS,
                        n + 2,
                        _T_ADDR_SOCKET,
                        n,
                        _T_SA_ADDRESS,
                        len(a),
                    )
                )
                heads[(n, len(a))] = head
            zone += (head, a, tail)
            sizes[zone_name] += n + 10
        else:
            entry = _lb_endpoint(address, port, draining)
            zone.append(entry)
            sizes[zone_name] += len(entry)
    cla_name = name.encode()
    parts = [_CLA_NAME, varint(len(cla_name)), cla_name] if cla_name else []
    for zone_name in sorted(by_zone):
        parts += _locality_head(zone_name, sizes[zone_name])
        parts += by_zone[zone_name]
    return b"".join(parts)
