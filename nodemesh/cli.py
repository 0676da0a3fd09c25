"""The `nodemesh` command. Each subcommand lives in its own module, imported only when used.

A subcommand module exposes `configure(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]

_COMMANDS: dict[str, tuple[str, str]] = {
    "bootstrap": ("nodemesh.xds.bootstrap", "print an Envoy bootstrap for a node Envoy"),
    "controlplane": ("nodemesh.controlplane.cli", "run the control plane (files or kubernetes)"),
    "status": ("nodemesh.controlplane.status_cli", "show objects, nodes and xDS versions"),
    "agent": ("nodemesh.ebpf.cli", "run the eBPF node agent"),
    "demo": ("nodemesh.demo", "run the demo: control plane, a real Envoy, sample backends"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {
        name: spec
        for name, spec in _COMMANDS.items()
        if importlib.util.find_spec(spec[0]) is not None
    }


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default where there is one to name and the help does
    not say it already: the docs quote the defaults, and `--help` is where one looks first."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        default = action.default
        if (
            text
            and action.option_strings
            and "default" not in text
            and not isinstance(default, bool)  # a switch: its help says what it turns on
            and default not in (None, "", [], argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nodemesh", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"),
        default="INFO",
        help="DEBUG, INFO, WARNING (WARN), ERROR, CRITICAL",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    commands = _available()
    chosen = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in commands), None)
    for name, (module_name, help_text) in commands.items():
        p = sub.add_parser(name, help=help_text, formatter_class=_HelpFormatter)
        if name == chosen:
            importlib.import_module(module_name).configure(p)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    module = importlib.import_module(commands[args.command][0])
    return int(module.run(args))
