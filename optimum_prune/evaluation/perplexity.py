"""Perplexity with the SparseGPT protocol: texts joined, non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    text: str | Sequence[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> float:
    """Perplexity of ``model`` on ``text`` (a list is joined with blank lines, as in SparseGPT/Wanda).

    The text is tokenised once, without special tokens, and cut into non-overlapping windows of
    ``seq_len`` tokens (the first ``max_windows`` of them); the result is ``exp`` of the mean next-token
    negative log-likelihood over every window.
    """
    if not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = len(ids) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise ValueError(f"The evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = ids[: windows * seq_len].view(windows, seq_len)
    total_nll, total_tokens = 0.0, 0
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
