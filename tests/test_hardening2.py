"""What a demanding new user hit in structured pruning, recovery, evaluation, torchrun and the API (issue 25):
each case here failed before it was fixed."""

from __future__ import annotations

import json
import logging
import socket

import huggingface_hub
import pytest
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_VAL, tiny_model
from test_cli import run_main
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.errors import InputError
from optimum_prune.recovery.gradual import record_schedule, schedule_settings
from optimum_prune.recovery.train import TrainingDiverged

SMALL = ["--num-samples", "4", "--seq-len", "32", "--batch-size", "4"]


def _no_loading(monkeypatch):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture
def unreachable_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_optimumPruneTestToken0123456789xyz")


# 1. Lost work: a push that fails keeps the pruned model; the CLI checks the Hub answers before any work.
def test_a_failed_push_keeps_the_model_and_says_how_to_push_it(unreachable_hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    with pytest.raises(RuntimeError, match=r"kept in .*me--stories\.unpushed: push that folder again") as error:
        pruner.push_to_hub("me/stories")
    assert "hf_optimumPrune" not in str(error.value)
    kept = tmp_path / "me--stories.unpushed"
    assert {"config.json", "model.safetensors", "README.md", "pruning_config.json"} <= {p.name for p in kept.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(kept) is not None


def test_cli_push_to_an_unreachable_hub_fails_before_loading(unreachable_hub, monkeypatch, capsys):
    _no_loading(monkeypatch)
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", "--push-to-hub", "me/model") == 2
    err = capsys.readouterr().err
    assert "argument --push-to-hub: cannot use the Hub at http://127.0.0.1:" in err and "hf upload" in err


# 2. Silent wrong results.
def test_a_model_with_peft_adapters_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for build in (lambda: Pruner(model, PruningConfig()), lambda: Pruner.from_pretrained(model, PruningConfig())):
        with pytest.raises(InputError, match=r"PEFT adapters .*merge_and_unload"):
            build()


def test_pruning_a_sparser_model_reports_the_zeros_in_its_weights(caplog):
    model = tiny_model("llama")
    Pruner(model, PruningConfig(method="magnitude", sparsity=0.7), progress=False, device="cpu").prune()
    with caplog.at_level(logging.WARNING):
        report = Pruner(model, PruningConfig(method="magnitude", sparsity=0.5), progress=False, device="cpu").prune()
    assert report.global_sparsity == pytest.approx(0.7, abs=1e-3)
    assert "hold more zeros than the 50.0% asked" in caplog.text


def test_gradual_pruning_refuses_to_resume_another_schedule(tmp_path, monkeypatch, capsys):
    config = PruningConfig(method="magnitude", sparsity=0.5)
    record_schedule(tmp_path / "work", schedule_settings(PruningConfig(method="magnitude", sparsity=0.3), 8, None))
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    with pytest.raises(InputError, match=r"started with sparsity=0.3, this run asks for sparsity=0.5"):
        pruner.prune_while_training(TINYSTORIES_VAL, max_steps=8, work_dir=tmp_path / "work", resume=True)
    output = tmp_path / "out"
    record_schedule(
        tmp_path / "out.recover", schedule_settings(PruningConfig(method="magnitude", sparsity=0.3), 8, None)
    )
    _no_loading(monkeypatch)
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--sparsity", "0.5", "--output", str(output)]
    flags += ["--recover-steps", "8", "--recover-schedule", "gradual", "--recover-dataset", str(TINYSTORIES_VAL)]
    assert run_main(*flags, "--resume") == 2
    assert "argument --resume: Cannot resume the gradual pruning" in capsys.readouterr().err


def test_training_that_diverges_says_so_and_keeps_the_pruned_model(tmp_path):
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    with pytest.raises(TrainingDiverged, match=r"diverged .* at learning rate 1e\+08: lower it") as error:
        pruner.recover(TINYSTORIES_VAL, max_steps=4, seq_len=32, learning_rate=1e8, distill=False, work_dir=tmp_path)
    assert f"kept in {tmp_path / 'pruned'}" in str(error.value)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pruned") is not None


def test_training_that_does_not_help_warns(tmp_path, caplog):
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    with caplog.at_level(logging.WARNING):
        pruner.recover(TINYSTORIES_VAL, max_steps=2, seq_len=32, learning_rate=1e-12, distill=False)
    assert "Recovery did not lower the held-out perplexity" in caplog.text
    assert "raise --recover-lr or --recover-steps" in caplog.text


def test_zero_shot_scores_reach_the_folder_written_while_pruning(tmp_path, capsys):
    from test_zero_shot import HELLASWAG

    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--output", str(output)]
    flags += ["--eval-tasks", "hellaswag_local", "--eval-task-data", f"hellaswag_local={HELLASWAG}"]
    assert run_main(*flags, "--eval-limit", "4") == 0
    metadata = json.loads((output / "config.json").read_text())["optimum_prune"]
    assert metadata["zero_shot"]["rows"][0]["task"] == "hellaswag_local"


# 4. Recovery settings are checked before the model is loaded.
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recover-seq-len", "1"], "argument --recover-seq-len: recovery seq_len must be an integer >= 2"),
        (["--recover-seq-len", "4096"], "argument --recover-seq-len: 4096 tokens is longer than the model's context"),
        (["--recover-lr", "0"], "argument --recover-lr: recovery learning_rate must be a positive number"),
        (
            ["--recover-steps", "10000"],
            "argument --recover-dataset: The recovery data 'tinystories_val.txt' is too small",
        ),
    ],
)
def test_recovery_settings_are_refused_before_loading(flags, message, monkeypatch, capsys):
    _no_loading(monkeypatch)
    base = ["--model", str(STORIES_260K), "--method", "magnitude", "--recover-dataset", str(TINYSTORIES_VAL)]
    steps = [] if "--recover-steps" in flags else ["--recover-steps", "4"]
    assert run_main(*base, *steps, *flags) == 2
    assert message in capsys.readouterr().err


