# mypy: disable-error-code="type-arg"
from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class NodeServiceMap(_message.Message):
    __slots__ = (
        "node",
        "envoy",
        "local_addresses",
        "socket_redirect_on",
        "socket_redirect_off",
        "zone",
    )
    NODE_FIELD_NUMBER: _ClassVar[int]
    ENVOY_FIELD_NUMBER: _ClassVar[int]
    LOCAL_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    SOCKET_REDIRECT_ON_FIELD_NUMBER: _ClassVar[int]
    SOCKET_REDIRECT_OFF_FIELD_NUMBER: _ClassVar[int]
    ZONE_FIELD_NUMBER: _ClassVar[int]
    node: str
    envoy: SocketAddress
    local_addresses: _containers.RepeatedScalarFieldContainer[str]
    socket_redirect_on: _containers.RepeatedScalarFieldContainer[str]
    socket_redirect_off: _containers.RepeatedScalarFieldContainer[str]
    zone: str
    def __init__(
        self,
        node: str | None = ...,
        envoy: SocketAddress | _Mapping | None = ...,
        local_addresses: _Iterable[str] | None = ...,
        socket_redirect_on: _Iterable[str] | None = ...,
        socket_redirect_off: _Iterable[str] | None = ...,
        zone: str | None = ...,
    ) -> None: ...

class MeshService(_message.Message):
    __slots__ = ("name", "services", "services_ipv6")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    SERVICES_IPV6_FIELD_NUMBER: _ClassVar[int]
    name: str
    services: _containers.RepeatedCompositeFieldContainer[Service]
    services_ipv6: _containers.RepeatedCompositeFieldContainer[ServiceIPv6]
    def __init__(
        self,
        name: str | None = ...,
        services: _Iterable[Service | _Mapping] | None = ...,
        services_ipv6: _Iterable[ServiceIPv6 | _Mapping] | None = ...,
    ) -> None: ...

class SocketAddress(_message.Message):
    __slots__ = ("address", "port")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    def __init__(self, address: str | None = ..., port: int | None = ...) -> None: ...

class Service(_message.Message):
    __slots__ = (
        "name",
        "address",
        "port",
        "mode",
        "backends",
        "node_local",
        "client_ip_affinity",
        "per_node_backends",
    )
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[Service.Mode]
        L4: _ClassVar[Service.Mode]
        L7: _ClassVar[Service.Mode]

    MODE_UNSPECIFIED: Service.Mode
    L4: Service.Mode
    L7: Service.Mode
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    NODE_LOCAL_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_AFFINITY_FIELD_NUMBER: _ClassVar[int]
    PER_NODE_BACKENDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    port: int
    mode: Service.Mode
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    node_local: bool
    client_ip_affinity: bool
    per_node_backends: _containers.RepeatedCompositeFieldContainer[Backend]
    def __init__(
        self,
        name: str | None = ...,
        address: str | None = ...,
        port: int | None = ...,
        mode: Service.Mode | str | None = ...,
        backends: _Iterable[Backend | _Mapping] | None = ...,
        node_local: bool | None = ...,
        client_ip_affinity: bool | None = ...,
        per_node_backends: _Iterable[Backend | _Mapping] | None = ...,
    ) -> None: ...

class ServiceIPv6(_message.Message):
    __slots__ = ("name", "address", "port", "target", "l7")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    L7_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    port: int
    target: str
    l7: bool
    def __init__(
        self,
        name: str | None = ...,
        address: str | None = ...,
        port: int | None = ...,
        target: str | None = ...,
        l7: bool | None = ...,
    ) -> None: ...

class Backend(_message.Message):
    __slots__ = ("address", "port", "weight", "node", "terminating", "for_zones", "for_nodes")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    TERMINATING_FIELD_NUMBER: _ClassVar[int]
    FOR_ZONES_FIELD_NUMBER: _ClassVar[int]
    FOR_NODES_FIELD_NUMBER: _ClassVar[int]
    address: str
    port: int
    weight: int
    node: str
    terminating: bool
    for_zones: _containers.RepeatedScalarFieldContainer[str]
    for_nodes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(
        self,
        address: str | None = ...,
        port: int | None = ...,
        weight: int | None = ...,
        node: str | None = ...,
        terminating: bool | None = ...,
        for_zones: _Iterable[str] | None = ...,
        for_nodes: _Iterable[str] | None = ...,
    ) -> None: ...
