"""Zero-shot evaluation through lm-evaluation-harness: the shipped local HellaSwag task scores as the harness's
hellaswag does (checked against a direct computation), results reach the report, metadata and card, and bad
input is named before any long work."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import ASSETS, STORIES_260K, TINYSTORIES_VAL
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_prune import Pruner, PruningConfig, ZeroShotTasks
from optimum_prune.cli.main import main
from optimum_prune.evaluation.harness import hellaswag_jsonl
from optimum_prune.export import METADATA_KEY

HELLASWAG = ASSETS / "data" / "hellaswag" / "hellaswag_val_first1000.jsonl"
HELLASWAG_TEXT = ASSETS / "data" / "hellaswag" / "hellaswag_val_full.txt.bz2"
LIMIT = 24


@pytest.fixture(scope="module")
def tasks() -> ZeroShotTasks:
    return ZeroShotTasks(["hellaswag_local"], task_data={"hellaswag_local": HELLASWAG}, limit=LIMIT)


@torch.no_grad()
def direct_scores(model, tokenizer, items: list[dict]) -> tuple[float, float]:
    """HellaSwag's scoring written out: the log-likelihood of each ending after the context (the tokens the
    ending adds to the tokenized context), acc = argmax, acc_norm = argmax per character of the ending."""
    right = right_norm = 0
    for item in items:
        context = tokenizer.encode(item["ctx"])
        scores = []
        for ending in item["endings"]:
            whole = tokenizer.encode(item["ctx"] + " " + ending)
            logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            scores.append(sum(logits[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
        right += max(range(4), key=scores.__getitem__) == item["label"]
        right_norm += max(range(4), key=lambda i: scores[i] / len(item["endings"][i])) == item["label"]
    return right / len(items), right_norm / len(items)


def test_local_hellaswag_scores_as_a_direct_computation(tasks):
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES_260K)
    scores = {score.metric: score for score in tasks.evaluate(model, tokenizer, batch_size=4)}
    items = [json.loads(line) for line in HELLASWAG.read_text(encoding="utf-8").splitlines()[:LIMIT]]
    acc, acc_norm = direct_scores(model, tokenizer, items)
    assert scores["acc"].value == pytest.approx(acc) and scores["acc_norm"].value == pytest.approx(acc_norm)
    assert scores["acc"].samples == LIMIT and scores["acc"].stderr > 0


def test_llamacpp_hellaswag_text_reads_as_the_jsonl(tmp_path):
    converted = hellaswag_jsonl(HELLASWAG_TEXT, tmp_path).read_text(encoding="utf-8").splitlines()
    assert len(converted) == 10042
    assert [json.loads(line) for line in converted[:1000]] == [
        json.loads(line) for line in HELLASWAG.read_text(encoding="utf-8").splitlines()
    ]


def test_scores_reach_report_metadata_plot_and_card(tasks, tmp_path):
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude", sparsity=0.6), progress=False)
    dense = tasks.evaluate(pruner.model, pruner.tokenizer)
    pruner.prune()
    rows = pruner.evaluate_tasks(tasks, dense)
    assert {row["metric"] for row in rows} == {"acc", "acc_norm"}
    assert all(row["dense_value"] == next(s.value for s in dense if s.metric == row["metric"]) for row in rows)
    assert "hellaswag_local          acc" in pruner.report.table()
    pruner.save_pretrained(tmp_path / "pruned")
    metadata = json.loads((tmp_path / "pruned" / "config.json").read_text())[METADATA_KEY]
    assert metadata["zero_shot"]["rows"] == rows and metadata["zero_shot"]["limit"] == LIMIT
    assert (tmp_path / "pruned" / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = ModelCard(str(pruner.model_card("user/stories-pruned", plot="sparsity.png")))
    results = {(r.dataset_type, r.metric_type, r.metric_name): r.metric_value for r in card.data.eval_results}
    for row in rows:
        assert results[("hellaswag_local", row["metric"], f"{row['metric']} (pruned)")] == row["pruned_value"]
        assert results[("hellaswag_local", row["metric"], f"{row['metric']} (dense base model)")] == row["dense_value"]
    assert "![Achieved sparsity per block and layer kind](sparsity.png)" in card.text
    assert "## Zero-shot tasks" in card.text


def test_bad_task_input_is_named(monkeypatch):
    with pytest.raises(ValueError, match="Unknown lm-eval task 'hellaswagg'; close matches: hellaswag"):
        ZeroShotTasks(["hellaswagg"])
    with pytest.raises(ValueError, match="'hellaswag' cannot load its data .* hellaswag_local"):
        ZeroShotTasks(["hellaswag"])  # the Hub's copy, offline
    with pytest.raises(ValueError, match=r"reads a local file: pass task_data=\{'hellaswag_local': PATH\}"):
        ZeroShotTasks(["hellaswag_local"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r'pip install "optimum-prune\[eval\]"'):
        ZeroShotTasks(["hellaswag_local"], task_data={"hellaswag_local": HELLASWAG})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval-limit", "10"], "argument --eval-limit: it sets up zero-shot tasks; add --eval-tasks"),
        (["--eval-tasks", "hellaswag_local"], "argument --eval-tasks: Task 'hellaswag_local' reads a local file"),
        (["--eval-tasks", "hellaswag_local", "--eval-task-data", "hellaswag_local"], "cannot read 'hellaswag_local'"),
    ],
)
def test_cli_task_flags_are_checked_before_loading(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(STORIES_260K), "--method", "magnitude", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_prints_dense_beside_pruned(tmp_path, capsys):
    from test_cli import run_main

    code = run_main(
        "--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(TINYSTORIES_VAL), "--num-samples", "4",
        "--seq-len", "64", "--eval-tasks", "hellaswag_local", "--eval-task-data", f"hellaswag_local={HELLASWAG}",
        "--eval-limit", "8", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "task                     metric                dense           pruned    delta" in out
    assert "hellaswag_local          acc_norm" in out
