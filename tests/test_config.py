"""`PruningConfig`: paper defaults, validation of every field, serialisation round trips."""

from __future__ import annotations

import json

import pytest

from optimum_prune import PruningConfig
from optimum_prune.config import CONFIG_NAME


def test_defaults_follow_the_papers():
    config = PruningConfig()
    assert config.method == "sparsegpt"
    assert config.sparsity == 0.5
    assert config.pattern == "unstructured"
    assert config.settings.block_size == 128  # SparseGPT's lazy-update block
    assert config.settings.dampening == 0.01  # 1% of the mean Hessian diagonal
    assert config.allocation == "uniform"
    assert (config.owl_m, config.owl_lambda) == (5.0, 0.08)  # OWL's M and lambda for LLaMA
    assert (config.num_samples, config.seq_len) == (128, 2048)  # 128 C4 sequences of 2048 tokens
    assert config.nm_pattern is None


@pytest.mark.parametrize(("pattern", "sparsity"), [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75)])
def test_nm_pattern_sets_the_sparsity(pattern, sparsity):
    config = PruningConfig(method="wanda", pattern=pattern)
    assert config.sparsity == sparsity
    assert config.nm_pattern.m == int(pattern.split(":")[1])


def test_method_is_case_insensitive_and_calibration_need():
    assert PruningConfig(method="WANDA").method == "wanda"
    assert not PruningConfig(method="magnitude").needs_calibration
    assert PruningConfig(method="magnitude", allocation="owl", sparsity=0.5).needs_calibration
    assert PruningConfig(method="wanda").needs_calibration


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "obc"}, ValueError, "Unknown pruning method 'obc'"),
        ({"sparsity": 1.0}, ValueError, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": -0.1}, ValueError, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": 50}, ValueError, r"sparsity must be in \[0, 1\)"),
        ({"sparsity": "0.5"}, TypeError, "sparsity must be a number"),
        ({"sparsity": True}, TypeError, "sparsity must be a number"),
        ({"pattern": "3:2"}, ValueError, "0 < N < M"),
        ({"pattern": "0:4"}, ValueError, "0 < N < M"),
        ({"pattern": "2-4"}, ValueError, "Unknown pattern '2-4'"),
        ({"pattern": 24}, TypeError, "pattern must be a string"),
        ({"pattern": "2:4", "sparsity": 0.6}, ValueError, "fixes the sparsity at 0.5"),
        ({"allocation": "global"}, ValueError, "Unknown allocation 'global'"),
        ({"allocation": "owl", "pattern": "2:4"}, ValueError, "N:M pattern fixes"),
        ({"allocation": "owl", "sparsity": 0.95, "owl_lambda": 0.08}, ValueError, "owl_lambda=0.08"),
        ({"allocation": "owl", "sparsity": 0.05, "owl_lambda": 0.08}, ValueError, "owl_lambda=0.08"),
        ({"allocation": "owl", "owl_m": 0}, ValueError, "owl_m must be positive"),
        ({"num_samples": 0}, ValueError, "num_samples must be a positive integer"),
        ({"seq_len": 12.5}, ValueError, "seq_len must be a positive integer"),
        ({"batch_size": True}, ValueError, "batch_size must be a positive integer"),
        ({"settings": {"block_size": -128}}, ValueError, "block_size must be a positive integer"),
        ({"method": "sparsellm", "settings": {"iterations": 0}}, ValueError, "iterations must be a positive integer"),
        ({"pattern": "4:8", "settings": {"block_size": 100}}, ValueError, "block_size=100 must be a multiple of M=8"),
        ({"settings": {"dampening": -0.01}}, ValueError, "dampening must be >= 0"),
        ({"settings": {"dampening": float("nan")}}, ValueError, "dampening must be a finite number"),
        ({"method": "wanda", "settings": {"dampening": 0.1}}, ValueError, "Method 'wanda' has no setting dampening"),
        ({"targets": "q_proj"}, TypeError, "lists of glob patterns"),
        ({"ignore": "lm_head"}, TypeError, "lists of glob patterns"),
    ],
)
def test_invalid_fields_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        PruningConfig(**kwargs)


def test_dict_round_trip_keeps_every_field():
    config = PruningConfig(
        method="wanda",
        pattern="4:8",
        targets=["*.mlp.*"],
        ignore=["*.down_proj"],
        num_samples=16,
        seq_len=64,
        seed=3,
        batch_size=2,
    )
    data = config.to_dict()
    assert json.loads(json.dumps(data)) == data  # plain JSON types
    assert PruningConfig.from_dict(data) == config


def test_method_settings_round_trip_and_old_files():
    """A method's settings serialise nested under "settings"; a 0.1 file with them at the top level still reads."""
    config = PruningConfig(method="sparsellm", settings={"dampening": 0.05, "alpha": 2.0})
    data = config.to_dict()
    assert data["settings"] == {
        "block_size": 128,
        "dampening": 0.05,
        "iterations": 10,
        "alpha": 2.0,
        "beta": 5.0,
        "gamma": 5.0,
    }
    assert PruningConfig.from_dict(data) == config
    old = {"method": "sparsellm", "dampening": 0.05, "block_size": 128, "sparsellm_alpha": 2.0, "sparsellm_gamma": 5.0}
    assert PruningConfig.from_dict(old) == config
    assert PruningConfig.from_dict({"method": "wanda", "dampening": 0.01}) == PruningConfig(method="wanda")


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"Unknown PruningConfig fields \['sparsity_ratio'\]"):
        PruningConfig.from_dict({"method": "wanda", "sparsity_ratio": 0.5})


def test_from_dict_validates():
    with pytest.raises(ValueError, match="sparsity must be in"):
        PruningConfig.from_dict({"sparsity": 1.5})


def test_save_and_load_pretrained(tmp_path):
    config = PruningConfig(method="magnitude", sparsity=0.7, allocation="owl", owl_lambda=0.1, ignore=["*.o_proj"])
    path = config.save_pretrained(tmp_path / "run")
    assert path.endswith(CONFIG_NAME)
    assert PruningConfig.from_pretrained(tmp_path / "run") == config
    assert PruningConfig.from_pretrained(path) == config  # the JSON file itself works too
    assert json.loads((tmp_path / "run" / CONFIG_NAME).read_text())["sparsity"] == 0.7


def test_from_pretrained_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PruningConfig.from_pretrained(tmp_path)


def test_block_size_constraint_only_for_lazy_update_methods():
    assert PruningConfig(method="wanda", pattern="2:5").sparsity == pytest.approx(0.6)
    with pytest.raises(ValueError, match="block_size=128 must be a multiple of M=5"):
        PruningConfig(method="sparsegpt", pattern="2:5")
    assert PruningConfig(method="sparsegpt", pattern="2:5", settings={"block_size": 125}).settings.block_size == 125
