"""Perplexity with the SparseGPT protocol, checked against a direct computation and a known model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import GPT2_TOKENIZER, STORIES_260K, TINYSTORIES_VAL, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from optimum_prune import perplexity
from optimum_prune.evaluation import evaluate_perplexity


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES_260K)


@pytest.fixture(scope="module")
def story() -> str:
    return TINYSTORIES_VAL.read_text(encoding="utf-8")[:20_000]


@torch.no_grad()
def direct_perplexity(model, tokenizer, text: str, seq_len: int, windows: int, bos: bool = False) -> float:
    """SparseGPT's eval loop: non-overlapping windows, HF's mean shifted loss per window, exp of the mean; with
    ``bos``, lm-evaluation-harness's: each window's tokens all predicted, the first from a BOS token."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    losses = []
    for i in range(windows):
        window = ids[:, i * seq_len : (i + 1) * seq_len]
        if bos:
            window = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), window], dim=1)
        losses.append(model(window, labels=window).loss)
    return math.exp(torch.stack(losses).mean().item())


def test_matches_direct_computation(tokenizer, story):
    model = tiny_model("llama")  # vocabulary 512, like the stories260K tokenizer
    expected = direct_perplexity(model, tokenizer, story, seq_len=64, windows=5)
    assert perplexity(model, tokenizer, story, 64, max_windows=5, bos=False) == pytest.approx(expected, rel=1e-5)
    batched = perplexity(model, tokenizer, story, seq_len=64, max_windows=5, batch_size=3, bos=False)
    assert batched == pytest.approx(expected, rel=1e-5)
    assert 300 < expected < 1000  # a random model is about as perplexed as its vocabulary is large


def test_follows_the_tokenizers_bos(tokenizer, story):
    """The stories260K (Llama) tokenizer adds BOS: by default every window is predicted after one, and the
    result says so; a tokenizer without BOS (GPT-2) keeps the paper protocol."""
    model = tiny_model("llama")
    expected = direct_perplexity(model, tokenizer, story, seq_len=64, windows=5, bos=True)
    result = evaluate_perplexity(model, tokenizer, story, seq_len=64, max_windows=5, batch_size=2)
    assert result.value == pytest.approx(expected, rel=1e-5) and result.bos
    assert result.describe() == "5 windows of 64 tokens, each after the BOS token"
    gpt2 = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    torch.manual_seed(0)
    gpt2_model = GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2), n_embd=32, n_layer=1, n_head=2)).eval()
    plain = evaluate_perplexity(gpt2_model, gpt2, story, seq_len=64, max_windows=2)
    assert not plain.bos and plain.describe() == "2 windows of 64 tokens"


def test_windows_counted_and_context_checked(tokenizer, story):
    model = tiny_model("llama")  # 256 positions
    assert (
        evaluate_perplexity(model, tokenizer, story, seq_len=64, max_windows=10**6).windows
        == len(tokenizer(story, add_special_tokens=False).input_ids) // 64
    )
    with pytest.raises(ValueError, match="longer than the model's context of 256 tokens"):
        perplexity(model, tokenizer, story, seq_len=512)


def test_windows_and_list_input(tokenizer, story):
    model = tiny_model("llama")
    texts = story.split("\n\n")
    joined = "\n\n".join(texts)
    assert perplexity(model, tokenizer, texts, seq_len=64, max_windows=3) == perplexity(
        model, tokenizer, joined, seq_len=64, max_windows=3
    )
    three = perplexity(model, tokenizer, story, seq_len=64, max_windows=3, bos=False)
    assert three != perplexity(model, tokenizer, story, seq_len=64, max_windows=4, bos=False)
    assert three == pytest.approx(direct_perplexity(model, tokenizer, story, 64, 3), rel=1e-5)


def test_text_shorter_than_one_window(tokenizer):
    with pytest.raises(ValueError, match="fewer than one window of 128"):
        perplexity(tiny_model("llama"), tokenizer, "Once upon a time.", seq_len=128)


def test_dense_stories260k_on_tinystories_val(tokenizer):
    """SOURCES.md: 3.99 over the first 20 windows of 512 tokens (no BOS); with a BOS before each window, every
    window's first token is predicted without context, which costs a little."""
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K).eval()
    text = TINYSTORIES_VAL.read_text(encoding="utf-8")
    assert perplexity(model, tokenizer, text, seq_len=512, max_windows=20, bos=False) == pytest.approx(3.99, abs=0.02)
    with_bos = perplexity(model, tokenizer, text, seq_len=512, max_windows=20)
    assert 3.99 < with_bos < 4.5
