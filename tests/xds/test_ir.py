"""IR classes with the descriptor-based `__init__` behave as the generated one: same parameters
and defaults, equal values, still frozen."""

from __future__ import annotations

import dataclasses

import pytest

from nodemesh.xds.translate import ir


def test_fast_init_keeps_parameters_defaults_and_values() -> None:
    route = ir.Route("r", backends=(ir.Backend("c"),), origins=("HTTPRoute/ns/r",))
    assert route.match == ir.RouteMatch() and route.direct_status == 500
    assert route == ir.Route(
        name="r", backends=(ir.Backend(cluster="c", weight=1),), origins=("HTTPRoute/ns/r",)
    )
    assert dataclasses.replace(route, name="s") == ir.Route(
        "s", backends=(ir.Backend("c"),), origins=("HTTPRoute/ns/r",)
    )
    assert ir.Cluster("n", "ns/s", 80, True).http2 and ir.Cluster("n", "ns/s", 80).origins == ()
    info = ir.ServiceInfo("ns/s", ("10.0.0.1",), (80,), ())
    assert (info.backends, hash(info)) == (
        (),
        hash(ir.ServiceInfo("ns/s", ("10.0.0.1",), (80,), ())),
    )
    assert ir.ClusterEndpoints("c", ()) == ir.ClusterEndpoints(cluster="c", endpoints=())
    assert ir.VirtualHost("v", (), ()).origins == ()


def test_fast_init_instances_stay_frozen_and_check_arguments() -> None:
    vh = ir.VirtualHost("v", ("a",), ())
    with pytest.raises(dataclasses.FrozenInstanceError):
        vh.name = "w"  # type: ignore[misc]
    with pytest.raises(TypeError):
        ir.Backend()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        ir.Backend("c", 1, None, None, "", 2)  # type: ignore[call-arg]
