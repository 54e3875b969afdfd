"""Sparsity metadata in config.json: content, survival through transformers load/save, bad input."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import random_ids, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, load_pruned
from optimum_prune.export.metadata import METADATA_KEY, read_metadata


def pruned(method: str = "wanda", **config) -> Pruner:
    pruner = Pruner(tiny_model("llama"), PruningConfig(method=method, **config), device="cpu", progress=False)
    pruner.prune(random_ids(4, 16) if pruner.config.needs_calibration else None)
    return pruner


def test_metadata_records_recipe_calibration_and_every_layer():
    pruner = pruned(sparsity=0.6, seed=3)
    metadata = read_metadata(pruner.model.config)
    report = pruner.report
    assert metadata["method"] == "wanda"
    assert metadata["pattern"] == "unstructured"
    assert metadata["allocation"] == "uniform"
    assert metadata["target_sparsity"] == 0.6
    assert metadata["global_sparsity"] == pytest.approx(report.global_sparsity, abs=1e-6)
    assert metadata["global_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert metadata["layers"] == {layer.name: pytest.approx(layer.sparsity, abs=1e-6) for layer in report.layers}
    assert len(metadata["layers"]) == 14  # 7 linear layers in each of the 2 blocks
    assert metadata["calibration"] == {"dataset": "token ids", "num_samples": 4, "seq_len": 16, "seed": 3}
    assert metadata["version"]
    assert PruningConfig.from_dict(metadata["config"]) == pruner.config
    json.dumps(metadata)  # plain JSON


def test_magnitude_needs_no_calibration_and_nm_is_recorded():
    metadata = read_metadata(pruned("magnitude", pattern="2:4").model.config)
    assert metadata["calibration"] is None
    assert (metadata["pattern"], metadata["target_sparsity"], metadata["global_sparsity"]) == ("2:4", 0.5, 0.5)


def test_owl_block_sparsities_are_recorded():
    pruner = pruned(allocation="owl", sparsity=0.5, owl_lambda=0.1)
    metadata = read_metadata(pruner.model.config)
    assert metadata["allocation"] == "owl"
    assert metadata["block_sparsity"] == pytest.approx(pruner.report.block_sparsities, abs=1e-6)
    assert metadata["block_sparsity"][0] != metadata["block_sparsity"][1]


@pytest.mark.parametrize("format", ["dense", "compressed"])
def test_metadata_survives_transformers_load_and_resave(tmp_path, format):
    pruner = pruned()
    expected = json.loads(json.dumps(read_metadata(pruner.model.config)))
    pruner.save_pretrained(tmp_path / "pruned", format=format)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config[METADATA_KEY] == expected
    assert "quantization_config" not in config  # vLLM refuses models whose config names a sparse quantization
    assert read_metadata(tmp_path / "pruned") == expected
    assert read_metadata(AutoConfig.from_pretrained(tmp_path / "pruned")) == expected
    loader = load_pruned if format == "compressed" else AutoModelForCausalLM.from_pretrained
    model = loader(tmp_path / "pruned")
    model.to(torch.float16).save_pretrained(tmp_path / "resaved")
    assert read_metadata(tmp_path / "resaved") == expected
    assert read_metadata(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved").config) == expected


def test_plain_model_has_no_metadata_and_loads_with_a_warning(tmp_path, caplog):
    model = tiny_model("llama")
    assert read_metadata(model.config) is None
    model.save_pretrained(tmp_path / "plain")
    assert read_metadata(tmp_path / "plain") is None
    with caplog.at_level(logging.WARNING, logger="optimum_prune.export.loading"):
        loaded = load_pruned(tmp_path / "plain")
    assert "no optimum-prune metadata" in caplog.text
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_malformed_or_missing_metadata_errors_clearly(tmp_path):
    with pytest.raises(ValueError, match=r"malformed \(missing \['version'"):
        read_metadata({METADATA_KEY: {"method": "wanda"}})
    with pytest.raises(ValueError, match="malformed"):
        read_metadata({METADATA_KEY: "wanda 50%"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_metadata(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_metadata(tmp_path)
