"""Structured pruning: smaller dense models that stock transformers classes load, with the same outputs."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from conftest import (
    ARCHITECTURES,
    C4_SAMPLE,
    STORIES_260K,
    TINYSTORIES_VAL,
    killed_at_block,
    random_ids,
    tiny_model,
)
from test_cli import run_main
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import Pruner, PruningConfig
from optimum_prune.core.layers import find_target_layers
from optimum_prune.core.statistics import InputGram
from optimum_prune.errors import InputError
from optimum_prune.export import read_metadata
from optimum_prune.methods import get_method
from optimum_prune.structured.groups import MLP, mlp_group
from optimum_prune.structured.prune import prune_group
from optimum_prune.structured.select import obs_remove

SEPARATE_QKV = ("llama", "mistral", "qwen2", "gemma", "phi")  # the others fuse q/k/v or size heads from hidden


def _config(structure: dict, method: str = "sparsegpt", **kwargs) -> PruningConfig:
    return PruningConfig(method=method, structure=structure, num_samples=8, seq_len=32, batch_size=4, **kwargs)


def _prune(architecture: str, structure: dict, method: str = "sparsegpt", **kwargs) -> Pruner:
    pruner = Pruner.from_pretrained(
        tiny_model(architecture), _config(structure, method, **kwargs), device="cpu", progress=False
    )
    pruner.prune(random_ids(8, 32))
    return pruner


def _cases():
    for architecture in ARCHITECTURES:
        yield architecture, {"mlp": 0.5}
        yield architecture, {"layers": 0.5}
        if architecture in SEPARATE_QKV:
            yield architecture, {"attention": 0.5, "mlp": 0.25}


@pytest.mark.parametrize(("architecture", "structure"), list(_cases()))
def test_saved_model_loads_with_stock_classes_and_matches(architecture, structure, tmp_path):
    pruner = _prune(architecture, structure)
    before = pruner.report.structure["parameters"]
    assert before["kept"] < before["original"]
    assert before["kept"] == sum(p.numel() for p in pruner.model.parameters())
    pruner.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert sum(p.numel() for p in reloaded.parameters()) == before["kept"]
    ids = random_ids(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruner.model(ids).logits, rtol=1e-5, atol=1e-5)
    metadata = read_metadata(tmp_path / "out")
    assert metadata["structure"]["parameters"] == before
    assert metadata["config"]["structure"]["mlp"] == structure.get("mlp", 0.0)


def test_sizes_and_config_follow_the_plan():
    pruner = _prune("llama", {"mlp": 0.5, "attention": 0.5, "layers": 0.5})
    config = pruner.model.config
    assert (config.intermediate_size, config.num_hidden_layers) == (64, 1)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 16)
    structure = pruner.report.structure
    assert structure["mlp"] == {"original": 128, "kept": 64} and structure["attention"] == {"original": 2, "kept": 1}
    layers = structure["layers"]
    assert len(layers["removed"]) == 1 and layers["criterion"] == "loss" and len(layers["loss_after_removal"]) == 1
    block = pruner.model.model.layers[0]
    assert block.mlp.down_proj.weight.shape == (64, 64) and block.self_attn.q_proj.weight.shape == (32, 64)
    assert block.self_attn.layer_idx == 0
    card = str(pruner.model_card("me/small"))
    assert (
        "structured-pruning" in card
        and "| decoder blocks | 2 -> 1 |" in card
        and "| structured mlp | 128 -> 64 |" in card
    )


def test_kv_groups_keep_their_query_heads_together():
    """Without compensation, removing a KV group equals zeroing its query heads' output columns: the query heads
    left are exactly those that share the kept key/value head."""
    model = tiny_model("llama")  # 4 query heads in 2 KV groups of 2, head_dim 16
    reference = tiny_model("llama")
    config = _config({"attention": 0.5, "compensate": False}, method="magnitude")
    pruner = Pruner.from_pretrained(model, config, device="cpu", progress=False)
    pruner.prune(random_ids(8, 32))
    kept_q = pruner.model.model.layers[0].self_attn.q_proj.weight
    original_q = reference.model.layers[0].self_attn.q_proj.weight
    group = next(g for g in range(2) if torch.equal(kept_q, original_q[g * 32 : (g + 1) * 32]))
    kept_k = pruner.model.model.layers[0].self_attn.k_proj.weight
    assert torch.equal(kept_k, reference.model.layers[0].self_attn.k_proj.weight[group * 16 : (group + 1) * 16])
    for layer in reference.model.layers:  # remove the same group by zeroing its output columns
        attention = layer.self_attn
        removed = 1 - next(
            g
            for g in range(2)
            if torch.equal(
                pruner.model.model.layers[layer.self_attn.layer_idx].self_attn.q_proj.weight,
                attention.q_proj.weight[g * 32 : (g + 1) * 32],
            )
        )
        attention.o_proj.weight.data[:, removed * 32 : (removed + 1) * 32] = 0
    ids = random_ids(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_compensation_lowers_the_reconstruction_error(method):
    """On one MLP with correlated inputs, refitting the kept down_proj columns (or OBS) lowers the error of the
    block's MLP output over the calibration tokens, against plain removal."""
    torch.manual_seed(0)
    inputs = torch.randn(512, 16) @ torch.randn(16, 64) + 0.1 * torch.randn(512, 64)
    errors = {}
    for compensate in (False, True):
        model = tiny_model("llama")
        mlp = model.model.layers[0].mlp
        with torch.no_grad():
            dense = mlp(inputs)
        layers = find_target_layers(model)[0]
        group = mlp_group(model.model.layers[0], "model.layers.0", layers, 64)
        gram = InputGram(128, torch.device("cpu"))
        with torch.no_grad():
            gram.update(mlp.act_fn(mlp.gate_proj(inputs)) * mlp.up_proj(inputs))
        prune_group(group, gram, get_method(method), keep=64, compensate=compensate, dampening=0.01)
        with torch.no_grad():
            errors[compensate] = ((mlp(inputs) - dense).norm() / dense.norm()).item()
    assert errors[True] < 0.9 * errors[False], errors


