"""Turn texts into ``(num_samples, seq_len)`` calibration token windows, reproducibly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import InputError
from .sources import load_texts


def bos_token_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token the tokenizer puts before every text (Llama, Gemma), or ``None`` when it adds none (GPT-2,
    OPT, SmolLM2): windows of models that expect one start with it, as lm-evaluation-harness does."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return bos if tokenizer("a", verbose=False)["input_ids"][:1] == [bos] else None


def calibration_ids(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    bos: bool | None = None,
) -> torch.Tensor:
    """Sample ``num_samples`` windows of ``seq_len`` tokens. With ``bos`` (``None``: when the tokenizer adds a
    BOS token, see `bos_token_id`) each window is the BOS token followed by ``seq_len - 1`` tokens of text.

    Texts are visited in a seeded random order and tokenised (joined by the EOS token) only until enough
    tokens are gathered; the stream is then cut into consecutive windows. A single text (a ``.txt`` file) is
    entered at a seeded random token instead, so that the seed matters there too. A corpus too small for
    ``num_samples x seq_len`` tokens gives overlapping windows at seeded random offsets, with a warning.
    """
    bos = bos_token_id(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    length = seq_len - (bos is not None)  # text tokens per window
    generator = torch.Generator().manual_seed(seed)
    needed = num_samples * length
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in torch.randperm(len(texts), generator=generator).tolist():
        if not texts[index].strip():
            continue
        if stream:
            stream.extend(separator)
        stream.extend(tokenizer(texts[index], add_special_tokens=False, verbose=False)["input_ids"])
        if len(stream) >= needed:
            break
    if len(stream) < max(length, 1):
        raise InputError(
            f"The calibration text has {len(stream)} tokens, fewer than a window of seq_len={seq_len}: give more "
            "text or lower seq_len."
        )
    tokens = torch.tensor(stream, dtype=torch.long)
    if len(tokens) >= needed:
        start = int(torch.randint(0, len(tokens) - needed + 1, (1,), generator=generator)) if len(texts) == 1 else 0
        windows = tokens[start : start + needed].view(num_samples, length)
    else:
        warnings.warn(
            f"The calibration text has {len(tokens)} tokens, fewer than num_samples x seq_len = {needed}: "
            "sampling overlapping windows.",
            stacklevel=2,
        )
        starts = torch.randint(0, len(tokens) - length + 1, (num_samples,), generator=generator)
        windows = torch.stack([tokens[start : start + length] for start in starts.tolist()])
    if bos is None:
        return windows
    return torch.cat([torch.full((num_samples, 1), bos, dtype=torch.long), windows], dim=1)


def calibration_tokens(
    dataset: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    text_column: str = "text",
    split: str = "train",
) -> tuple[torch.Tensor, str]:
    """Calibration token ids and the name of their source, from any calibration data (`load_texts`), or a
    ``(num_samples, seq_len)`` integer tensor of token ids taken as it is."""
    if isinstance(dataset, torch.Tensor):
        if dataset.dim() != 2 or dataset.dtype not in (torch.int32, torch.int64):
            raise InputError("Token ids must be an integer tensor of shape (num_samples, seq_len).")
        return dataset.long(), "token ids"
    if tokenizer is None:
        raise InputError("Calibration text needs a tokenizer: pass tokenizer= to Pruner.from_pretrained (--tokenizer).")
    texts, name = load_texts(dataset, text_column=text_column, split=split)
    return calibration_ids(texts, tokenizer, num_samples, seq_len, seed), name
