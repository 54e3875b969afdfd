"""Bad input fails early with an error that names the problem and the fix; outputs are never half-written."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES_260K, random_ids, tiny_model
from torch import nn
from transformers import AutoTokenizer

from optimum_prune import Pruner, PruningConfig
from optimum_prune.methods import get_method


def pruned_llama(**config) -> Pruner:
    pruner = Pruner.from_pretrained(
        tiny_model("llama"), PruningConfig(method="magnitude", **config), device="cpu", progress=False
    )
    pruner.prune()
    return pruner


@pytest.mark.parametrize("sparsity", [-0.5, 1.0, 1.5])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\).*0\.5 prunes half"):
        PruningConfig(method="wanda", sparsity=sparsity)


def test_pattern_with_n_not_below_m():
    with pytest.raises(ValueError, match=r"Invalid N:M pattern '3:2'.*0 < N < M"):
        PruningConfig(method="wanda", pattern="3:2")


def test_pattern_that_does_not_divide_the_width():
    pruner = Pruner.from_pretrained(
        tiny_model("llama"), PruningConfig(method="wanda", pattern="2:5"), device="cpu", progress=False
    )
    with pytest.raises(ValueError, match=r"multiple of 5, but model\.layers\.0\.self_attn\.q_proj has 64 inputs"):
        pruner.prune(random_ids(4, 16))
    assert all((p != 0).all() for p in pruner.model.parameters() if p.dim() == 2)  # nothing pruned


def test_unknown_method():
    with pytest.raises(ValueError, match="Unknown pruning method 'sparse_gpt': choose one of"):
        PruningConfig(method="sparse_gpt")
    config = PruningConfig(method="wanda")
    config.method = "obs"  # bypassing validation still cannot import anything by name
    with pytest.raises(ValueError, match="Unknown pruning method 'obs'"):
        get_method(config.method, config.settings)


def test_model_without_decoder_blocks():
    model = tiny_model("llama")
    model.model.layers = nn.ModuleList()  # a causal LM whose decoder stack is gone
    pruner = Pruner(model, PruningConfig(method="magnitude"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no list of decoder blocks.*AutoModelForCausalLM"):
        pruner.prune()


@pytest.mark.parametrize("model", ["not a model", nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))])
def test_not_a_transformers_model(model):
    with pytest.raises(TypeError, match="needs a loaded transformers model.*AutoModelForCausalLM.from_pretrained"):
        Pruner(model)


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"No layer matches targets=\['\*\.conv\.\*'\].*fnmatch"):
        pruned_llama(targets=["*.conv.*"])


def test_calibration_needed_but_missing():
    pruner = Pruner.from_pretrained(
        tiny_model("llama"), PruningConfig(method="sparsegpt"), device="cpu", progress=False
    )
    with pytest.raises(ValueError, match="needs calibration data: pass a dataset"):
        pruner.prune()


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        (["", "  "], "holds no text"),
        (["Once upon a time."], "fewer than a window of seq_len=64: give more text or lower seq_len"),
    ],
)
def test_empty_or_too_short_calibration_text(texts, match):
    tokenizer = AutoTokenizer.from_pretrained(STORIES_260K)
    config = PruningConfig(method="wanda", num_samples=4, seq_len=64)
    pruner = Pruner.from_pretrained(tiny_model("llama"), config, tokenizer=tokenizer, device="cpu", progress=False)
    with pytest.raises(ValueError, match=match):
        pruner.prune(texts)
    assert pruner.report is None


def test_prune_twice_and_save_before_prune(tmp_path):
    pruner = Pruner.from_pretrained(
        tiny_model("llama"), PruningConfig(method="magnitude"), device="cpu", progress=False
    )
    with pytest.raises(RuntimeError, match="call prune\\(\\) first"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    pruner.prune()
    with pytest.raises(RuntimeError, match="already pruned; create a new Pruner"):
        pruner.prune()


def test_existing_output_folder_is_kept_unless_overwrite(tmp_path):
    pruner = pruned_llama()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty: choose another folder or pass overwrite=True"):
        pruner.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    pruner.save_pretrained(target, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "notes.txt" not in names and {"config.json", "model.safetensors", "pruning_config.json"} <= names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left behind


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "out").write_text("")
    with pytest.raises(FileExistsError, match="is a file: choose a folder path"):
        pruned_llama().save_pretrained(tmp_path / "out")


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    pruner = pruned_llama()

    def fail(directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pruner.model, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        pruner.save_pretrained(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_folder(tmp_path, monkeypatch):
    pruner = pruned_llama()
    pruner.save_pretrained(tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    monkeypatch.setattr(pruner.model, "save_pretrained", lambda directory, **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pruner.save_pretrained(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unknown_save_format(tmp_path):
    with pytest.raises(ValueError, match="'onnx'"):
        pruned_llama().save_pretrained(tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


def test_bad_token_ids():
    pruner = Pruner.from_pretrained(tiny_model("llama"), PruningConfig(method="wanda"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="integer tensor"):
        pruner.prune(torch.rand(4, 16))
