"""HTTPRoute filters and matches through a real node Envoy: headers, rewrite, redirect, mirror,
query parameters and methods."""

from __future__ import annotations

import pytest

from nodemesh.controlplane.store import ObjectKey
from tests.e2e.conftest import Backends
from tests.e2e.mesh import Mesh, endpoint_slice, service
from tests.e2e.objects import http_route, to
from tests.support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_header_modifiers_change_request_and_response(mesh: Mesh, backends: Backends) -> None:
    b = await backends.get("hdr")
    mesh.apply(
        service("hdr"),
        endpoint_slice("hdr", b.port),
        http_route("hdr", "hdr", [{
            "backendRefs": [to("hdr")],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-env", "value": "prod"}],
                    "add": [{"name": "x-added", "value": "yes"}],
                    "remove": ["x-secret"]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "x-served-by", "value": "mesh"}], "remove": ["x-path"]}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()
    reply = await mesh.get("hdr.shop", headers={"x-env": "dev", "x-secret": "s3cr3t"})
    seen = {k.lower(): v for k, v in b.seen[-1].headers.items()}
    assert seen["x-env"] == "prod" and seen["x-added"] == "yes" and "x-secret" not in seen
    assert reply.headers.get("x-served-by") == "mesh" and "x-path" not in reply.headers


async def test_of_two_header_changes_with_one_name_the_first_counts(
    mesh: Mesh, backends: Backends
) -> None:
    """Gateway API: header names compare case-insensitively, and of entries with equivalent
    names only the first counts (its schema's list key is case-sensitive, so the API server
    takes `X-Env` and `x-env` in one list). Envoy applied every entry: the last `set` won, and
    `add` sent both values."""
    b = await backends.get("dup")
    mesh.apply(
        service("dup"),
        endpoint_slice("dup", b.port),
        http_route("dup", "dup", [{
            "backendRefs": [{**to("dup"), "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-Backend-Set", "value": "first"},
                            {"name": "x-backend-set", "value": "second"}]}}]}],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "X-Env", "value": "one"}, {"name": "x-env", "value": "two"}],
                    "add": [{"name": "x-add", "value": "a1"}, {"name": "X-Add", "value": "a2"}]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "x-resp", "value": "first"},
                            {"name": "X-Resp", "value": "second"}]}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()
    reply = await mesh.get("dup.shop")
    seen = b.seen[-1]
    assert seen.values("x-env") == ["one"]
    assert seen.values("x-add") == ["a1"]
    assert seen.values("x-backend-set") == ["first"]
    assert reply.headers.get("x-resp") == "first"


async def test_a_request_header_modifier_may_set_host(mesh: Mesh, backends: Backends) -> None:
    """Gateway API allows Host in a RequestHeaderModifier; Envoy refuses it in
    request_headers_to_add, and that NACK held back every Service's routes. It is the route's
    host rewrite instead. Removing Host, or changing it in a response, is refused with a
    condition, and the other routes are served."""
    b = await backends.get("hosted")
    mesh.apply(
        service("hosted"),
        endpoint_slice("hosted", b.port),
        http_route("hosted", "hosted", [{
            "backendRefs": [to("hosted")],
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "Host", "value": "internal.hosted"},
                        {"name": "x-env", "value": "prod"}]}}],
        }]),
        http_route("hostless", "hosted", [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/bad"}}],
            "backendRefs": [to("hosted")],
            "filters": [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                "remove": ["host"]}}],
        }]),
    )  # fmt: skip
    await mesh.converge()  # ACKed, not NACKed
    reply = await mesh.get("hosted.shop", "/bad/x")
    assert reply.status == 200
    assert b.seen[-1].headers["Host"] == "internal.hosted"
    assert b.seen[-1].headers["x-env"] == "prod"
    (accepted,) = [
        c
        for c in mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "shop", "hostless")]
        if c.type == "Accepted"
    ]
    assert accepted.status == "False"
    assert accepted.message == (
        "spec.rules[0].filters[0].responseHeaderModifier.remove: the Host header cannot be removed"
    )


