"""Vision-language models (AutoModelForImageTextToText): the language model's blocks are pruned as a text
model's, the vision tower and projector are left as they were, and the output loads with stock classes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import STORIES_260K, TINYSTORIES_VAL, VLM_ARCHITECTURES, random_ids, tiny_vlm
from test_cli import run_main

from optimum_prune import Pruner, PruningConfig
from optimum_prune.errors import InputError
from optimum_prune.export import read_metadata

CALIBRATION = {"num_samples": 8, "seq_len": 32, "batch_size": 4}


def _outside_language_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items() if ".language_model.layers." not in name}


@pytest.mark.parametrize("architecture", list(VLM_ARCHITECTURES))
def test_the_language_model_is_pruned_and_the_rest_kept_through_save_and_reload(architecture, tmp_path):
    model = tiny_vlm(architecture)
    kept = _outside_language_model(model)
    pruner = Pruner.from_pretrained(model, PruningConfig(method="wanda", **CALIBRATION), device="cpu", progress=False)
    report = pruner.prune(random_ids(8, 32))
    assert report.layers and all(".language_model.layers." in layer.name for layer in report.layers)
    assert report.global_sparsity == pytest.approx(0.5)
    assert report.vision_parameters > 0 and "vision tower and projector" in report.table()
    for name, value in _outside_language_model(pruner.model).items():
        assert torch.equal(value, kept[name]), name
    pruner.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    saved = reloaded.state_dict()
    assert saved.keys() == pruner.model.state_dict().keys()
    assert all(torch.equal(saved[name], value) for name, value in pruner.model.state_dict().items())
    assert read_metadata(tmp_path / "out")["vision_parameters"] == report.vision_parameters
    card = str(pruner.model_card("me/pruned-vlm"))
    assert "AutoModelForImageTextToText.from_pretrained" in card and "image-text-to-text" in card


@pytest.mark.parametrize("architecture", ["llava", "mistral3", "gemma3"])
def test_masks_equal_those_of_the_same_decoder_pruned_as_a_text_model(architecture):
    """The language model and head copied into the text model class of its config, pruned on the same ids."""
    model = tiny_vlm(architecture)
    text = transformers.AutoModelForCausalLM.from_config(model.config.get_text_config()).eval()
    state = {
        name.replace("model.language_model.", "model."): value
        for name, value in model.state_dict().items()
        if "language_model" in name or name.startswith("lm_head")
    }
    assert not text.load_state_dict(state, strict=False).missing_keys
    config = PruningConfig(method="sparsegpt", **CALIBRATION)
    ids = random_ids(8, 32)
    pruned = {}
    for name, candidate in (("vlm", model), ("text", text)):
        pruner = Pruner.from_pretrained(candidate, config, device="cpu", progress=False)
        pruner.prune(ids)
        pruned[name] = {
            layer.name.replace("model.language_model.", "model."): pruner.model.get_submodule(layer.name).weight == 0
            for layer in pruner.report.layers
        }
    assert pruned["vlm"].keys() == pruned["text"].keys()
    for name, mask in pruned["vlm"].items():
        assert torch.equal(mask, pruned["text"][name]), name


@pytest.mark.parametrize("architecture", ["qwen2_vl", "gemma3"])
def test_structured_pruning_updates_the_nested_text_config(architecture, tmp_path):
    pruner = Pruner.from_pretrained(
        tiny_vlm(architecture),
        PruningConfig(method="sparsegpt", structure={"mlp": 0.5, "layers": 0.5}, **CALIBRATION),
        device="cpu",
        progress=False,
    )
    kept = _outside_language_model(pruner.model)
    pruner.prune(random_ids(8, 32))
    pruner.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    text_config = reloaded.config.get_text_config()
    assert (text_config.intermediate_size, text_config.num_hidden_layers) == (64, 1)
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruner.model(input_ids=ids).logits)
    for name, value in _outside_language_model(reloaded).items():
        assert torch.equal(value, kept[name]), name


def test_cli_prunes_a_saved_vision_language_model(tmp_path, capsys):
    """The output keeps the processor's files of the input folder."""
    tiny_vlm("llava").save_pretrained(tmp_path / "llava")
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28}}
    (tmp_path / "llava" / "preprocessor_config.json").write_text(json.dumps(processor))
    flags = ["--model", str(tmp_path / "llava"), "--method", "magnitude", "--output", str(tmp_path / "out")]
    assert run_main(*flags) == 0
    assert "left dense outside the language model" in capsys.readouterr().out
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    layer = reloaded.model.language_model.layers[0].mlp.down_proj.weight
    assert (layer == 0).float().mean() == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text()) == processor


def test_an_encoder_is_still_refused():
    with pytest.raises(InputError, match="not a causal language model"):
        Pruner.from_pretrained(
            transformers.AutoModel.from_config(
                transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
            ),
            PruningConfig(method="magnitude"),
        )


def test_recovery_keeps_the_zeros_and_leaves_the_vision_tower_frozen():
    """Language-model training on text (the stories260K tokenizer shares the tiny models' 512-token vocabulary)."""
    model = tiny_vlm("llava")
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES_260K)
    pruner = Pruner.from_pretrained(
        model, PruningConfig(method="wanda", **CALIBRATION), tokenizer=tokenizer, device="cpu", progress=False
    )
    pruner.prune(random_ids(8, 32))
    vision = {name: value.clone() for name, value in model.state_dict().items() if "language_model" not in name}
    language = {name: value.clone() for name, value in model.state_dict().items() if "language_model" in name}
    pruner.recover(str(TINYSTORIES_VAL), max_steps=3, distill=False, seq_len=32, learning_rate=1e-2)
    trained = pruner.model.state_dict()
    assert any(not torch.equal(trained[name], value) for name, value in language.items())
    assert all(torch.equal(trained[name], value) for name, value in vision.items() if not name.startswith("lm_head"))
    assert all(parameter.requires_grad for parameter in pruner.model.parameters())
    for layer in pruner.report.layers:
        assert (pruner.model.get_submodule(layer.name).weight == 0).float().mean() == pytest.approx(0.5)