def test_obs_removal_is_exact_and_finite_on_a_wide_range_rank_deficient_hessian():
    """OBS on a Hessian of 24 tokens for 512 inputs, with massive and dead inputs (SmolLM2's kind): exactly the
    asked units go, their columns are zero, the weights are finite and the output error is below plain zeroing."""
    torch.manual_seed(0)
    units, columns = 64, 8
    inputs = torch.randn(24, units * columns)
    inputs[:, :2] *= 1e4
    inputs[:, 10:20] = 0.0
    weight = torch.randn(16, units * columns)
    removed_weight, removed = obs_remove(weight, inputs.T @ inputs, columns, units, 40, dampening=0.01)
    assert len(set(removed)) == 40 and removed_weight.dtype == weight.dtype
    gone = torch.tensor([unit * columns + c for unit in removed for c in range(columns)])
    assert torch.isfinite(removed_weight).all() and (removed_weight[:, gone] == 0).all()
    zeroed = weight.clone()
    zeroed[:, gone] = 0.0
    dense = inputs @ weight.T
    assert (inputs @ removed_weight.T - dense).norm() < (inputs @ zeroed.T - dense).norm()


def test_a_non_finite_hessian_is_refused_with_the_cause():
    hessian = torch.eye(8)
    hessian[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf.*--dtype float32"):
        obs_remove(torch.randn(4, 8), hessian, 1, 8, 2, dampening=0.01)


def test_structure_then_sparsity_on_the_smaller_model():
    pruner = _prune("llama", {"mlp": 0.5}, sparsity=0.5)
    assert pruner.model.config.intermediate_size == 64
    assert pruner.report.global_sparsity == pytest.approx(0.5, abs=1e-6)
    assert pruner.report.structure["mlp"]["kept"] == 64
    down = pruner.model.model.layers[0].mlp.down_proj.weight
    assert down.shape == (64, 64) and (down == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("architecture", "structure", "message"),
    [
        ("llama", {"mlp": 1.0}, r"must be in \[0, 1\)"),
        ("llama", {"mlp": -0.1}, r"must be in \[0, 1\)"),
        ("llama", {"heads": 0.5}, "Unknown structure heads"),
        ("llama", {"attention": 0.1}, "would keep 2 of 2 KV groups"),
        ("llama", {"layers": 0.2}, "removes 0 of 2 blocks"),
        ("llama", {"mlp": 0.05}, "keeps all 128 channels"),
        ("opt", {"attention": 0.5}, "OPTForCausalLM cannot express structure attention=0.5"),
        ("gpt2", {"attention": 0.5}, "no separate query, key and value projections"),
    ],
)
def test_bad_structures_fail_before_any_work(architecture, structure, message):
    model = tiny_model(architecture)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        Pruner.from_pretrained(model, _config(structure), device="cpu", progress=False).prune(random_ids(8, 32))
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_llama_head_counts_that_do_not_divide_the_hidden_size_name_the_nearest_valid_setting(capsys):
    """stories260K: 8 heads in 4 KV groups over a hidden size of 64; keeping 3 groups (6 heads) is refused by
    transformers' Llama config, and the error names the nearest setting that loads."""
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--seq-len", "32"]
    assert run_main(*flags, "--num-samples", "4", "--structure", "attention=0.25") == 2  # before loading
    assert "Nearest valid setting: attention=0.500 (keeps 2 of 4 KV groups)" in capsys.readouterr().err
    assert run_main(*flags, "--structure", "experts=0.5") == 2
    assert "argument --structure: structure experts= drops routed experts, but" in capsys.readouterr().err


def test_cli_structure(tmp_path, capsys):
    flags = ["--model", str(STORIES_260K), "--method", "sparsegpt", "--dataset", str(C4_SAMPLE), "--seq-len", "32"]
    output = tmp_path / "small"
    assert run_main(*flags, "--num-samples", "4", "--structure", "mlp=0.25", "layers=0.2", "--output", str(output)) == 0
    assert "structured: mlp 172 -> 128 channels, 5 -> 4 blocks" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(output)
    assert (model.config.intermediate_size, model.config.num_hidden_layers) == (128, 4)
    assert run_main(*flags, "--structure", "mlp=half") == 2
    assert "argument --structure: mlp='half' is not a number" in capsys.readouterr().err
    assert run_main(*flags, "--structure", "mlp=0.25", "--offload", "disk", "--output", str(tmp_path / "d")) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "d").config.intermediate_size == 128