async def test_removing_a_pseudo_header_or_an_empty_name_is_refused(
    mesh: Mesh, backends: Backends
) -> None:
    """Gateway API's schema takes any string in `remove`; Envoy refuses `:path` (":-prefixed
    or host headers may not be removed") and "" in headers_to_remove, and that NACK held back
    every Service's routes. Such a route is refused, and the others are served."""
    b = await backends.get("unremoved")
    mesh.apply(
        service("unremoved"),
        endpoint_slice("unremoved", b.port),
        http_route("unremoved", "unremoved", [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/bad"}}],
            "backendRefs": [to("unremoved")],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "remove": [":path", "x-fine"]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "remove": [""], "set": [{"name": ":status", "value": "200"}]}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()  # ACKed, not NACKed
    assert (await mesh.get("unremoved.shop", "/bad/x")).status == 200  # the default route
    (accepted,) = [
        c
        for c in mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "shop", "unremoved")]
        if c.type == "Accepted"
    ]
    assert accepted.status == "False"
    assert accepted.message == (
        "spec.rules[0].filters[0].requestHeaderModifier.remove[0]: the pseudo-header ':path'"
        " cannot be removed; spec.rules[0].filters[1].responseHeaderModifier.set[0].name: the"
        " pseudo-header ':status' cannot be changed; spec.rules[0].filters[1]"
        ".responseHeaderModifier.remove[0]: a header name cannot be empty"
    )


