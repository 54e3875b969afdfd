"""Block-wise reconstruction (`engine.reconstruct`): every pruned block trained to the dense block's outputs with
its zeros frozen; never worse on held-out batches; resumable; with every kind of pruning the engine does."""

from __future__ import annotations

import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, killed_at_block, random_ids, tiny_model, tiny_vlm
from test_cli import run_main
from test_hardening2 import _no_loading

from optimum_prune import Pruner, PruningConfig
from optimum_prune.core.layers import find_target_layers
from optimum_prune.core.masks import unpack_mask
from optimum_prune.engine.work_folder import WorkFolder
from optimum_prune.errors import InputError

CALIBRATION = {"num_samples": 16, "seq_len": 32, "batch_size": 4}


def _prune(model, **arguments) -> Pruner:
    pruner = Pruner.from_pretrained(model, PruningConfig(**CALIBRATION, **arguments), device="cpu", progress=False)
    pruner.prune(random_ids(16, 32))
    return pruner


def _weights(pruner: Pruner) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in pruner.model.named_parameters()}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_training_keeps_every_pruned_zero_and_lowers_the_held_out_error(pattern: str) -> None:
    sparsity = {"sparsity": 0.6} if pattern == "unstructured" else {"pattern": "2:4"}
    plain = _prune(tiny_model("llama"), method="wanda", **sparsity)
    trained = _prune(tiny_model("llama"), method="wanda", reconstruct={"epochs": 3}, **sparsity)
    blocks = trained.report.reconstruction
    assert len(blocks) == 2 and all(block["kept"] for block in blocks)
    assert all(block["held_out_after"] < block["held_out_before"] for block in blocks)
    for layer in find_target_layers(trained.model):
        for target in layer:
            weight = target.matrix()
            mask = unpack_mask(trained.masks[target.name], weight.shape)  # what the method pruned in this run
            assert torch.equal(weight == 0, mask), target.name  # those zeros, no more, no fewer
            if pattern == "2:4":  # the pattern itself: two zeros in every group of four inputs
                assert ((weight == 0).view(weight.shape[0], -1, 4).sum(-1) == 2).all()
    assert trained.report.global_sparsity == pytest.approx(plain.report.global_sparsity)
    changed = [name for name, value in _weights(trained).items() if not torch.equal(value, _weights(plain)[name])]
    assert any("norm" in name for name in changed) and any("proj" in name for name in changed)  # norms train too


def test_a_block_whose_held_out_error_does_not_fall_keeps_what_pruning_left() -> None:
    """A learning rate that can only diverge: every block goes back to its pruned weights, and the model is the
    model pruned without reconstruction, bit for bit (the next blocks' inputs are the same)."""
    plain = _prune(tiny_model("llama"), method="sparsegpt", sparsity=0.5)
    diverged = _prune(tiny_model("llama"), method="sparsegpt", sparsity=0.5, reconstruct={"lr": 1e4})
    assert not any(block["kept"] for block in diverged.report.reconstruction)
    assert all(torch.equal(value, _weights(plain)[name]) for name, value in _weights(diverged).items())
    assert "left as pruned (held-out error did not fall): 0, 1" in diverged.report.table()