def test_structure_is_part_of_the_recipe():
    config = _config({"mlp": 0.25, "align": 16})
    assert config.sparsity == 0.0 and config.needs_calibration
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert _config({"mlp": 0.25, "compensate": False}, method="magnitude").needs_calibration is False
    assert MLP == "mlp"


def test_compensation_is_trusted_as_far_as_it_generalises():
    """16 fitted tokens for 128 channels: a least-squares refit reproduces those tokens and nothing else, so the
    held-out sequences (every 2nd here) keep the plain kept columns; with more tokens a refit is kept, pulled
    towards the old weights the more, the fewer tokens it rests on."""
    changes = {}
    for sequences, tokens in ((4, 8), (8, 16), (64, 64)):
        model = tiny_model("llama")
        mlp = model.model.layers[0].mlp
        original = mlp.down_proj.weight.detach().clone()
        group = mlp_group(model.model.layers[0], "model.layers.0", find_target_layers(model)[0], 64)
        gram = InputGram(128, torch.device("cpu"), held_out_every=2)
        torch.manual_seed(1)
        with torch.no_grad():
            inputs = torch.randn(sequences, tokens, 64)
            gram.update(mlp.act_fn(mlp.gate_proj(inputs)) * mlp.up_proj(inputs))
        kept = prune_group(group, gram, get_method("wanda"), keep=64, compensate=True, dampening=0.01)
        changes[sequences] = ((mlp.down_proj.weight - original[:, kept]).norm() / original.norm()).item()
    assert changes[4] == 0.0
    assert 0.0 < changes[8] < 0.5 * changes[64], changes


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_an_interrupted_structured_run_resumes_to_the_same_model(sparsity, tmp_path, monkeypatch):
    """Killed after two of stories260K's four kept blocks, a rerun with resume=True removes the same block,
    gives the finished blocks their new shapes and saved weights, and ends with the uninterrupted run's model
    (with unstructured sparsity after the structure, too)."""
    from optimum_prune.engine.structured import StructuredEngine

    structure = {"mlp": 0.25, "attention": 0.5, "layers": 0.2}
    config = PruningConfig(method="wanda", structure=structure, sparsity=sparsity, num_samples=8, seq_len=32)

    def run(output, resume=False):
        pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
        pruner.prune(C4_SAMPLE, output_dir=output, resume=resume)
        return pruner

    expected = run(tmp_path / "straight")
    with killed_at_block(StructuredEngine, "_prune_block_structure", 2), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    assert (tmp_path / "killed.partial-structure" / "block-00001.safetensors").is_file()
    with pytest.raises(FileExistsError, match="resume=True"):
        run(tmp_path / "killed")
    pruned = []
    original = StructuredEngine._prune_block_structure

    def counted(self, index, *args):
        pruned.append(index)
        return original(self, index, *args)

    monkeypatch.setattr(StructuredEngine, "_prune_block_structure", counted)
    resumed = run(tmp_path / "killed", resume=True)
    assert pruned == [2, 3]  # blocks 0 and 1 come from the work folder
    assert not (tmp_path / "killed.partial-structure").exists()
    assert resumed.report.structure == expected.report.structure
    for name, tensor in expected.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "killed")
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.num_key_value_heads == 2