async def test_a_line_break_in_a_header_value_or_a_rewritten_path_is_refused(
    mesh: Mesh, backends: Backends
) -> None:
    """Gateway API limits header values and rewritten paths only in length; Envoy refuses NUL,
    CR and LF in them ('value does not match regex pattern "^[^\\x00\\n\\r]*$"'), and that
    NACK held back every Service's routes. Such a route is refused, and the others are served."""
    b = await backends.get("crlf")
    mesh.apply(
        service("crlf"),
        endpoint_slice("crlf", b.port),
        http_route("crlf", "crlf", [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/bad"}}],
            "backendRefs": [to("crlf")],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-a", "value": "a\r\nx-injected: 1"}],
                    "add": [{"name": "Host", "value": "web\n"}]}},
                {"type": "URLRewrite", "urlRewrite": {
                    "path": {"type": "ReplaceFullPath", "replaceFullPath": "/a\x00"}}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()  # ACKed, not NACKed
    assert (await mesh.get("crlf.shop", "/bad/x")).status == 200  # the default route
    (accepted,) = [
        c
        for c in mesh.pipeline.conditions()[ObjectKey("HTTPRoute", "shop", "crlf")]
        if c.type == "Accepted"
    ]
    assert accepted.status == "False"
    cannot = "(NUL, CR and LF cannot be in HTTP headers)"
    assert accepted.message == (
        f"spec.rules[0].filters[0].requestHeaderModifier.set[0].value: must not contain '\\r'"
        f" {cannot}; spec.rules[0].filters[0].requestHeaderModifier.add[0].value: must not"
        f" contain '\\n' {cannot}; spec.rules[0].filters[1].urlRewrite.path.replaceFullPath:"
        f" must not contain '\\x00' {cannot}"
    )


async def test_a_header_value_with_a_percent_sign_is_set_as_written(
    mesh: Mesh, backends: Backends
) -> None:
    """Envoy reads `%` in a header value as the start of a variable (`%REQ(x)%`): `50%`
    was refused ("Couldn't find valid command"), and that NACK held back every Service's
    routes; `%DOWNSTREAM_REMOTE_ADDRESS%` set the client's address. Gateway API's values are
    literal."""
    b = await backends.get("pct")
    mesh.apply(
        service("pct"),
        endpoint_slice("pct", b.port),
        http_route("pct", "pct", [{
            "backendRefs": [to("pct")],
            "filters": [
                {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                    "set": [{"name": "x-share", "value": "50%"}],
                    "add": [{"name": "x-addr", "value": "%DOWNSTREAM_REMOTE_ADDRESS%"}]}},
                {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                    "set": [{"name": "x-done", "value": "100%%"}]}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()
    reply = await mesh.get("pct.shop")
    assert b.seen[-1].headers["x-share"] == "50%"
    assert b.seen[-1].headers["x-addr"] == "%DOWNSTREAM_REMOTE_ADDRESS%"
    assert reply.headers["x-done"] == "100%%"


async def test_url_rewrite_replaces_prefix_and_host(mesh: Mesh, backends: Backends) -> None:
    b = await backends.get("rw")
    mesh.apply(
        service("rw"),
        endpoint_slice("rw", b.port),
        http_route("rw", "rw", [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
            "backendRefs": [to("rw")],
            "filters": [{"type": "URLRewrite", "urlRewrite": {
                "hostname": "internal.rw",
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}],
        }, {
            "matches": [{"path": {"type": "PathPrefix", "value": "/strip"}}],
            "backendRefs": [to("rw")],
            "filters": [{"type": "URLRewrite", "urlRewrite": {
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}],
        }, {  # no matches: the prefix "/"
            "backendRefs": [to("rw")],
            "filters": [{"type": "URLRewrite", "urlRewrite": {
                "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/api"}}}],
        }]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("rw.shop", "/old/items?x=1")).headers["x-path"] == "/new/items?x=1"
    assert b.seen[-1].headers["Host"] == "internal.rw"
    assert (await mesh.get("rw.shop", "/strip/a/b")).headers["x-path"] == "/a/b"
    # the match "/" replaced by "/api" keeps the separator (it once gave "/apiusers")
    assert (await mesh.get("rw.shop", "/users?x=1")).headers["x-path"] == "/api/users?x=1"


async def test_a_full_path_rewrite_with_a_backslash_is_sent_as_written(
    mesh: Mesh, backends: Backends
) -> None:
    """The full path goes into a regex substitution, where RE2 reads `\\1` as a capture group
    (the pattern has none): with `/a\\1b` the backend got the request's own path."""
    b = await backends.get("bs")
    mesh.apply(
        service("bs"),
        endpoint_slice("bs", b.port),
        http_route("bs", "bs", [{
            "backendRefs": [to("bs")],
            "filters": [{"type": "URLRewrite", "urlRewrite": {
                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/a\\1b"}}}],
        }]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("bs.shop", "/old")).headers["x-path"] == "/a\\1b"


async def test_redirect_answers_with_location(mesh: Mesh, backends: Backends) -> None:
    b = await backends.get("redir")
    mesh.apply(
        service("redir"),
        endpoint_slice("redir", b.port),
        http_route("redir", "redir", [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
            "filters": [{"type": "RequestRedirect", "requestRedirect": {
                "hostname": "new.example", "statusCode": 301,
                "path": {"type": "ReplaceFullPath", "replaceFullPath": "/landing"}}}],
        }]),
    )  # fmt: skip
    await mesh.converge()
    reply = await mesh.get("redir.shop", "/moved/x")
    assert reply.status == 301
    assert reply.headers["Location"] == "http://new.example/landing"
    assert b.hits == 0


async def test_a_redirect_without_a_port_lands_where_gateway_api_says(
    mesh: Mesh, backends: Backends
) -> None:
    """No `port`: a scheme change goes to the scheme's well-known port (Envoy kept the
    request's :8080 for https), anything else to the Service port: Envoy dropped it for a new
    hostname, and for a new path kept the Host as written, so `rdq.shop` (its one port is
    8080) was sent to port 80."""
    b = await backends.get("rdp")
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/secure"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"scheme": "https"}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/moved"}}],
         "filters": [{"type": "RequestRedirect",
                      "requestRedirect": {"hostname": "new.example"}}]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
         "filters": [{"type": "RequestRedirect", "requestRedirect": {"path": {
             "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]},
    ]  # fmt: skip
    mesh.apply(
        service("rdp", ports=(("http", 80, ""), ("alt", 8080, ""))),
        endpoint_slice("rdp", b.port),
        http_route("rdp", "rdp", rules),
        service("rdq", ports=(("http", 8080, ""),)),
        endpoint_slice("rdq", b.port),
        http_route("rdq", "rdq", rules[2:]),
    )  # fmt: skip
    await mesh.converge()
    locations = {
        (host, path): (await mesh.get(host, path)).headers["Location"]
        for host in ("rdp.shop", "rdp.shop:8080")
        for path in ("/secure/x", "/moved/x", "/old/x")
    } | {(host, "/old/x"): (await mesh.get(host, "/old/x")).headers["Location"]
         for host in ("rdq.shop", "rdq.shop:8080")}  # fmt: skip
    assert locations == {
        ("rdp.shop", "/secure/x"): "https://rdp.shop:443/secure/x",
        ("rdp.shop", "/moved/x"): "http://new.example/moved/x",
        ("rdp.shop", "/old/x"): "http://rdp.shop/new/x",
        ("rdp.shop:8080", "/secure/x"): "https://rdp.shop:443/secure/x",
        ("rdp.shop:8080", "/moved/x"): "http://new.example:8080/moved/x",
        ("rdp.shop:8080", "/old/x"): "http://rdp.shop:8080/new/x",
        ("rdq.shop", "/old/x"): "http://rdq.shop:8080/new/x",
        ("rdq.shop:8080", "/old/x"): "http://rdq.shop:8080/new/x",
    }


async def test_mirror_copies_requests_to_another_service(mesh: Mesh, backends: Backends) -> None:
    main, shadow = await backends.get("mirror-main"), await backends.get("mirror-shadow")
    mesh.apply(
        service("mirror"), service("mirror-shadow"),
        endpoint_slice("mirror", main.port), endpoint_slice("mirror-shadow", shadow.port),
        http_route("mirror", "mirror", [{
            "backendRefs": [to("mirror")],
            "filters": [
                {"type": "RequestMirror", "requestMirror": {"backendRef": to("mirror-shadow")}},
            ],
        }]),
    )  # fmt: skip
    await mesh.converge()
    reply = await mesh.get("mirror.shop", "/copy-me")
    assert (reply.status, reply.body) == (200, "mirror-main")
    await eventually(lambda: shadow.hits == 1, what="the mirrored request")
    assert shadow.seen[0].path == "/copy-me"


async def test_query_and_method_matches(mesh: Mesh, backends: Backends) -> None:
    a, b = await backends.get("qm-a"), await backends.get("qm-b")
    mesh.apply(
        service("qm"), service("qm-a"), service("qm-b"),
        endpoint_slice("qm-a", a.port), endpoint_slice("qm-b", b.port),
        http_route("qm", "qm", [
            {"matches": [{"queryParams": [{"name": "version", "value": "2"}]}],
             "backendRefs": [to("qm-b")]},
            {"matches": [{"method": "POST"}], "backendRefs": [to("qm-b")]},
            {"backendRefs": [to("qm-a")]},
        ]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("qm.shop", "/?version=2")).body == "qm-b"
    assert (await mesh.get("qm.shop", "/?version=1")).body == "qm-a"
    assert (await mesh.get("qm.shop", "/", method="POST")).body == "qm-b"
    assert (await mesh.get("qm.shop", "/")).body == "qm-a"


async def test_unresolved_backend_answers_500_and_others_still_work(
    mesh: Mesh, backends: Backends
) -> None:
    b = await backends.get("partial")
    mesh.apply(
        service("partial"),
        endpoint_slice("partial", b.port),
        http_route("partial", "partial", [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/gone"}}],
             "backendRefs": [to("no-such-svc")]},
            {"backendRefs": [to("partial")]},
        ]),
    )  # fmt: skip
    await mesh.converge()
    assert (await mesh.get("partial.shop", "/gone")).status == 500
    assert (await mesh.get("partial.shop", "/ok")).body == "partial"
