"""Image + text calibration for vision-language models: pairs of a text and its images, from a local ``.jsonl`` /
``.json`` file or a list of dicts, turned into the model's own inputs by its processor.

A row is ``{"text": "...", "image": "photo.jpg"}`` (or ``"images": [...]``); image paths are relative to the
file's folder, and a list of dicts or a ``datasets.Dataset`` may hold ``PIL.Image`` objects instead. Each sample is one pair: its text cut to
``seq_len`` tokens, with the model's image placeholders put in by the processor's chat template (or, without
one, its image token before the text), then ``processor(text=..., images=...)``. Samples differ in length (the
image token count follows the image), so they run one per batch.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from .sources import json_rows, read_local

IMAGE_FIELDS = ("image", "images")
FORMAT = (
    'rows {"text": ..., "image": "file.jpg"} or {"text": ..., "images": [...]}, image paths relative to the '
    "data file's folder"
)


@dataclass
class ImageTextPair:
    """A calibration text and the images that go with it (paths or ``PIL.Image`` objects)."""

    text: str
    images: list[Any]


def _image_field(row: Any) -> str | None:
    return next((field for field in IMAGE_FIELDS if isinstance(row, dict) and field in row), None)


def has_images(source: Any) -> bool:
    """Whether calibration data pairs texts with images: a local ``.jsonl``/``.json`` file or a list whose first
    row has an ``image`` or ``images`` field, or a ``datasets.Dataset`` with such a column."""
    if hasattr(source, "column_names"):
        return any(field in source.column_names for field in IMAGE_FIELDS)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
            return False
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
        return any(f'"{field}"' in head for field in IMAGE_FIELDS) and _image_field(_first_row(path)) is not None
    if isinstance(source, Sequence) and not isinstance(source, str) and source:
        return _image_field(source[0]) is not None
    return False


def _first_row(path: Path) -> Any:
    rows = read_local(path, "text", json_rows)
    return rows[0] if rows else None


def load_pairs(source: Any, text_column: str = "text") -> tuple[list[ImageTextPair], str]:
    """The pairs of ``source`` (see the module docstring) and a short name for it; every image file is checked
    to exist before any work."""
    if importlib.util.find_spec("PIL") is None:
        raise InputError("Image + text calibration reads images with Pillow: pip install 'optimum-prune[vision]'.")
    folder = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        rows, name, folder = read_local(path, text_column, json_rows), path.name, path.parent
    else:
        rows, name = list(source), "custom image + text pairs"  # a list of dicts, or a datasets.Dataset's rows
    pairs = []
    for number, row in enumerate(rows, 1):
        field = _image_field(row)
        if field is None or text_column not in row:
            raise InputError(
                f"{name}: row {number} needs a {text_column!r} field and an 'image' or 'images' field "
                f"(expected {FORMAT})."
            )
        images = row[field] if isinstance(row[field], list) else [row[field]]
        if folder is not None:
            images = [folder / image if isinstance(image, str) else image for image in images]
        missing = [str(image) for image in images if isinstance(image, (str, Path)) and not Path(image).is_file()]
        if missing:
            raise InputError(f"{name}: row {number} names images that do not exist: {', '.join(missing)}.")
        for image in images:
            _check_readable(image, f"{name}: row {number}")
        pairs.append(ImageTextPair(str(row[text_column]), images))
    if not pairs:
        raise InputError(f"{name!r} holds no image + text pairs (expected {FORMAT}).")
    return pairs, name


def _check_readable(image: Any, where: str) -> None:
    """Refuse an image file Pillow cannot read (not an image, truncated), naming it."""
    if not isinstance(image, (str, Path)):
        return
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as opened:
            opened.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise InputError(f"{where}: {image} is not a readable image ({error}): replace or drop it.") from None


def load_processor(where: str | os.PathLike) -> Any:
    """The processor of a vision-language model from ``where`` (a folder or Hub id): one that prepares images as
    well as text, else a clear error (`AutoProcessor` returns a bare tokenizer from a folder that only has one)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(where)
    except (OSError, ValueError, TypeError) as error:
        cause = f"it could not be loaded ({' '.join(str(error).split())[:200]})"
    else:
        if getattr(processor, "image_processor", None) is not None:
            return processor
        cause = f"it holds a {type(processor).__name__}, which prepares no images"
    raise InputError(
        f"Image + text calibration needs the model's processor, and {where!s} has none: {cause}. Pass "
        "processor= to Pruner.from_pretrained (--processor), a folder with its preprocessor_config.json and "
        "tokenizer."
    )


def _prompt(processor: Any, text: str, images: int) -> str:
    """``text`` with the model's placeholders for ``images`` images."""
    token = getattr(processor, "image_token", None)
    if token and token in text:
        return text
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    if not token:
        raise InputError(
            f"The processor {type(processor).__name__} has neither a chat template nor an image token to mark "
            "where the images go: put the model's image placeholder in each text."
        )
    return token * images + text


def image_text_inputs(
    pairs: Sequence[ImageTextPair], processor: Any, num_samples: int, seq_len: int, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """The model inputs of ``num_samples`` pairs drawn in a seeded order, one sample per batch (see the module
    docstring); fewer pairs than ``num_samples`` are all used, with a warning."""
    from PIL import Image

    if len(pairs) < num_samples:
        warnings.warn(
            f"The calibration data has {len(pairs)} image + text pairs, fewer than num_samples={num_samples}: "
            f"calibrating on {len(pairs)} samples.",
            stacklevel=2,
        )
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()
    tokenizer = processor.tokenizer
    samples = []
    for index in order:
        pair = pairs[index]
        ids = tokenizer(pair.text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        images = [
            (Image.open(image) if isinstance(image, (str, Path)) else image).convert("RGB") for image in pair.images
        ]
        encoded = processor(
            text=[_prompt(processor, tokenizer.decode(ids), len(images))], images=[images], return_tensors="pt"
        )
        samples.append({key: value for key, value in encoded.items() if isinstance(value, torch.Tensor)})
    return samples
