"""``python -m optimum_prune``: the same command as ``optimum-prune``."""

from .cli.main import main

if __name__ == "__main__":
    main(prog="python -m optimum_prune")
