"""The `pagoda` command: serve, the four roles, models, bench, eval, quantize.

Parsing and building a role's config import neither torch nor the benchmarks; each command
imports what it runs."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pagoda.services.cli.config import ROLES
from pagoda.services.cli.parser import build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` names (default: sys.argv); its exit status. A user error (a
    ValueError, e.g. a flag out of range or a model that cannot load) prints one line and exits
    2; an unreachable broker or store exits 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except ValueError as exc:  # user errors: one line naming the fix, no traceback
        print(f"pagoda: error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # broker or store unreachable: the message names the URL to check
        print(f"pagoda: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "models":
        from pagoda.engine import format_catalog

        print(format_catalog())
        return 0
    if command == "bench":
        from pagoda.load.cli import run_bench

        return run_bench(args)
    if command == "eval":
        from pagoda.load.perplexity import run_eval

        return run_eval(args)
    if command == "quantize":
        from pagoda.compress.cli import run_quantize

        return run_quantize(args)
    if command in ("serve", "worker"):
        from pagoda.engine import engine_config_from_args

        config = engine_config_from_args(args)
        if config.parallel.node_rank > 0:  # this node's ranks only: no bus, no engine
            from pagoda.engine import run_node

            return run_node(config)
    from pagoda.services.cli.launch import run_roles

    assert command == "serve" or command in ROLES, command
    return run_roles(args, ROLES if command == "serve" else (command,))
