"""Pruning masks: sparsity_masks.safetensors, load_masks, apply_masks, and the kept-but-zero distinction."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, apply_masks, load_masks, load_pruned
from optimum_prune.export.masks import MASKS_NAME, Masks, read_masks

UP = "model.layers.0.mlp.up_proj.weight"


def pruned(arch: str = "llama", method: str = "wanda", pattern: str = "unstructured") -> Pruner:
    pruner = Pruner(tiny_model(arch), PruningConfig(method=method, pattern=pattern), device="cpu", progress=False)
    pruner.prune(random_ids(4, 16))
    return pruner


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_masks_are_keyed_by_parameter_and_match_the_zeros(arch):
    pruner = pruned(arch)
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    parameters = dict(pruner.model.named_parameters())
    assert len(masks) == len(pruner.report.layers)
    for layer in pruner.report.layers:
        name = f"{layer.name}.weight"
        weight = parameters[name]
        assert masks.shape(name) == tuple(weight.shape)  # GPT-2 Conv1D: (in, out), the weight's own layout
        assert torch.equal(masks[name], weight == 0)  # random weights: only the pruned ones are zero
        assert masks.sparsity(name) == pytest.approx(layer.sparsity)


def test_save_masks_tells_kept_zeros_from_pruned_weights(tmp_path):
    pruner = pruned()
    weight = pruner.model.model.layers[0].mlp.up_proj.weight
    kept = (weight != 0).nonzero()[0].tolist()
    weight.data[kept[0], kept[1]] = 0.0  # a kept weight that happens to be exactly zero
    pruner.save_pretrained(tmp_path / "out", save_masks=True)
    assert (tmp_path / "out" / MASKS_NAME).is_file()
    masks = load_masks(tmp_path / "out")
    assert not masks[UP][kept[0], kept[1]]
    assert int((weight == 0).sum()) == int(masks[UP].sum()) + 1
    expected = Masks.from_pruner(pruner.model, pruner.masks)
    assert set(masks) == set(expected)
    assert all(torch.equal(masks[name], expected[name]) for name in masks)
    assert torch.equal(read_masks(tmp_path / "out" / MASKS_NAME)[UP], masks[UP])  # the file itself also works


def test_compressed_folder_gives_the_same_masks_without_a_masks_file(tmp_path):
    pruner = pruned("gpt2", pattern="2:4")
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    assert not (tmp_path / "out" / MASKS_NAME).exists()
    masks = load_masks(tmp_path / "out")
    expected = Masks.from_pruner(pruner.model, pruner.masks)
    assert set(masks) == set(expected)
    assert all(torch.equal(masks[name], expected[name]) for name in masks)


def test_apply_masks_restores_sparsity_after_a_fine_tuning_step(tmp_path):
    pruner = pruned()
    pruner.save_pretrained(tmp_path / "out", save_masks=True)
    model = load_pruned(tmp_path / "out")
    masks = load_masks(tmp_path / "out")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = random_ids(2, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    weight = model.model.layers[0].mlp.up_proj.weight
    assert int((weight[masks[UP]] != 0).sum()) > 0  # the step moved pruned weights
    trained = weight.detach().clone()
    restored = apply_masks(model, masks)
    assert restored > 0
    assert torch.all(weight[masks[UP]] == 0)
    assert torch.equal(weight[~masks[UP]], trained[~masks[UP]])  # kept weights untouched
    assert apply_masks(model, masks) == 0


def test_apply_masks_refuses_masks_of_another_model():
    masks = Masks.from_pruner(pruned().model, pruned().masks)
    with pytest.raises(KeyError, match="another model"):
        apply_masks(tiny_model("gpt2"), masks)
    with pytest.raises(ValueError, match="has shape"):
        apply_masks(tiny_model("llama"), {UP: torch.zeros(3, 3, dtype=torch.bool)})


def test_dense_folder_without_masks_errors_clearly(tmp_path):
    pruned().save_pretrained(tmp_path / "pruned")
    with pytest.raises(FileNotFoundError, match="save_masks=True"):
        load_masks(tmp_path / "pruned")
    tiny_model("llama").save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="has no pruning masks"):
        load_masks(tmp_path / "plain")


def test_damaged_masks_file_is_named(tmp_path):
    pruned().save_pretrained(tmp_path / "out", save_masks=True)
    path = tmp_path / "out" / MASKS_NAME
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{MASKS_NAME} is not a valid safetensors file"):
        load_masks(tmp_path / "out")
    tiny_model("llama").save_pretrained(tmp_path / "weights")
    with pytest.raises(ValueError, match="not an optimum-prune masks file"):
        read_masks(tmp_path / "weights" / "model.safetensors")


def test_wrong_mask_length_is_rejected():
    with pytest.raises(ValueError, match="corrupted"):
        Masks({"w": torch.zeros(3, dtype=torch.uint8)}, {"w": (4, 8)})


def test_plain_transformers_loads_a_folder_with_masks(tmp_path):
    pruner = pruned()
    pruner.save_pretrained(tmp_path / "out", save_masks=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, pruner.model.model.layers[0].mlp.up_proj.weight)
