"""Turn texts into ``(num_samples, seq_len)`` calibration token windows, reproducibly."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase


def calibration_ids(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """Sample ``num_samples`` windows of ``seq_len`` tokens.

    Texts are visited in a seeded random order and tokenised (joined by the EOS token) only until enough
    tokens are gathered; the stream is then cut into consecutive windows. A single text (a ``.txt`` file) is
    entered at a seeded random token instead, so that the seed matters there too. A corpus too small for
    ``num_samples x seq_len`` tokens gives overlapping windows at seeded random offsets, with a warning.
    """
    generator = torch.Generator().manual_seed(seed)
    needed = num_samples * seq_len
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in torch.randperm(len(texts), generator=generator).tolist():
        if not texts[index].strip():
            continue
        if stream:
            stream.extend(separator)
        stream.extend(tokenizer(texts[index], add_special_tokens=False)["input_ids"])
        if len(stream) >= needed:
            break
    if len(stream) < seq_len:
        raise ValueError(
            f"The calibration text has {len(stream)} tokens, fewer than seq_len={seq_len}: give more text or "
            "lower seq_len."
        )
    tokens = torch.tensor(stream, dtype=torch.long)
    if len(tokens) >= needed:
        start = int(torch.randint(0, len(tokens) - needed + 1, (1,), generator=generator)) if len(texts) == 1 else 0
        return tokens[start : start + needed].view(num_samples, seq_len)
    warnings.warn(
        f"The calibration text has {len(tokens)} tokens, fewer than num_samples x seq_len = {needed}: "
        "sampling overlapping windows.",
        stacklevel=2,
    )
    starts = torch.randint(0, len(tokens) - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])
