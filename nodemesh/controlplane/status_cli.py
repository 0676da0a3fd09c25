"""`nodemesh status --controlplane URL`: the control plane's `/status` as readable tables."""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["configure", "render", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--controlplane",
        default="http://127.0.0.1:18080",
        help="control plane HTTP URL, or the HOST:PORT of its --http-listen",
    )
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="print messages whole (the table cuts them at 100 characters)",
    )


def _one_line(text: str, width: int) -> str:
    """`text` on one line of at most `width` characters: Envoy's NACK messages can hold
    newlines (one line per listener it refused), which would break the table's rows."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), *(fmt.format(*r).rstrip() for r in rows)]


def render(status: dict[str, Any], wide: bool = False) -> str:
    """The table `nodemesh status` prints; `wide`: messages whole (on one line each)."""

    def limit(width: int) -> int:
        return sys.maxsize if wide else width

    out: list[str] = []
    out.append(
        f"store revision {status.get('store_revision')}, built {status.get('built_revision')}"
        + (f", LAST ERROR: {status['last_error']}" if status.get("last_error") else "")
    )
    rows = []
    for obj in status.get("objects", []):
        # (one line each: a name or parentRef from another source may hold a newline)
        name = _one_line(f"{obj['kind']}/{obj['namespace']}/{obj['name']}", 120)
        for c in obj["conditions"]:
            rows.append([name, _one_line(c.get("parent", "") or "-", 80), c["type"], c["status"],
                         c["reason"], _one_line(c["message"], limit(100))])  # fmt: skip
    out.append("")
    out.extend(_table(rows, ["OBJECT", "PARENT", "CONDITION", "STATUS", "REASON", "MESSAGE"]))
    nodes = []
    for node_id, node in sorted(status.get("nodes", {}).items()):
        connected = "yes" if node.get("connected") else "no"
        if connected == "yes" and node.get("envoy_connected") is False:
            connected = "agent only"  # its Envoy is not connected: it holds nothing new
        if not node.get("types"):  # a Node whose Envoy has not connected, or asked for nothing
            nodes.append([node_id, connected, "-", "", "", ""])
        for short, ts in sorted(node.get("types", {}).items()):
            nack = ts.get("last_nack")
            nodes.append([node_id, connected, short,
                          ts.get("version_sent", ""), ts.get("version_acked", ""),
                          _one_line((nack or {}).get("message", ""), limit(80))])  # fmt: skip
    out.append("")
    out.extend(_table(nodes, ["NODE", "CONNECTED", "TYPE", "SENT", "ACKED", "LAST NACK"]))
    peers = status.get("peers") or {}
    if peers:  # the other replicas, whose node Envoys count in Programmed (--peers-service)
        rows = [
            [
                name,
                "yes" if peer.get("counted") else "no",
                ",".join(peer.get("nodes") or []) or "-",
                ",".join(peer.get("moving") or []) or "-",
                "-"
                if peer.get("answered_seconds_ago") is None
                else f"{peer['answered_seconds_ago']}s ago",
                peer.get("url", ""),
                _one_line(peer.get("error") or "", limit(80)),
            ]
            for name, peer in sorted(peers.items())
        ]
        out.append("")
        out.extend(_table(rows, ["PEER", "COUNTED", "NODES", "MOVING", "ANSWERED", "URL", "ERROR"]))
    errors = status.get("source_errors", [])
    if errors:
        out.append("")
        out.append("SOURCE ERRORS")
        out.extend(f"  {_one_line(e['message'], limit(200))}" for e in errors)
    return "\n".join(out)


def status_url(controlplane: str) -> str:
    """The /status URL from what an operator passes: `HOST:PORT` as `--http-listen` takes it,
    `:PORT` (that flag's "every address") or `PORT`, or a URL, also the one the control plane logs
    (`http://127.0.0.1:8080/status`; it once asked for /status/status)."""
    base = controlplane
    if base.isdigit():  # a port alone: this host's (it was taken for a host name)
        base = f":{base}"
    if "://" not in base:
        base = f"http://{'127.0.0.1' if base.startswith(':') else ''}{base}"
    return base.rstrip("/").removesuffix("/status") + "/status"


def run(args: argparse.Namespace) -> int:
    url = status_url(args.controlplane)
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            status = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        # (HTTPException: a port that does not speak HTTP, such as the xDS one)
        why = str(exc)
        if not why.isprintable():  # what a port that is not HTTP answered: one line, escaped
            why = repr(why)
        hint = ""
        if isinstance(exc, http.client.HTTPException) and not isinstance(
            exc, http.client.IncompleteRead
        ):
            # the xDS port (gRPC, HTTP/2) is the usual mistake; it printed its frame's bytes
            hint = (
                " (it does not answer HTTP/1.1: the xDS port? /status is on the control "
                "plane's --http-listen address, 127.0.0.1:18080 by default)"
            )
        print(f"nodemesh status: cannot read {url}: {why}{hint}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if args.json else render(status, wide=args.wide))
    return 0