def test_the_estimate_names_the_structure_and_counts_its_gram_matrices(capsys):
    from optimum_prune.engine.estimate import estimate_run

    model = tiny_model("llama")
    plain = estimate_run(model, _config(None, "wanda"), measure_time=False)
    structured = estimate_run(model, _config({"mlp": 0.5}, "wanda"), measure_time=False)
    assert structured.device_peak_bytes > plain.device_peak_bytes  # down_proj's 128 x 128 Gram matrices
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--dry-run"]
    assert run_main(*flags, "--structure", "mlp=0.25", "layers=0.2", "--sparsity", "0.3") == 0
    assert "dry run of wanda structure mlp=0.25 layers=0.2, then unstructured at 0.3 on" in capsys.readouterr().out


def test_a_structure_with_disk_offload_writes_the_in_memory_model(tmp_path):
    """Each block read from the checkpoint when it is processed: the output folder holds exactly the weights
    and config of the same run in memory, and stock transformers loads it; killed after two blocks, a resumed
    run writes the same folder."""
    from optimum_prune.engine.structured import StructuredEngine

    config = PruningConfig(
        method="wanda", structure={"mlp": 0.25, "attention": 0.5, "layers": 0.2}, num_samples=8, seq_len=32
    )
    memory = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    memory.prune(C4_SAMPLE)

    def on_disk(output, resume=False):
        pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", offload="disk", progress=False)
        pruner.prune(C4_SAMPLE, output_dir=output, resume=resume)
        return pruner

    def check(output):
        reloaded = AutoModelForCausalLM.from_pretrained(output)
        assert reloaded.config.to_dict()["intermediate_size"] == memory.model.config.intermediate_size
        for name, tensor in memory.model.state_dict().items():
            torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)

    disk = on_disk(tmp_path / "disk")
    assert disk.report.structure == memory.report.structure and disk.report.layers == memory.report.layers
    check(tmp_path / "disk")
    with killed_at_block(StructuredEngine, "_prune_block_structure", 2), pytest.raises(KeyboardInterrupt):
        on_disk(tmp_path / "killed")
    on_disk(tmp_path / "killed", resume=True)
    check(tmp_path / "killed")
    with pytest.raises(ValueError, match="two runs"):
        Pruner.from_pretrained(
            STORIES_260K, dataclasses.replace(config, sparsity=0.5), offload="disk", progress=False
        ).prune(C4_SAMPLE, output_dir=tmp_path / "both")


def test_cli_resumes_an_interrupted_structure(tmp_path, capsys):
    """Ctrl-C names the structured pass's work folder; the same command without --resume is refused before
    loading (exit 2) and with --resume finishes."""
    from optimum_prune.engine.structured import StructuredEngine

    output = tmp_path / "small"
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--seq-len", "32"]
    flags += ["--num-samples", "4", "--structure", "mlp=0.25", "--output", str(output)]
    with killed_at_block(StructuredEngine, "_prune_block_structure", 2):
        assert run_main(*flags) == 130
    assert f"finished blocks are kept in {output}.partial-structure: run the same command with --resume" in (
        capsys.readouterr().err
    )
    assert run_main(*flags) == 2
    assert f"{output}.partial-structure holds an unfinished run for this output: add --resume" in (
        capsys.readouterr().err
    )
    assert run_main(*flags, "--resume") == 0
    assert AutoModelForCausalLM.from_pretrained(output).config.intermediate_size == 128
    assert not (tmp_path / "small.partial-structure").exists()


def _loss_without(model: torch.nn.Module, removed: list[int], ids: torch.Tensor) -> float:
    """The mean next-token loss of ``model`` with the blocks ``removed`` deleted, by full forwards of a copy."""
    smaller = copy.deepcopy(model)
    for index in sorted(removed, reverse=True):
        del smaller.model.layers[index]
    for index, block in enumerate(smaller.model.layers):
        block.self_attn.layer_idx = index
    smaller.config.num_hidden_layers = len(smaller.model.layers)
    with torch.no_grad():
        return sum(float(smaller(row, labels=row).loss) for row in ids.split(1)) / len(ids)


