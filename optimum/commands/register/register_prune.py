"""Registers ``optimum-cli prune`` (optimum 2.x loads every module in this PEP 420 namespace at start-up).

Kept light: the parser flags come from the standard-library-only `optimum_prune.cli.arguments`; torch and
transformers load only when the command runs.
"""

from __future__ import annotations

from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


class PruneCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(name="prune", help="Prune a causal LM block by block (Wanda, SparseGPT, OWL, N:M...).")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        from optimum_prune.cli.arguments import add_arguments

        add_arguments(parser)

    def run(self) -> None:
        from optimum_prune.cli.run import run

        raise SystemExit(run(self.args, self.parser))


REGISTER_COMMANDS = [PruneCommand]