def test_lora_on_fused_experts_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "moe"
    tiny_model("qwen3_moe").save_pretrained(folder)
    _no_loading(monkeypatch)
    flags = ["--model", str(folder), "--method", "magnitude", "--recover-steps", "2", "--recover-lora"]
    assert run_main(*flags, "--recover-dataset", str(TINYSTORIES_VAL), "--tokenizer", str(STORIES_260K)) == 2
    assert "argument --recover-lora: LoRA adapts nn.Linear layers" in capsys.readouterr().err


# 8 and 9. Refused combinations exit 2 before loading; a resume checks what it resumes.
def test_disk_offload_with_a_structure_and_a_sparsity_exits_2_before_loading(tmp_path, monkeypatch, capsys):
    _no_loading(monkeypatch)
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--offload", "disk"]
    assert run_main(*flags, "--structure", "mlp=0.25", "--sparsity", "0.5", "--output", str(tmp_path / "o")) == 2
    assert "argument --offload: with disk offload, a structure and unstructured sparsity are two runs" in (
        capsys.readouterr().err
    )


def test_resume_with_other_settings_or_processes_exits_2_before_loading(tmp_path, monkeypatch, capsys):
    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), *SMALL]
    flags += ["--output", str(output), "--offload", "disk"]
    from conftest import killed_at_block

    from optimum_prune.engine.work_folder import WorkFolder

    with killed_at_block(WorkFolder, "save_block", 2):
        assert run_main(*flags, "--structure", "mlp=0.25") == 130
    with killed_at_block(WorkFolder, "save_block", 2):
        assert run_main(*flags, "--output", str(tmp_path / "plain")) == 130
    _no_loading(monkeypatch)
    assert run_main(*flags, "--structure", "mlp=0.5", "--resume") == 2
    assert "was started with a different structure" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run_main(*flags, "--output", str(tmp_path / "plain"), "--resume") == 2
    assert "was started by 1 process(es), this run has 2" in capsys.readouterr().err


def test_a_finished_recovery_leaves_no_copy_of_the_model(tmp_path):
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    pruner.prune()
    pruner.recover(TINYSTORIES_VAL, max_steps=2, seq_len=32, distill=False, work_dir=tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_the_default_learning_rate_follows_the_model_size():
    from optimum_prune.recovery.train import default_learning_rate

    assert default_learning_rate(260_000, lora=False) == 1e-3
    assert default_learning_rate(135_000_000, lora=False) == pytest.approx(8.6e-5, rel=0.01)
    assert default_learning_rate(7_000_000_000, lora=False) == pytest.approx(1.2e-5, rel=0.02)
    assert default_learning_rate(7_000_000_000, lora=True) == pytest.approx(1.2e-4, rel=0.02)
    assert default_learning_rate(260_000, lora=True) == 2e-3


def test_default_recovery_lowers_held_out_perplexity(tmp_path):
    pruner = Pruner.from_pretrained(
        STORIES_260K, PruningConfig(method="sparsegpt", num_samples=8, seq_len=64), device="cpu", progress=False
    )
    pruner.prune(C4_SAMPLE)
    report = pruner.recover(TINYSTORIES_VAL, max_steps=20, seq_len=64)
    (_, before), (_, after) = report.eval_perplexity[0], report.eval_perplexity[-1]
    assert after < 0.97 * before, report.eval_perplexity
    assert report.learning_rate == 1e-3


# 3. Gradual pruning that ends far above the dense model says so.
def test_gradual_pruning_over_too_few_steps_warns(tmp_path, caplog):
    pruner = Pruner.from_pretrained(
        STORIES_260K, PruningConfig(method="magnitude", sparsity=0.8), device="cpu", progress=False
    )
    with caplog.at_level(logging.WARNING):
        pruner.prune_while_training(TINYSTORIES_VAL, max_steps=4, seq_len=32, distill=False, learning_rate=1e-4)
    assert "Pruning while training ended at" in caplog.text and "--recover-schedule one-shot" in caplog.text


# 5. The dry run counts recovery training.
def test_dry_run_estimates_recovery_training(capsys):
    flags = ["--model", str(STORIES_260K), "--method", "sparsegpt", "--dataset", str(C4_SAMPLE), "--dry-run"]
    assert run_main(*flags, "--recover-steps", "40", "--recover-seq-len", "256") == 0
    out = capsys.readouterr().out
    assert "recovery training: 40,960 tokens, peak memory about" in out and " min" in out


# 6. One rule for flags that refine another; duplicated keys; an empty task list.
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval-windows", "3"], "argument --eval-windows: it sets up the perplexity evaluation; add --eval TEXT."),
        (["--eval-text-column", "body"], "argument --eval-text-column: it sets up the perplexity evaluation"),
        (["--eval-batch-size", "2"], "argument --eval-batch-size: it sets up zero-shot tasks"),
        (["--recover-batch-size", "2"], "argument --recover-batch-size: it sets up recovery training"),
        (["--overwrite"], "argument --overwrite: it lets --output replace a non-empty folder; add --output DIR."),
        (["--structure", "mlp=0.2", "mlp=0.3"], "argument --structure: mlp is given twice"),
        (["--eval-tasks", ""], "argument --eval-tasks: names no task"),
        (["--eval-tasks", " , "], "argument --eval-tasks: names no task"),
    ],
)
def test_ignored_input_is_refused(flags, message, monkeypatch, capsys):
    _no_loading(monkeypatch)
    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", *flags) == 2
    assert message in capsys.readouterr().err


