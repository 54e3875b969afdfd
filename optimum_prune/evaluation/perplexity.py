"""Perplexity with the SparseGPT protocol: texts joined, non-overlapping windows, mean token NLL."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..calibration import bos_token_id
from ..errors import InputError


@dataclass(frozen=True)
class Perplexity:
    """A perplexity and how it was measured."""

    value: float
    windows: int
    seq_len: int
    bos: bool  # every window started with the tokenizer's BOS token

    def describe(self) -> str:
        """``"12 windows of 512 tokens, each after <bos>"``."""
        windows = f"{self.windows} window{'s' if self.windows != 1 else ''} of {self.seq_len} tokens"
        return f"{windows}, each after the BOS token" if self.bos else windows


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    text: str | Sequence[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bos: bool | None = None,
) -> Perplexity:
    """Perplexity of ``model`` on ``text`` (a list is joined with blank lines, as in SparseGPT/Wanda). ``model``
    may be the folder of an ONNX export (run by onnxruntime; ``tokenizer=None`` reads the folder's) or a ``.gguf``
    file (run by llama.cpp; pass the model's tokenizer).

    The text is tokenised once, without special tokens, and cut into non-overlapping windows of ``seq_len``
    tokens (the first ``max_windows`` of them); the result is ``exp`` of the mean next-token negative
    log-likelihood over every window. ``bos=None`` follows the tokenizer, as lm-evaluation-harness does: when
    it adds a BOS token (Llama, Gemma), each window's ``seq_len`` tokens are all predicted after a BOS; when it
    adds none (GPT-2, OPT), the paper protocol predicts the last ``seq_len - 1`` tokens of each window.
    """
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_windows", max_windows)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InputError(f"{name}={value!r} must be a positive integer.")
    gguf_file = isinstance(model, str | os.PathLike) and os.fspath(model).endswith(".gguf")
    if isinstance(model, str | os.PathLike) and not gguf_file:  # an exported ONNX folder
        from .onnx_model import OnnxCausalLM

        model = OnnxCausalLM(model)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model.folder)
    if tokenizer is None:
        raise InputError(
            "tokenizer=None: pass the model's tokenizer (AutoTokenizer.from_pretrained(...)); only an ONNX folder "
            "reads its own."
        )
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and seq_len > context:
        raise InputError(
            f"seq_len={seq_len} is longer than the model's context of {context} tokens: its perplexity there "
            f"measures positions it was never trained on. Use seq_len <= {context}."
        )
    bos_id = bos_token_id(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    if bos and bos_id is None:
        raise InputError("bos=True, but the tokenizer has no BOS token.")
    if not isinstance(text, str):
        text = "\n\n".join(text)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
    windows = len(ids) // seq_len
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows == 0:
        raise InputError(f"The evaluation text has {len(ids)} tokens, fewer than one window of {seq_len}.")
    cut = ids[: windows * seq_len].view(windows, seq_len)
    if gguf_file:
        value = llamacpp_perplexity(model, cut, bos_id)
    else:
        value = windows_perplexity(model, cut, batch_size, device, bos_id)
    return Perplexity(value, windows, seq_len, bos_id is not None)


def llamacpp_perplexity(path: str | os.PathLike, windows: torch.Tensor, bos_id: int | None = None) -> float:
    """`windows_perplexity` of a GGUF file, every log-probability computed by llama.cpp (`evaluation.llamacpp`)."""
    from .llamacpp import LlamaCpp

    runner = LlamaCpp(path, context=windows.shape[1] + 1)
    total_nll, total_tokens = 0.0, 0
    for window in windows.tolist():
        logprobs = runner.token_logprobs([bos_id, *window] if bos_id is not None else window)
        total_nll -= sum(logprobs)
        total_tokens += len(logprobs)
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def windows_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bos_id: int | None = None,
) -> float:
    """``exp`` of the mean next-token negative log-likelihood over token ``windows`` ``(n, seq_len)``: every token
    but the first of each window is predicted from the ones before it, or, with ``bos_id``, every token, the
    first from that BOS token."""
    if device is None:  # the model's own device; an ONNX model takes CPU tensors
        device = next(model.parameters()).device if isinstance(model, nn.Module) else "cpu"
    device = torch.device(device)
    total_nll, total_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        if bos_id is None:  # every token but the first is predicted from the ones before it
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
        else:  # every token is predicted, the first from the BOS token
            inputs = torch.cat([torch.full_like(batch[:, :1], bos_id), batch[:, :-1]], dim=1)
            logits = model(input_ids=inputs, use_cache=False).logits.float()
            targets = batch
        total_nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


def perplexity(
    model: nn.Module | str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None,
    text: str | Sequence[str],
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    bos: bool | None = None,
) -> float:
    """The perplexity value of `evaluate_perplexity` (same arguments)."""
    return evaluate_perplexity(model, tokenizer, text, seq_len, max_windows, batch_size, device, bos).value
