"""The ``prune`` command shared by ``optimum-prune``, ``python -m optimum_prune`` and ``optimum-cli prune``."""

from .arguments import add_arguments
from .main import build_parser, main

__all__ = ["add_arguments", "build_parser", "main"]