# 7. Messages that point the right way, and every unusable file named with what was expected.
def test_structure_messages_point_the_right_way(tmp_path, monkeypatch, capsys):
    single = tmp_path / "mqa"
    model = tiny_model("llama")
    model.config.num_key_value_heads = 1
    AutoModelForCausalLM.from_config(model.config).save_pretrained(single)
    _no_loading(monkeypatch)
    flags = ["--method", "wanda", "--dataset", str(C4_SAMPLE)]
    assert run_main("--model", str(single), *flags, "--structure", "attention=0.5") == 2
    err = capsys.readouterr().err
    assert "a single one (multi-query attention)" in err and "attention=1.000" not in err
    assert run_main("--model", str(STORIES_260K), *flags, "--structure", "attention=0.5", "--ignore", "o_proj") == 2
    assert "targets/ignore leave out model.layers.0.self_attn.o_proj" in capsys.readouterr().err


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 20)
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": broken\n')
    (tmp_path / "columns.jsonl").write_text('{"content": "hello"}\n')
    (tmp_path / "bad.parquet").write_text("not parquet")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("binary.txt", "binary.txt is not UTF-8 text (byte 0 cannot be decoded: a binary file?): expected plain"),
        ("broken.jsonl", "broken.jsonl: line 2 is not valid JSON (Expecting value): expected one JSON object"),
        ("columns.jsonl", "columns.jsonl: a row has no 'text' field (its fields: content)"),
        ("bad.parquet", "bad.parquet cannot be read as Parquet"),
    ],
)
@pytest.mark.parametrize("flag", ["--dataset", "--eval", "--recover-dataset"])
def test_unreadable_text_files_are_named_with_what_was_expected(bad_files, name, message, flag, monkeypatch, capsys):
    _no_loading(monkeypatch)
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", flag, str(bad_files / name)]
    if flag == "--recover-dataset":
        flags += ["--recover-steps", "2"]
    assert run_main(*flags) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and message in err


def test_broken_task_yaml_and_task_data_are_named(tmp_path, monkeypatch, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\n  bad: [yaml\n")
    (tmp_path / "hs.jsonl").write_text('{"ctx": "a", "endings": ["b"], "label": 0}\n')
    _no_loading(monkeypatch)
    flags = ["--model", str(STORIES_260K), "--method", "magnitude"]
    assert run_main(*flags, "--eval-tasks", "mine", "--eval-include", str(tasks)) == 2
    assert (
        "argument --eval-include: " in (err := capsys.readouterr().err)
        and "mine.yaml is not a valid lm-eval task" in err
    )
    data = f"hellaswag_local={tmp_path / 'hs.jsonl'}"
    assert run_main(*flags, "--eval-tasks", "hellaswag_local", "--eval-task-data", data) == 2
    err = capsys.readouterr().err
    assert "argument --eval-task-data: " in err and "line 1 is not a HellaSwag item: expected one JSON object" in err


# 10. No noise from the libraries underneath.
def test_no_library_noise_on_save_export_and_tasks(tmp_path, capfd, monkeypatch):
    from test_zero_shot import HELLASWAG

    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's git probe would print "fatal"
    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--output", str(tmp_path / "out")]
    flags += ["--export", "onnx", "--eval-tasks", "hellaswag_local", "--eval-limit", "2"]
    capfd.readouterr()
    assert run_main(*flags, "--eval-task-data", f"hellaswag_local={HELLASWAG}") == 0
    captured = capfd.readouterr()
    noise = captured.out + captured.err
    for text in ("fatal: not a git repository", "are deprecated. Use `cache` instead", "Writing model shards"):
        assert text not in noise, text
