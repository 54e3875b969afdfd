"""Write output folders atomically: into a temporary sibling folder, moved into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

    from ..config import PruningConfig


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(target: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Refuse an output folder that cannot be written before any long work: a file, a non-empty folder unless
    ``overwrite``, the current directory or one of its parents, one of ``inputs`` (or a folder holding one), or
    a place where no folder can be created (read-only, no permission, a path through a file)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file: choose a folder path for the output.")
    resolved = target.resolve()
    if Path.cwd().resolve().is_relative_to(resolved):
        raise InputError(f"{target} is the current directory or holds it: choose a new folder for the output.")
    for source in inputs:
        if Path(source).exists() and Path(source).resolve().is_relative_to(resolved):
            raise InputError(f"{target} would replace the input {source}: choose another folder for the output.")
    existing = _nearest_existing(resolved)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optimum-prune-write-test-", dir=existing))
    except OSError as error:
        raise PermissionError(f"Cannot write the output {target}: {error.strerror} ({existing}).") from error
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
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private (0700); a saved model is a folder like any other
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
        raise InputError(f"{path} is not valid JSON ({error}): the file is corrupted.") from error


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' progress bars ("Writing model shards", "Loading weights") off: a line of noise per model."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


PROCESSOR_FILES = (  # what a vision-language model's processor reads beside the tokenizer
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def copy_processor_files(source: str | os.PathLike | None, folder: str | os.PathLike) -> None:
    """Copy the processor's files of a local model folder ``source`` (those of `PROCESSOR_FILES` it has) into
    ``folder``, so that ``AutoProcessor`` loads from the output as from the original."""
    if source is None or not os.path.isdir(source):
        return
    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file() and not (Path(folder) / name).exists():
            shutil.copy2(Path(source) / name, Path(folder) / name)


def write_model_files(
    folder: str | os.PathLike,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    recipe: PruningConfig | None = None,
) -> None:
    """Everything of a saved model but its weights: ``config.json`` (with the dtype and architecture, as
    ``save_pretrained`` records them), the generation config, the tokenizer and ``pruning_config.json``."""
    config = model.config
    if hasattr(model, "dtype"):
        config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(model, "can_generate", lambda: False)():
        generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if recipe is not None:
        recipe.save_pretrained(folder)