@pytest.mark.parametrize("inputs", ["pruned", "dense"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_model(inputs: str, tmp_path) -> None:
    config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruct={"inputs": inputs}, **CALIBRATION)
    whole = Pruner.from_pretrained(tiny_model("qwen2"), config, device="cpu", progress=False)
    whole.prune(random_ids(16, 32))
    interrupted = Pruner.from_pretrained(tiny_model("qwen2"), config, device="cpu", progress=False)
    with killed_at_block(WorkFolder, "save_block", 1), pytest.raises(KeyboardInterrupt):
        interrupted.prune(random_ids(16, 32), output_dir=tmp_path / "out")
    resumed = Pruner.from_pretrained(tiny_model("qwen2"), config, device="cpu", progress=False)
    resumed.prune(random_ids(16, 32), output_dir=tmp_path / "out", resume=True)
    assert all(torch.equal(value, _weights(whole)[name]) for name, value in _weights(resumed).items())
    assert [b["held_out_after"] for b in resumed.report.reconstruction] == [
        b["held_out_after"] for b in whole.report.reconstruction
    ]


def test_dense_inputs_train_on_the_dense_model_s_stream() -> None:
    pruned = _prune(tiny_model("llama"), method="sparsegpt", sparsity=0.7, reconstruct=True)
    dense = _prune(tiny_model("llama"), method="sparsegpt", sparsity=0.7, reconstruct={"inputs": "dense"})
    # block 0 sees the same inputs either way; block 1 the pruned block 0's outputs, or the dense block 0's
    assert pruned.report.reconstruction[0]["held_out_before"] == dense.report.reconstruction[0]["held_out_before"]
    second = (pruned.report.reconstruction[1], dense.report.reconstruction[1])
    assert second[0]["held_out_before"] != second[1]["held_out_before"]


@pytest.mark.parametrize(
    ("model", "arguments"),
    [
        ("llama", {"method": "sparsegpt", "sparsity": 0.0, "structure": {"mlp": 0.5, "attention": 0.5}}),
        ("qwen3_moe", {"method": "wanda", "sparsity": 0.5}),
        ("gemma3_text", {"method": "sparsegpt", "pattern": "2:4"}),
        ("llama", {"method": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1}),
        ("qwen2_vl", {"method": "sparsegpt", "sparsity": 0.5}),
    ],
)
def test_reconstruction_follows_structured_moe_gemma_owl_and_vision_language_pruning(
    model: str, arguments: dict
) -> None:
    builders = {"qwen2_vl": lambda: tiny_vlm("qwen2_vl"), "gemma3_text": _tiny_gemma3}
    built = builders.get(model, lambda: tiny_model(model))()
    pruner = _prune(built, reconstruct=True, **arguments)
    blocks = pruner.report.reconstruction  # random weights on random tokens: a block may gain nothing
    assert len(blocks) == 2
    assert all(block["kept"] == (block["held_out_after"] < block["held_out_before"]) for block in blocks)
    if "structure" in arguments:
        assert pruner.model.config.intermediate_size == 64
    else:
        assert pruner.report.global_sparsity == pytest.approx(0.5, abs=0.02)


def _tiny_gemma3():
    """A random-init Gemma 3 text model (sliding-window and global layers, q/k norms, four norms a block)."""
    import transformers

    config = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=16, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_disk_offload_gives_the_in_memory_model(tmp_path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "model")
    config = PruningConfig(method="wanda", sparsity=0.5, reconstruct=True, **CALIBRATION)
    in_memory = Pruner.from_pretrained(tmp_path / "model", config, device="cpu", progress=False)
    in_memory.prune(random_ids(16, 32))
    streamed = Pruner.from_pretrained(tmp_path / "model", config, device="cpu", progress=False, offload="disk")
    streamed.prune(random_ids(16, 32), output_dir=tmp_path / "out")
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(saved[name], value) for name, value in in_memory.model.state_dict().items())


@pytest.mark.parametrize(
    ("reconstruct", "message"),
    [
        ({"epochs": 0}, "epochs=0 must be a positive integer"),
        ({"lr": 0.0}, "lr=0.0 must be a positive number"),
        ({"lr": -1e-3}, "lr=-0.001 must be a positive number"),
        ({"held_out": 1.0}, "held_out=1.0 must be in"),
        ({"inputs": "both"}, "choose one of pruned, dense"),
        ({"steps": 3}, "reconstruct has no setting steps"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_made(reconstruct: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        PruningConfig(method="wanda", reconstruct=reconstruct)


def test_no_held_out_batch_left_and_gptq_are_refused_before_loading(monkeypatch, capsys) -> None:
    with pytest.raises(InputError, match="num_samples=4 with batch_size=4 makes 1"):
        PruningConfig(method="wanda", reconstruct=True, num_samples=4, batch_size=4)
    with pytest.raises(InputError, match="reconstruct with gptq='int4'"):
        PruningConfig(method="wanda", reconstruct=True, gptq="int4")
    _no_loading(monkeypatch)
    model = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE)]
    assert run_main(*model, "--reconstruct", "--num-samples", "4", "--batch-size", "4") == 2
    assert "argument --num-samples: reconstruct trains on calibration batches" in capsys.readouterr().err
    assert run_main(*model, "--reconstruct-lr", "0.01") == 2
    assert "argument --reconstruct-lr: it refines --reconstruct" in capsys.readouterr().err
    assert run_main(*model, "--reconstruct", "--reconstruct-epochs", "0") == 2
    assert "argument --reconstruct-epochs: reconstruction epochs=0" in capsys.readouterr().err


def test_the_cli_reconstructs_and_records_it(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--reconstruct"]
    flags += ["--reconstruct-epochs", "1", "--num-samples", "16", "--seq-len", "64", "--batch-size", "4"]
    assert run_main(*flags, "--output", str(out)) == 0
    assert "reconstruction: " in capsys.readouterr().out
    assert run_main(*flags, "--dry-run") == 0
    assert "each block reconstructed (1 epochs)" in capsys.readouterr().out
    recipe = PruningConfig.from_pretrained(out).reconstruct
    assert recipe is not None and recipe.epochs == 1
    pruner = _prune(tiny_model("llama"), method="wanda", sparsity=0.5, reconstruct=True)
    assert "block-wise reconstruction | each block trained to the dense block's outputs" in str(
        pruner.model_card("u/m")
    )
