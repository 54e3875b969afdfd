"""Entry point of the ``optimum-prune`` console script and of ``python -m optimum_prune``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .arguments import add_arguments


def build_parser(prog: str = "optimum-prune") -> argparse.ArgumentParser:
    """The ``prune`` argument parser."""
    return add_arguments(argparse.ArgumentParser(prog=prog))


def main(argv: Sequence[str] | None = None, prog: str = "optimum-prune") -> None:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command and exit with its code."""
    from .run import run

    parser = build_parser(prog)
    raise SystemExit(run(parser.parse_args(argv), parser))
