"""What a new user hits on the CLI and the API: each case here failed before it was fixed (issue 12)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_VAL, random_ids, tiny_model
from test_cli import run_main
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig

SMALL = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    folder = tmp_path / "llama"
    tiny_model("llama").save_pretrained(folder)
    return folder


def _config() -> PruningConfig:
    return PruningConfig(method="wanda", sparsity=0.5, num_samples=4, seq_len=32, batch_size=4)


# 1. Every path argument accepts str and Path.
@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("as_type", [str, Path])
def test_offload_folder_as_str_or_path(saved_llama, tmp_path, offload, as_type):
    work = tmp_path / "work"
    pruner = Pruner.from_pretrained(
        as_type(saved_llama), _config(), device="cpu", offload=offload, offload_folder=as_type(work), progress=False
    )
    pruner.prune(random_ids(4, 32), output_dir=as_type(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").is_file() and not (work / "out.partial").exists()


def test_cli_offload_folder(saved_llama, tmp_path):
    flags = ["--model", str(saved_llama), "--method", "magnitude", "--output", str(tmp_path / "out")]
    assert run_main(*flags, "--offload", "disk", "--offload-folder", str(tmp_path / "work")) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


# 2. ONNX export of a half-precision model runs in onnxruntime.
def test_onnx_export_of_a_bf16_model_loads_in_onnxruntime(tmp_path, capfd):
    onnxruntime = pytest.importorskip("onnxruntime")
    from optimum_prune import export_onnx

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_model("llama").config, dtype=torch.bfloat16).eval()
    capfd.readouterr()
    folder = export_onnx(model, tmp_path / "onnx", with_past=False)
    assert capfd.readouterr().out == ""  # no exporter chatter in the user's output
    assert next(model.parameters()).dtype == torch.bfloat16  # cast back after the export
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
    ids = random_ids(1, 8).numpy()
    inputs = {"input_ids": ids, "attention_mask": ids * 0 + 1, "position_ids": torch.arange(8)[None].numpy()}
    logits = session.run(None, inputs)[0]
    expected = model.float()(torch.from_numpy(ids)).logits
    assert torch.allclose(torch.from_numpy(logits), expected, atol=1e-4)


# 3. What is not a causal LM is refused before any weight is read.
def test_encoder_only_model_is_refused(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "bert"
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    transformers.BertModel(config).save_pretrained(folder)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    with pytest.raises(ValueError, match="BertModel model, not a causal language model"):
        Pruner.from_pretrained(folder, _config())
    assert run_main("--model", str(folder), "--method", "magnitude", "--output", str(tmp_path / "out")) == 2
    assert "argument --model:" in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="BertModel is not a causal language model"):
        Pruner.from_pretrained(transformers.BertModel(config), _config())


# 4. and 11. One rule for --dataset and --eval: a Hub name with a slash is a Hub name; the same exit code.
@pytest.mark.parametrize("flag", ["--dataset", "--eval"])
def test_hub_dataset_names_are_not_local_paths(flag, capsys):
    assert (
        run_main("--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), flag, "allenai/c4:en")
        == 2
    )
    err = capsys.readouterr().err
    assert f"argument {flag}: Could not load the dataset 'allenai/c4:en'" in err and "no file" not in err.lower()


@pytest.mark.parametrize("flag", ["--dataset", "--eval"])
def test_same_bad_input_same_exit_code(flag, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "Once upon a time"}\n')
    assert (
        run_main("--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), flag, str(rows)) == 2
    )
    assert f"argument {flag}: {rows}: a row has no 'text' field" in capsys.readouterr().err


def test_separate_text_columns_for_dataset_and_eval(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    story = TINYSTORIES_VAL.read_text(encoding="utf-8")[:20_000]
    rows.write_text("".join(f'{{"story": {json_string(part)}}}\n' for part in story.split("\n\n")))
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL]
    assert run_main(*flags, "--eval", str(rows), "--eval-text-column", "story", "--eval-windows", "1") == 0
    assert "perplexity on rows.jsonl (1 window of 32 tokens, each after the BOS token)" in capsys.readouterr().out


def json_string(text: str) -> str:
    import json

    return json.dumps(text)


# 5. A run that fails before its first block finishes leaves nothing that blocks the corrected command.
def test_failed_run_does_not_block_the_corrected_command(tmp_path, capsys):
    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL]
    assert run_main(*flags, "--pattern", "4:8", "--output", str(output)) == 2  # 172-wide down_proj: bad input
    assert "multiple of 8" in capsys.readouterr().err
    assert not (tmp_path / "out.partial").exists()
    assert run_main(*flags, "--pattern", "2:4", "--output", str(output)) == 0


# 6. What can be checked before loading is checked before loading.
def test_push_without_a_token_fails_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", "--push-to-hub", "me/model") == 2
    assert "argument --push-to-hub: Pushing to the Hub needs a write token" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--export", "compressed"], ["--save-masks"]])
def test_unwritable_output_fails_before_loading(tmp_path, monkeypatch, capsys, extra):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    output = blocker / "pruned"
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", "--output", str(output), *extra) == 2
    err = capsys.readouterr().err
    assert "argument --output: Cannot write the output" in err and "free disk space" not in err


# 7. The dry run refuses what the real run refuses, and reads sizes in units that fit.
def test_dry_run_checks_max_memory_and_the_checkpoint(tmp_path, capsys):
    flags = ["--method", "wanda", "--dry-run", "--offload", "disk"]
    assert run_main("--model", str(STORIES_260K), *flags, "--max-memory", "cpu=1KB") == 2
    assert "max_memory allows 1000 B on cpu, smaller than one decoder block" in capsys.readouterr().err
    truncated = tmp_path / "truncated"
    shutil.copytree(STORIES_260K, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    assert run_main("--model", str(truncated), *flags) == 2
    assert f"{weights} is truncated" in capsys.readouterr().err
    data = bytearray(weights.read_bytes())
    data[:8] = (2**63).to_bytes(8, "little")  # a header length past the end of the file
    weights.write_bytes(bytes(data))
    assert run_main("--model", str(truncated), *flags) == 2
    assert f"{weights} is truncated or is not a safetensors file" in capsys.readouterr().err


# 8. Output folders are readable by others, and never replace the working directory or the input.
def test_output_folder_permissions(tmp_path):
    pruner = Pruner.from_pretrained(tiny_model("llama"), PruningConfig(method="magnitude"), progress=False)
    pruner.prune()
    umask = os.umask(0o022)
    try:
        pruner.save_pretrained(tmp_path / "out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_output_never_replaces_the_current_directory_or_the_model(saved_llama, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "here"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert run_main("--model", str(saved_llama), "--method", "magnitude", "--output", ".", "--overwrite") == 2
    assert "is the current directory" in capsys.readouterr().err and empty.is_dir()
    assert (
        run_main("--model", str(saved_llama), "--method", "magnitude", "--output", str(saved_llama), "--overwrite") == 2
    )
    assert "would replace the input" in capsys.readouterr().err
    assert (saved_llama / "model.safetensors").is_file()


# 9. Messages that fit the case.
def test_missing_model_folder_is_named(tmp_path, capsys):
    missing = tmp_path / "no-model"
    with pytest.raises(FileNotFoundError, match=f"No model folder at {missing}"):
        Pruner.from_pretrained(missing)
    assert run_main("--model", str(missing), "--method", "magnitude") == 2
    assert f"argument --model: No model folder at {missing}" in capsys.readouterr().err


def test_truncated_weights_name_the_file_and_no_unsafe_hint(tmp_path):
    folder = tmp_path / "safetensors-model"  # "safetensors" in the path once drew the allow_unsafe_weights hint
    shutil.copytree(STORIES_260K, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50_000])
    with pytest.raises(ValueError, match=f"{weights} is truncated") as error:
        Pruner.from_pretrained(folder)
    assert "allow_unsafe_weights" not in str(error.value)
    weights.unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match=r"only pickled weights \(pytorch_model.bin\).*--allow-unsafe-weights"):
        Pruner.from_pretrained(folder)


def test_tokenizer_flag_for_a_model_folder_without_one(saved_llama, tmp_path, capsys):
    flags = ["--model", str(saved_llama), "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL]
    assert run_main(*flags) == 1
    assert "pass --tokenizer PATH" in capsys.readouterr().err
    assert run_main(*flags, "--tokenizer", str(STORIES_260K), "--output", str(tmp_path / "out")) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "sparsegpt", "--dampening", "nan"], "argument --dampening: dampening must be a finite number"),
        (["--dampening", "0.1"], "argument --dampening: Method 'magnitude' has no setting dampening"),
        (["--allocation", "owl", "--owl-m", "inf"], "argument --owl-m: owl_m must be a finite number, got inf"),
        (["--private"], "argument --private: it makes the --push-to-hub repository private"),
        (["--tokenizer", "/no/such/folder"], "argument --tokenizer: no tokenizer folder at /no/such/folder"),
        (["--eval-seq-len", "2048"], "argument --eval-seq-len: 2048 tokens is longer than the model's context of 512"),
    ],
)
def test_bad_values_exit_2(flags, message, capsys):
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", *flags) == 2
    assert message in capsys.readouterr().err


# 11. Noise: a run that saves nothing says so; Ctrl-C says how to resume.
def test_a_run_without_output_says_it_saves_nothing(capsys):
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude") == 0
    assert "neither --output nor --push-to-hub was given" in capsys.readouterr().err


def test_interrupt_names_resume(saved_llama, tmp_path, monkeypatch, capsys):
    from optimum_prune.engine import blockwise

    calls = []

    def interrupt_second_block(self, index, *args):
        calls.append(index)
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, *args)

    original = blockwise.BlockwiseEngine._prune_block
    monkeypatch.setattr(blockwise.BlockwiseEngine, "_prune_block", interrupt_second_block)
    output = tmp_path / "out"
    assert run_main("--model", str(saved_llama), "--method", "magnitude", "--output", str(output)) == 130
    err = capsys.readouterr().err
    assert "interrupted; finished blocks are kept in" in err and "--resume" in err
    monkeypatch.setattr(blockwise.BlockwiseEngine, "_prune_block", original)
    assert run_main("--model", str(saved_llama), "--method", "magnitude", "--output", str(output), "--resume") == 0


def test_weights_left_dense_inside_the_blocks_are_named_and_counted(caplog):
    """Weights inside the blocks that the run leaves dense (here the fused experts, ignored on purpose, and the
    routers) are named before any work, and the report counts them."""
    model = tiny_model("qwen3_moe")
    config = PruningConfig(method="magnitude", ignore=["*.experts.*"])
    pruner = Pruner.from_pretrained(model, config, device="cpu", progress=False)
    with caplog.at_level("WARNING", logger="optimum_prune.engine.blockwise"):
        report = pruner.prune()
    assert "mlp.experts.gate_up_proj" in caplog.text and "stay dense" in caplog.text
    assert report.left_dense_parameters == 2 * (4 * 64 * 64 + 4 * 64 * 32 + 4 * 64)
    assert "left dense inside the blocks" in report.table()
    dense = tiny_model("llama")
    assert (
        Pruner.from_pretrained(dense, PruningConfig(method="magnitude"), progress=False).prune().left_dense_parameters
        == 0
    )


def test_calibration_windows_fit_the_models_context(caplog):
    """stories260K reads 512 tokens: a longer seq_len is capped at 512 with a warning (and the recipe says 512);
    a tensor of longer windows is refused before any work."""
    pruner = Pruner.from_pretrained(
        STORIES_260K, PruningConfig(method="wanda", num_samples=2, seq_len=4096), device="cpu", progress=False
    )
    pruner.prune(C4_SAMPLE)
    assert pruner.config.seq_len == 512
    assert "Calibration seq_len=4096 capped at the model's context, 512 tokens." in caplog.text
    fresh = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="wanda"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="windows of 600 tokens are longer than the model's context of 512"):
        fresh.prune(torch.zeros(2, 600, dtype=torch.long))
