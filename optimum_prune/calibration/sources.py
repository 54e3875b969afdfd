"""Read calibration or evaluation texts from a list, a `datasets.Dataset`, a local file or a Hub dataset."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError

LOCAL_FORMATS = (".txt", ".jsonl", ".json", ".parquet")


def read_local(path: Path, text_column: str, reader: Callable[[Path, str], list] | None = None) -> list:
    """The texts of a local file (or what ``reader`` makes of it); a file that cannot be read as its suffix says
    is named, with what was expected."""
    try:
        return (reader or _read_local_rows)(path, text_column)
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text (byte {error.start} cannot be decoded: a binary file?): expected "
            f"{_EXPECTED[path.suffix.lower()]}."
        ) from None
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}" if path.suffix.lower() == ".json" else "a line"
        raise InputError(
            f"{path}: {where} is not valid JSON ({error.msg}): expected {_EXPECTED[path.suffix.lower()]}."
        ) from None


_EXPECTED = {
    ".txt": "plain UTF-8 text",
    ".jsonl": "one JSON object per line, with the text in a field (--text-column, default 'text')",
    ".json": "a JSON list of strings or of objects with the text in a field (--text-column, default 'text')",
    ".parquet": "a Parquet table with a text column (--text-column, default 'text')",
}


def json_rows(path: Path, text_column: str) -> list[Any]:
    """The rows of a ``.jsonl`` (one JSON value per line) or ``.json`` (a JSON list) file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise InputError(
                            f"{path}: line {number} is not valid JSON ({error.msg}): expected {_EXPECTED[suffix]}."
                        ) from None
        return rows
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise InputError(f"{path} must hold a JSON list of strings or of objects with a {text_column!r} field.")
    return rows


def _read_local_rows(path: Path, text_column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix in (".jsonl", ".json"):
        rows = json_rows(path, text_column)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow's own error types for files that are not Parquet
            raise InputError(f"{path} cannot be read as Parquet ({error}): expected {_EXPECTED[suffix]}.") from None
        if text_column not in table.column_names:
            raise InputError(f"{path} has no {text_column!r} column (columns: {table.column_names}).")
        return [str(text) for text in table.column(text_column).to_pylist()]
    else:
        raise InputError(f"Unsupported text file {path}: use one of {', '.join(LOCAL_FORMATS)}.")
    texts = []
    for row in rows:
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and text_column in row:
            texts.append(str(row[text_column]))
        else:
            fields = f" (its fields: {', '.join(map(str, row))})" if isinstance(row, dict) else ""
            raise InputError(
                f"{path}: a row has no {text_column!r} field{fields}; name the text field with text_column= "
                "(--text-column for --dataset and --recover-dataset, --eval-text-column for --eval)."
            )
    return texts


def _read_hub(name: str, split: str, text_column: str) -> list[str]:
    import datasets

    dataset_name, _, subset = name.partition(":")
    try:
        dataset = datasets.load_dataset(dataset_name, subset or None, split=split)
    except Exception as error:  # datasets raises many types for offline or missing datasets
        raise InputError(
            f"Could not load the dataset {name!r} (split {split!r}) from the Hub: {error}. Pass a local "
            f"{'/'.join(LOCAL_FORMATS)} file or a list of strings instead."
        ) from error
    return _column(dataset, text_column, name)


def _column(dataset: Any, text_column: str, name: str) -> list[str]:
    if text_column not in dataset.column_names:
        raise InputError(f"Dataset {name} has no {text_column!r} column (columns: {dataset.column_names}).")
    return [str(text) for text in dataset[text_column]]


def load_texts(source: Any, *, text_column: str = "text", split: str = "train") -> tuple[list[str], str]:
    """Return the texts of ``source`` and a short name for it (recorded in the pruning metadata).

    ``source`` is a list of strings, a ``datasets.Dataset`` with a ``text_column``, a path to a local
    ``.txt`` (one text), ``.jsonl``/``.json`` (rows with ``text_column``) or ``.parquet`` file, or a Hub
    dataset name (``"name"`` or ``"name:subset"``).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            texts, name = read_local(path, text_column), path.name
        elif path.is_dir():
            raise InputError(f"{path} is a folder: pass one {'/'.join(LOCAL_FORMATS)} file from it.")
        elif path.suffix.lower() in LOCAL_FORMATS:
            raise FileNotFoundError(f"No file at {path}.")
        else:
            texts, name = _read_hub(str(source), split, text_column), str(source)
    elif isinstance(source, Sequence) and all(isinstance(text, str) for text in source):
        texts, name = list(source), "custom texts"
    elif hasattr(source, "column_names"):
        texts, name = _column(source, text_column, type(source).__name__), getattr(source, "info", None)
        name = getattr(name, "dataset_name", None) or "datasets.Dataset"
    else:
        raise TypeError(
            f"Unsupported calibration data of type {type(source).__name__}: pass a list of strings, a "
            "datasets.Dataset, a local .txt/.jsonl/.json/.parquet path or a Hub dataset name."
        )
    if not any(text.strip() for text in texts):
        raise InputError(f"{name!r} holds no text.")
    return texts, name
