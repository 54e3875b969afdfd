"""Entry point of the ``optimum-prune`` console script and of ``python -m optimum_prune``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .arguments import add_arguments, add_bench_arguments, add_frontier_arguments


def build_parser(prog: str = "optimum-prune") -> argparse.ArgumentParser:
    """The ``prune`` argument parser."""
    return add_arguments(argparse.ArgumentParser(prog=prog))


def main(argv: Sequence[str] | None = None, prog: str = "optimum-prune") -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command and exit with its code: ``bench OUTPUT ...``
    times a saved model, ``frontier ...`` measures which output to ship, anything else prunes."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from .bench import run_bench

        parser = add_bench_arguments(argparse.ArgumentParser(prog=f"{prog} bench"))
        raise SystemExit(run_bench(parser.parse_args(argv[1:]), parser))
    if argv[:1] == ["frontier"]:
        from .frontier import run_frontier_command

        parser = add_frontier_arguments(argparse.ArgumentParser(prog=f"{prog} frontier"))
        raise SystemExit(run_frontier_command(parser.parse_args(argv[1:]), parser))
    from .run import run

    parser = build_parser(prog)
    raise SystemExit(run(parser.parse_args(argv), parser))
