"""Write output folders atomically: into a temporary sibling folder, moved into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def check_writable(target: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a target that is a file, or a non-empty folder unless ``overwrite``."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file: choose a folder path for the output.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} already exists and is not empty: choose another folder or pass overwrite=True "
            "(--overwrite on the command line) to replace it."
        )
    return target


@contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` that replaces it only if the block completes."""
    target = check_writable(target, overwrite).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if target.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
        os.replace(target, previous / "old")
    os.replace(staging, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a corrupted one raises a `ValueError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}): the file is corrupted.") from error
