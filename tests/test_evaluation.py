"""Perplexity with the SparseGPT protocol, checked against a direct computation and a known model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import STORIES_260K, TINYSTORIES_VAL, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import perplexity


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES_260K)


@pytest.fixture(scope="module")
def story() -> str:
    return TINYSTORIES_VAL.read_text(encoding="utf-8")[:20_000]


@torch.no_grad()
def direct_perplexity(model, tokenizer, text: str, seq_len: int, windows: int) -> float:
    """SparseGPT's eval loop: non-overlapping windows, HF's mean shifted loss per window, exp of the mean."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    losses = [
        model(ids[:, i * seq_len : (i + 1) * seq_len], labels=ids[:, i * seq_len : (i + 1) * seq_len]).loss
        for i in range(windows)
    ]
    return math.exp(torch.stack(losses).mean().item())


def test_matches_direct_computation(tokenizer, story):
    model = tiny_model("llama")  # vocabulary 512, like the stories260K tokenizer
    expected = direct_perplexity(model, tokenizer, story, seq_len=64, windows=5)
    assert perplexity(model, tokenizer, story, seq_len=64, max_windows=5) == pytest.approx(expected, rel=1e-5)
    batched = perplexity(model, tokenizer, story, seq_len=64, max_windows=5, batch_size=3)
    assert batched == pytest.approx(expected, rel=1e-5)
    assert 300 < expected < 1000  # a random model is about as perplexed as its vocabulary is large


def test_windows_and_list_input(tokenizer, story):
    model = tiny_model("llama")
    texts = story.split("\n\n")
    joined = "\n\n".join(texts)
    assert perplexity(model, tokenizer, texts, seq_len=64, max_windows=3) == perplexity(
        model, tokenizer, joined, seq_len=64, max_windows=3
    )
    three = perplexity(model, tokenizer, story, seq_len=64, max_windows=3)
    assert three != perplexity(model, tokenizer, story, seq_len=64, max_windows=4)
    assert three == pytest.approx(direct_perplexity(model, tokenizer, story, 64, 3), rel=1e-5)


def test_text_shorter_than_one_window(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window of 512"):
        perplexity(tiny_model("llama"), tokenizer, "Once upon a time.", seq_len=512)


def test_dense_stories260k_on_tinystories_val(tokenizer):
    """SOURCES.md: 3.99 over the first 20 windows of 512 tokens (no BOS)."""
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K).eval()
    value = perplexity(model, tokenizer, TINYSTORIES_VAL.read_text(encoding="utf-8"), seq_len=512, max_windows=20)
    assert value == pytest.approx(3.99, abs=0.02)
