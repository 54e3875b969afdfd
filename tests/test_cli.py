"""The prune command: the real entry points in subprocesses, and flag handling in-process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_VAL, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune.cli import main
from optimum_prune.export import read_metadata

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
SMALL = ["--num-samples", "8", "--seq-len", "64", "--batch-size", "4"]


def command(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=timeout)


def parse_bytes(text: str) -> float:
    number, unit = text.split()
    return float(number) * 1024 ** ["B", "KiB", "MiB", "GiB"].index(unit)


def zero_fraction(model: torch.nn.Module, name: str) -> float:
    weight = model.get_submodule(name).weight
    return (weight == 0).float().mean().item()


def test_optimum_cli_lists_prune() -> None:
    result = command("optimum-cli", "--help")
    assert result.returncode == 0, result.stderr
    assert "prune" in result.stdout
    result = command("optimum-cli", "prune", "--help")
    assert result.returncode == 0, result.stderr
    assert "--sparsity" in result.stdout and "--eval" in result.stdout


def test_optimum_cli_prune_writes_a_loadable_model(tmp_path) -> None:
    output = tmp_path / "pruned"
    result = command(
        "optimum-cli", "prune", "--model", str(STORIES_260K), "--method", "sparsegpt", "--sparsity", "0.5",
        "--dataset", str(C4_SAMPLE), *SMALL, "--eval", str(TINYSTORIES_VAL), "--eval-windows", "2",
        "--output", str(output),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "model.layers.0.mlp.down_proj" in result.stdout  # the per-layer table
    assert "global sparsity 0.5000" in result.stdout
    before, after = map(float, re.search(r"dense ([\d.]+) -> pruned ([\d.]+)", result.stdout).groups())
    assert 1 < before < after  # pruning half of a 260K model costs perplexity
    model = AutoModelForCausalLM.from_pretrained(output)
    assert zero_fraction(model, "model.layers.4.self_attn.q_proj") == pytest.approx(0.5, abs=1e-3)
    assert read_metadata(model.config)["method"] == "sparsegpt"
    assert (output / "tokenizer.json").is_file()


def test_console_script_and_module(tmp_path) -> None:
    output = tmp_path / "pruned"
    result = command(
        "optimum-prune",
        "--model",
        str(STORIES_260K),
        "--method",
        "magnitude",
        "--pattern",
        "2:4",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr
    model = AutoModelForCausalLM.from_pretrained(output)
    assert read_metadata(model.config)["pattern"] == "2:4"
    assert zero_fraction(model, "model.layers.0.mlp.up_proj") == pytest.approx(0.5)

    result = command(sys.executable, "-m", "optimum_prune", "--model", str(STORIES_260K), "--sparsity", "1.5")
    assert result.returncode == 2
    assert "python -m optimum_prune: error: argument --sparsity: sparsity must be in [0, 1)" in result.stderr
    result = command("optimum-cli", "prune", "--model", str(STORIES_260K), "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in result.stderr


def run_main(*argv: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sparsity", "1.5"], "argument --sparsity: sparsity must be in [0, 1)"),
        (["--pattern", "3:2"], "argument --pattern: Invalid N:M pattern '3:2'"),
        (["--pattern", "2:4", "--sparsity", "0.7"], "argument --sparsity: pattern '2:4' fixes the sparsity at 0.5"),
        (["--method", "pruneall"], "argument --method: Unknown pruning method 'pruneall'"),
        (["--allocation", "owl", "--sparsity", "0.7", "--owl-lambda", "0.4"], "argument --owl-lambda: owl_lambda=0.4"),
        (["--num-samples", "0"], "argument --num-samples: num_samples must be a positive integer"),
        (["--sparsity", "half"], "argument --sparsity: invalid float value: 'half'"),
        (["--method", "wanda"], "argument --dataset: method 'wanda' needs calibration"),
        (["--dataset", "missing/c4.jsonl"], "argument --dataset: No file at missing/c4.jsonl"),
        (["--eval", "missing.txt"], "argument --eval: No file at missing.txt"),
        (["--eval-windows", "0"], "argument --eval-windows: must be a positive integer"),
        (["--device", "tpu:zero"], "argument --device:"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(flags, message, capsys) -> None:
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", *flags) == 2
    assert f"optimum-prune: error: {message}" in capsys.readouterr().err


def test_existing_output_and_config_file_errors(tmp_path, capsys) -> None:
    (tmp_path / "kept.txt").write_text("do not overwrite")
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", "--output", str(tmp_path)) == 2
    err = capsys.readouterr().err
    assert "argument --output:" in err and "--overwrite" in err
    bad_config = tmp_path / "config.json"
    bad_config.write_text(json.dumps({"method": "magnitude", "sparsity": 0.5, "flavour": "x"}))
    assert run_main("--model", str(STORIES_260K), "--config", str(bad_config)) == 2
    assert f"argument --config: {bad_config}: Unknown PruningConfig fields ['flavour']" in capsys.readouterr().err
    assert (tmp_path / "kept.txt").read_text() == "do not overwrite"


def test_bad_input_found_after_loading_exits_2_and_a_failure_1_with_one_line(tmp_path, capsys, monkeypatch) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")  # readable, but fewer tokens than one calibration window
    flags = ("--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(short), "--seq-len", "64")
    assert run_main(*flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("optimum-prune: error: The calibration text has")

    def fail(*args, **kwargs):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr("optimum_prune.engine.blockwise.BlockwiseEngine.run", fail)
    flags = ("--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--seq-len", "64")
    assert run_main(*flags) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("optimum-prune: error: RuntimeError: the device fell over") and "--verbose" in err
    assert run_main(*flags, "--verbose") == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_config_file_with_flag_override(tmp_path, capsys) -> None:
    model_dir, output = tmp_path / "tiny", tmp_path / "out"
    tiny_model("llama").save_pretrained(model_dir)
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"method": "magnitude", "sparsity": 0.3, "ignore": ["*.mlp.*"]}))
    code = run_main("--model", str(model_dir), "--config", str(config), "--sparsity", "0.75", "--output", str(output))
    assert code == 0
    assert "global sparsity 0.7500" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(output)
    metadata = read_metadata(model.config)
    assert (metadata["method"], metadata["target_sparsity"]) == ("magnitude", 0.75)
    assert zero_fraction(model, "model.layers.1.self_attn.o_proj") == pytest.approx(0.75)
    assert zero_fraction(model, "model.layers.1.mlp.gate_proj") == 0.0  # ignored by the config file
    assert json.loads((output / "pruning_config.json").read_text())["sparsity"] == 0.75


def test_dry_run_loads_nothing(capsys, monkeypatch) -> None:
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run must not load weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    assert run_main("--model", str(STORIES_260K), "--method", "wanda", "--dry-run", "--offload", "disk") == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run of wanda unstructured at 0.5") and "estimated peak memory" in out
    flags = ("--model", str(STORIES_260K), "--method", "wanda", "--dry-run", "--offload", "disk")
    assert run_main(*flags, "--offload-activations") == 0
    on_disk = capsys.readouterr().out
    disk = [parse_bytes(re.search(r"disk ([\d.]+ [KMG]?i?B)", text).group(1)) for text in (out, on_disk)]
    assert disk[1] > disk[0]  # the activations moved from host memory to disk
    assert "0.00 GiB" not in out  # small sizes in units that fit


def test_compressed_and_masks(tmp_path, capsys) -> None:
    from optimum_prune import load_masks, load_pruned

    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--pattern", "2:4", "--output", str(output)]
    assert run_main(*flags, "--export", "compressed", "--save-masks") == 0
    assert f"saved (compressed) to {output}" in capsys.readouterr().out
    assert not (output / "model.safetensors").exists()
    model = load_pruned(output)
    assert zero_fraction(model, "model.layers.2.mlp.down_proj") == pytest.approx(0.5)
    assert len(load_masks(output)) == 35


@pytest.mark.slow
def test_export_onnx_beside_the_model(tmp_path, capsys) -> None:
    import onnx

    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--sparsity", "0.6", "--output", str(output)]
    assert run_main(*flags, "--export", "onnx") == 0
    assert f"ONNX model written to {output / 'onnx'}" in capsys.readouterr().out
    graph = onnx.load(output / "onnx" / "model.onnx").graph
    weight = next(w for w in graph.initializer if w.name == "model.layers.0.mlp.up_proj.weight")
    values = onnx.numpy_helper.to_array(weight)
    assert (values == 0).mean() == pytest.approx(0.6, abs=1e-3)  # the pruned zeros are in the ONNX graph


def test_offload_disk_and_resume(tmp_path, monkeypatch, capsys) -> None:
    from optimum_prune.engine.work_folder import WorkFolder

    model_dir, output = tmp_path / "tiny", tmp_path / "out"
    tiny_model("llama").save_pretrained(model_dir)
    save_block, saved = WorkFolder.save_block, []

    def interrupt_after_block_0(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        saved.append(index)
        if index == 0 and len(saved) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkFolder, "save_block", interrupt_after_block_0)
    flags = ["--model", str(model_dir), "--method", "magnitude", "--offload", "disk", "--output", str(output)]
    assert run_main(*flags) == 130
    assert "interrupted" in capsys.readouterr().err and not output.exists()
    assert run_main(*flags) == 2
    assert "holds an unfinished run for this output: add --resume" in capsys.readouterr().err
    assert run_main(*flags, "--resume") == 0
    assert saved == [0, 1]  # the resumed run started at block 1
    model = AutoModelForCausalLM.from_pretrained(output)
    assert zero_fraction(model, "model.layers.0.self_attn.q_proj") == pytest.approx(0.5)
    assert zero_fraction(model, "model.layers.1.mlp.up_proj") == pytest.approx(0.5)


def test_push_to_hub_with_perplexity(tmp_path, monkeypatch, capsys) -> None:
    import huggingface_hub
    from hub_server import FakeHub

    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_cli_test_token")
        code = run_main(
            "--model", str(STORIES_260K), "--method", "magnitude", "--eval", str(TINYSTORIES_VAL),
            "--eval-windows", "1", "--eval-seq-len", "128", "--push-to-hub", "me/stories-pruned", "--private",
        )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "pushed to " in captured.out and "hf_cli_test_token" not in captured.out + captured.err
    assert hub.recorded.created[0]["visibility"] == "private"
    (commit,) = hub.recorded.commits
    assert {"model.safetensors", "config.json", "README.md", "pruning_config.json"} <= set(commit["files"])
    assert b"tinystories_val.txt" in commit["files"]["README.md"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "argument --resume: --resume writes to a folder: pass --output DIR."),
        (["--export", "onnx"], "argument --export: --export onnx writes to a folder"),
        (["--offload", "ram"], "argument --offload: unknown mode 'ram'"),
        (["--offload", "disk", "--output", "o", "--eval", "x.txt"], "argument --eval: needs the whole pruned model"),
        (["--output", "o", "--resume", "--export", "compressed"], "argument --resume: resuming writes dense"),
        (["--max-memory", "cpu:64GB"], "argument --max-memory: cannot read 'cpu:64GB'"),
        (["--max-memory", "0=lots"], "argument --max-memory: cannot read '0=lots'"),
    ],
)
def test_bad_output_combinations_exit_2(flags, message, capsys) -> None:
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", *flags) == 2
    assert f"optimum-prune: error: {message}" in capsys.readouterr().err
