"""``optimum-prune bench OUTPUT [--against DENSE]``: how fast a saved model runs, beside the dense one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError


def speed_folder(output: str | Path) -> Path:
    """The folder to time: ``output`` itself, or its ``onnx/`` export when it has one."""
    output = Path(output)
    return output / "onnx" if (output / "onnx" / "model.onnx").is_file() else output


def benchmark(output: str | Path, against: str | Path | None, record: bool = True, **settings: Any) -> dict[str, Any]:
    """Time ``output`` (its ONNX export when there is one) against ``against``, print the table, and record the
    result in the timed folder's metadata and card; return the result."""
    from ..evaluation.speed import measure_speed
    from ..export.metadata import read_metadata
    from ..hub.model_card import record_speed

    folder = speed_folder(output)
    report = measure_speed(folder, against, **settings)
    print(report.table())
    if record and folder.suffix == ".gguf":
        print(f"not recorded: {folder} is a GGUF file (the table above is the result)")
    elif record and read_metadata(folder) is None:  # a measurement changes nothing it was given
        print(f"not recorded: {folder} was not written by optimum-prune, so its files are left as they were")
    elif record:
        record_speed(folder, report.to_dict())
    return report.to_dict()


def run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Check the flags, time, print; exit code 0, or 2 for bad input."""
    for name in ("prompt_len", "new_tokens", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be a positive integer, got {value}.")
    for name, folder in (("OUTPUT", args.output), ("--against", args.against)):
        if folder is None:
            continue
        gguf_file = str(folder).endswith(".gguf")
        if gguf_file and not Path(folder).is_file():
            parser.error(f"argument {name}: no GGUF file at {folder}.")
        if not gguf_file and not (Path(folder) / "config.json").is_file():
            parser.error(f"argument {name}: no saved model in {folder} (a folder with config.json, or a .gguf file).")
    try:
        benchmark(
            args.output, args.against, record=not args.no_record, device=args.device, threads=args.threads,
            prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats, engine=args.engine,
        )  # fmt: skip
    except (InputError, ImportError) as error:
        print(f"{parser.prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted: nothing was recorded", file=sys.stderr)
        return 130
    return 0