def test_blocks_chosen_by_loss_equal_a_search_by_full_forwards():
    """stories260K (5 blocks), 2 removed by loss: each step's choice and loss equal those of trying every block by
    a full forward of the smaller model, and the pair equals the best of all ten pairs."""
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K).eval()
    text = TINYSTORIES_VAL.read_text(encoding="utf-8")[:20000]
    ids = AutoTokenizer.from_pretrained(STORIES_260K)(text, return_tensors="pt").input_ids[0, : 8 * 64].view(8, 64)
    dense = copy.deepcopy(model)
    pruner = Pruner.from_pretrained(model, _config({"layers": 0.4}), device="cpu", progress=False)
    pruner.prune(ids)
    layers = pruner.report.structure["layers"]
    removed: list[int] = []
    for step in range(2):
        losses = {j: _loss_without(dense, removed + [j], ids) for j in range(5) if j not in removed}
        best = min(losses, key=losses.__getitem__)
        assert layers["removal_order"][step] == best
        assert layers["loss_after_removal"][step] == pytest.approx(losses[best], rel=1e-4)
        removed.append(best)
    assert layers["dense_loss"] == pytest.approx(_loss_without(dense, [], ids), rel=1e-4)
    pairs = {pair: _loss_without(dense, list(pair), ids) for pair in itertools.combinations(range(5), 2)}
    assert min(pairs, key=pairs.__getitem__) == tuple(layers["removed"])
    assert pruner.model.config.num_hidden_layers == 3


def test_blocks_by_influence_on_request():
    pruner = _prune("llama", {"layers": 0.5, "layer_criterion": "influence"})
    layers = pruner.report.structure["layers"]
    assert layers["criterion"] == "influence" and len(layers["block_influence"]) == 2
    removed = layers["removed"][0]
    assert layers["block_influence"][removed] == min(layers["block_influence"])


def test_a_parameter_budget_searches_the_mix_and_meets_the_budget(tmp_path):
    """stories260K kept to 85% of its parameters: every candidate is within the budget, the chosen one has the
    lowest held-out loss, and the saved model holds exactly the parameters counted for it."""
    config = PruningConfig(method="sparsegpt", structure={"params": 0.85}, num_samples=32, seq_len=64)
    pruner = Pruner.from_pretrained(STORIES_260K, config, progress=False)
    original = sum(p.numel() for p in pruner.model.parameters())
    pruner.prune(C4_SAMPLE)
    budget = pruner.report.structure["budget"]
    assert len(budget["candidates"]) >= 2
    kept = [candidate["parameters"] for candidate in budget["candidates"]]
    assert max(kept) <= 0.85 * original and min(kept) >= max(kept) - 0.03 * original
    best = min(budget["candidates"], key=lambda candidate: candidate["loss"])
    assert budget["chosen"] == best["structure"]
    pruner.save_pretrained(tmp_path / "out")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert (
        sum(p.numel() for p in saved.parameters())
        == best["parameters"]
        == pruner.report.structure["parameters"]["kept"]
    )
    assert f"budget params=0.85: chose {best['structure']}" in str(pruner.report)
    assert f"| budget | params=0.85: {best['structure']} chosen of " in str(pruner.model_card("me/small"))


def test_a_budget_in_bytes_keeps_the_saved_weights_within_it(tmp_path, capsys):
    """``--structure size=0.85MB`` on stories260K (1,040,128 bytes of float32 weights): the saved safetensors hold
    at most 850,000 bytes of tensors, and the report and metadata name the budget."""
    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "sparsegpt", "--dataset", str(C4_SAMPLE), "--num-samples"]
    assert run_main(*flags, "32", "--seq-len", "64", "--structure", "size=0.85MB", "--output", str(output)) == 0
    assert "budget size=850000: chose" in capsys.readouterr().out
    saved = AutoModelForCausalLM.from_pretrained(output)
    assert 0.8 * 850_000 < sum(p.numel() * p.element_size() for p in saved.parameters()) <= 850_000
    assert read_metadata(output)["structure"]["budget"]["budget"] == "size=850000"


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        ({"params": 0.7, "mlp": 0.2}, "params= chooses the mix itself: drop mlp="),
        ({"params": 1.5}, "must be in \\(0, 1\\)"),
        (
            {"params": 0.01},
            "No mix of MLP width, KV groups, blocks .what LlamaForCausalLM can lose. keeps at most params=0.01",
        ),
        ({"size": "5MB"}, "size=5,000,000 bytes is no smaller than LlamaForCausalLM's 1,040,128 bytes"),
        ({"size": "lots"}, "size='lots' must be a size in bytes, e.g. 250MB"),
        ({"size": "1MB", "params": 0.7}, "params= and size= are two budgets"),
        ({"size": "1MB", "layers": 0.2}, "size= chooses the mix itself: drop layers="),
    ],
)
def test_bad_budgets_fail_before_any_work(structure, message):
    with pytest.raises(InputError, match=message):
        Pruner.from_pretrained(STORIES_260K, PruningConfig(structure=structure), progress=False).prune(C4_SAMPLE)
