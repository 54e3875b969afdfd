"""Recovery after pruning: training keeps every pruned weight exactly zero, also through LoRA, and helps."""

from __future__ import annotations

import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, TINYSTORIES_VAL, random_ids, tiny_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from optimum_prune import Pruner, PruningConfig, perplexity
from optimum_prune.core.masks import NMPattern
from optimum_prune.export.masks import Masks
from optimum_prune.recovery import RecoveryConfig, SparsityCallback, check_masks_hold
from optimum_prune.recovery.train import distillation_loss

TEXT = TINYSTORIES_VAL.read_text(encoding="utf-8")[:200_000]


def _pruned(pattern: str = "unstructured", architecture: str = "llama") -> Pruner:
    config = PruningConfig(method="magnitude", pattern=pattern, sparsity=None if pattern != "unstructured" else 0.5)
    pruner = Pruner.from_pretrained(tiny_model(architecture), config, device="cpu", progress=False)
    pruner.prune()
    return pruner


class _Windows(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        self.ids = random_ids(count, 32, seed=7)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_callback_keeps_masks_exact_through_adamw_weight_decay_and_clipping(pattern, tmp_path):
    pruner = _pruned(pattern)
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, max_grad_norm=0.5, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        logging_strategy="no",
    )  # fmt: skip
    trainer = Trainer(model=pruner.model, args=args, train_dataset=_Windows(120), callbacks=[SparsityCallback(masks)])
    before = {name: p.detach().clone() for name, p in pruner.model.named_parameters()}
    trainer.train()
    parameters = dict(pruner.model.named_parameters())
    for name, mask in masks.items():
        assert (parameters[name][mask] == 0).all(), name
        assert not torch.equal(parameters[name][~mask], before[name][~mask])  # the kept weights trained
        state = trainer.optimizer.state[parameters[name]]  # the optimizer never holds a pruned weight's update
        assert (state["exp_avg"][mask] == 0).all() and (state["exp_avg_sq"][mask] == 0).all()
    if pattern == "2:4":
        weight = parameters["model.layers.0.mlp.down_proj.weight"]
        assert ((weight.view(-1, 4) != 0).sum(1) <= 2).all() and NMPattern.parse("2:4").m == 4
    check_masks_hold(pruner.model, masks)


def test_check_masks_hold_refuses_a_resurrected_weight():
    pruner = _pruned()
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    name = next(iter(masks))
    with torch.no_grad():
        dict(pruner.model.named_parameters())[name][masks[name]] = 1.0
    with pytest.raises(RuntimeError, match="no longer zero after training"):
        check_masks_hold(pruner.model, masks)


def test_distillation_loss_is_the_kl_divergence():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    expected = torch.nn.functional.kl_div(
        student.log_softmax(-1).view(-1, 11),
        teacher.log_softmax(-1).view(-1, 11),
        log_target=True,
        reduction="batchmean",
    )
    torch.testing.assert_close(distillation_loss(student, teacher), expected)
    assert distillation_loss(teacher, teacher).abs() < 1e-6


@pytest.mark.parametrize("lora", [False, True])
def test_recover_lowers_perplexity_and_keeps_sparsity(lora, tmp_path):
    """stories260K at 50% magnitude sparsity: 30 steps of distillation from the dense model (full or LoRA with the
    masked merge) lower the perplexity a lot, and the weights stay exactly 50% sparse."""
    pruner = Pruner.from_pretrained(
        STORIES_260K, PruningConfig(method="magnitude", sparsity=0.5), device="cpu", progress=False
    )
    pruner.prune()
    zeros = sum(int((p == 0).sum()) for p in pruner.model.parameters())
    before = perplexity(pruner.model, pruner.tokenizer, TEXT, 256, 8)
    report = pruner.recover(
        TINYSTORIES_VAL, max_steps=30, batch_size=4, seq_len=256, lora=lora, learning_rate=3e-3 if lora else 1e-3,
        work_dir=tmp_path / "work",
    )  # fmt: skip
    after = perplexity(pruner.model, pruner.tokenizer, TEXT, 256, 8)
    assert after < 0.6 * before, (before, after)
    assert sum(int((p == 0).sum()) for p in pruner.model.parameters()) == zeros
    assert report.steps == 30 and report.tokens == 30 * 4 * 256 and report.final_loss < report.first_loss
    # held-out windows: before, at each checkpoint (not with LoRA's unmerged adapters) and after the (merge)
    steps = [step for step, _ in report.eval_perplexity]
    assert steps == ([0, 30] if lora else [0, 7, 14, 21, 28, 30]), steps
    assert report.eval_perplexity[-1][1] < 0.6 * report.eval_perplexity[0][1]
    assert not (tmp_path / "work" / "pruned").exists()  # saved before training, removed after
    pruner.save_pretrained(tmp_path / "out")
    from optimum_prune.export import read_metadata

    recovery = read_metadata(tmp_path / "out")["recovery"]
    assert recovery["lora"] is lora and recovery["teacher"] == str(STORIES_260K) and recovery["steps"] == 30
    card = str(pruner.model_card("me/recovered"))
    assert "## Recovery training" in card and "| training tokens | 30,720 of tinystories_val.txt |" in card
    assert "| held-out perplexity (windows of the training text) | " in card


def test_a_plain_lora_merge_would_make_the_weights_dense(tmp_path):
    """The reason for the masked merge: the same adapters merged without the masks fill the pruned entries."""
    from peft import LoraConfig, get_peft_model

    pruner = _pruned()
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    peft_model = get_peft_model(pruner.model, LoraConfig(r=4, target_modules=["down_proj"], init_lora_weights=False))
    merged = peft_model.merge_and_unload()
    weight = dict(merged.named_parameters())["model.layers.0.mlp.down_proj.weight"]
    assert (weight[masks["model.layers.0.mlp.down_proj.weight"]] != 0).any()


def test_resume_after_a_kill_gives_the_same_weights(tmp_path):
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    def run(work, callbacks=(), resume=False) -> dict:
        pruner = _pruned()
        pruner._calibration_source = (TINYSTORIES_VAL, "text", "train")
        pruner.tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(STORIES_260K)
        import optimum_prune.recovery.train as train

        original = train._RecoveryTrainer.__init__

        def with_callbacks(self, *args, **kwargs):
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), *callbacks]
            original(self, *args, **kwargs)

        train._RecoveryTrainer.__init__ = with_callbacks
        try:
            report = pruner.recover(max_steps=8, batch_size=2, seq_len=32, distill=False, work_dir=work, resume=resume)
        finally:
            train._RecoveryTrainer.__init__ = original
        return {name: p.detach().clone() for name, p in pruner.model.named_parameters()}, report.eval_perplexity

    expected, curve = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", callbacks=[Kill()])
    assert (tmp_path / "killed" / "checkpoint-4").is_dir()
    resumed, resumed_curve = run(tmp_path / "killed", resume=True)
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    assert [step for step, _ in curve] == [0, 2, 4, 6, 8] and resumed_curve == curve  # the points before the kill too


def test_structured_outputs_are_fine_tuned_without_masks(tmp_path):
    config = PruningConfig(method="wanda", structure={"mlp": 0.5}, num_samples=4, seq_len=32, batch_size=4)
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    pruner.prune(C4_SAMPLE)
    before = perplexity(pruner.model, pruner.tokenizer, TEXT, 256, 4)
    pruner.recover(TINYSTORIES_VAL, max_steps=10, batch_size=4, seq_len=128, learning_rate=1e-3, work_dir=tmp_path)
    assert pruner.model.config.intermediate_size == 96
    assert perplexity(pruner.model, pruner.tokenizer, TEXT, 256, 4) < before


def test_bad_recovery_input_is_refused(tmp_path):
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude"), device="cpu", progress=False)
    with pytest.raises(RuntimeError, match="call prune"):
        pruner.recover(TINYSTORIES_VAL, max_steps=2)
    pruner.prune()
    with pytest.raises(ValueError, match="too small for 1000 steps"):
        pruner.recover(["Once upon a time there was a cat."], max_steps=1000, seq_len=64, work_dir=tmp_path)
    with pytest.raises(ValueError, match="positive integer"):
        RecoveryConfig(max_steps=0)
    with pytest.raises(ValueError, match="longer than the model's context of 512 tokens"):
        pruner.recover(TINYSTORIES_VAL, max_steps=2, seq_len=4096, work_dir=tmp_path)
    with pytest.raises(ValueError, match="pass the work_dir= of the run"):
        pruner.recover(TINYSTORIES_VAL, max_steps=2, resume=True)
    gpt2 = _pruned(architecture="gpt2")
    gpt2.tokenizer = pruner.tokenizer
    with pytest.raises(ValueError, match="LoRA needs nn.Linear target layers"):
        gpt2.recover(TINYSTORIES_VAL, max_steps=2, seq_len=32, lora=True, distill=False, work_dir=tmp_path / "g")
    in_memory = _pruned()
    in_memory.tokenizer = pruner.tokenizer
    with pytest.raises(ValueError, match="Distillation needs the dense model: pass teacher="):
        in_memory.recover(TINYSTORIES_VAL, max_steps=2, seq_len=32, work_dir=tmp_path / "m")
    nothing = Pruner.from_pretrained(
        tiny_model("llama"), PruningConfig(method="magnitude", sparsity=0.0), progress=False
    )
    nothing.prune()
    nothing.masks = {}
    with pytest.raises(ValueError, match="no pruning masks"):
        nothing.recover(TINYSTORIES_VAL, max_steps=2)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--recover-lr", "1e-3"], "argument --recover-lr: it sets up recovery training; add --recover-steps N."),
        (["--recover-steps", "0"], "argument --recover-steps: must be a positive integer"),
        (["--recover-steps", "5", "--recover-eval-windows", "-1"], "argument --recover-eval-windows: must be 0 or"),
        (["--recover-steps", "5", "--offload", "disk"], "argument --recover-steps: training needs the model in memory"),
        (["--recover-steps", "5"], "argument --recover-steps: recovery needs training text"),
        (
            ["--recover-steps", "5", "--recover-lora", "--recover-schedule", "gradual"],
            "argument --recover-lora: gradual",
        ),
        (
            ["--recover-steps", "5", "--recover-schedule", "gradual", "--structure", "mlp=0.25", "--sparsity", "0.3"],
            "argument --recover-schedule: Gradual pruning reaches a structure or a sparsity, not both",
        ),
    ],
)
def test_cli_recovery_flags_are_checked_before_loading(flags, message, capsys):
    from test_cli import run_main

    assert run_main("--model", str(STORIES_260K), "--method", "magnitude", *flags) == 2
    assert message in capsys.readouterr().err


def test_cli_recovers_after_pruning(tmp_path, capsys):
    from test_cli import run_main

    flags = ["--model", str(STORIES_260K), "--method", "magnitude", "--output", str(tmp_path / "out")]
    assert (
        run_main(*flags, "--recover-steps", "4", "--recover-dataset", str(TINYSTORIES_VAL), "--recover-seq-len", "64")
        == 0
    )
    out = capsys.readouterr().out
    assert "recovery: 4 steps, 1,024 tokens of tinystories_val.txt" in out
    assert "held-out perplexity (8 windows of the training text): step 0: " in out and "step 4: " in out
    assert "{'loss'" not in out and "train_runtime" not in out  # the bar shows the loss; no printed dictionaries
    assert not (tmp_path / "out.recover").exists()  # the copy kept in case training failed is gone
    assert not list((tmp_path / "out.recover").glob("checkpoint-*"))
    from optimum_prune.export import read_metadata

    assert read_metadata(tmp_path / "out")["recovery"]["steps"] == 4


def test_one_command_from_a_dense_model_to_a_smaller_recovered_one(tmp_path, capsys):
    """``--structure params=0.7 --recover-steps N``: the searched mix, then distillation from the dense model; the
    output holds the smaller model, the curve in its metadata and ``recovery.png``, which the card shows."""
    from test_cli import run_main

    from optimum_prune.export import read_metadata
    from optimum_prune.hub.model_card import _recovery_section

    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "sparsegpt", "--structure", "params=0.7", "--dataset"]
    flags += [str(C4_SAMPLE), "--num-samples", "16", "--seq-len", "64", "--output", str(output)]
    flags += ["--recover-steps", "4", "--recover-dataset", str(TINYSTORIES_VAL), "--recover-seq-len", "64"]
    assert run_main(*flags) == 0
    out = capsys.readouterr().out
    assert "budget params=0.7: chose" in out and "distillation (KL to the dense model)" in out
    metadata = read_metadata(output)
    assert metadata["structure"]["parameters"]["kept"] <= 0.7 * metadata["structure"]["parameters"]["original"]
    assert [step for step, _ in metadata["recovery"]["eval_perplexity"]] == [0, 1, 2, 3, 4]
    assert (output / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = _recovery_section(metadata["recovery"], "recovery.png")  # the card's, as push_to_hub writes it
    assert "![Held-out perplexity against training tokens](recovery.png)" in section


def test_cubic_schedule():
    from optimum_prune.recovery.gradual import cubic_sparsity

    assert cubic_sparsity(0, 10, 0.5) == 0.0 and cubic_sparsity(10, 10, 0.5) == cubic_sparsity(20, 10, 0.5) == 0.5
    assert cubic_sparsity(5, 10, 0.5) == pytest.approx(0.5 * (1 - 0.5**3))


def test_structured_pruning_while_training_masks_units_then_removes_them(tmp_path, monkeypatch):
    """MLP channels and KV groups masked along the schedule (only ever more of them), then removed: removal
    changes no output, and the smaller model has the config's new sizes and loads with stock transformers."""
    import optimum_prune.recovery.gradual_structure as gradual

    masked, before = [], {}
    on_step_end, shrink_group = gradual.GradualStructureCallback.on_step_end, gradual.shrink_group

    def record(self, args, state, control, **kwargs):
        on_step_end(self, args, state, control, **kwargs)
        masked.append([int(removed.sum()) for removed in self.removed])

    def shrink_after_logits(group, kept, consumer=None):
        if not before:
            with torch.no_grad():
                before["logits"] = pruner.model(ids).logits
        shrink_group(group, kept, consumer)

    monkeypatch.setattr(gradual.GradualStructureCallback, "on_step_end", record)
    monkeypatch.setattr(gradual, "shrink_group", shrink_after_logits)
    config = PruningConfig(method="magnitude", structure={"mlp": 0.25, "attention": 0.5})
    pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    ids = random_ids(2, 16, seed=3, vocab=512)
    report = pruner.prune_while_training(
        TINYSTORIES_VAL, max_steps=12, interval=3, batch_size=2, seq_len=64, learning_rate=1e-3, work_dir=tmp_path
    )
    totals = [sum(step) for step in masked]
    assert totals == sorted(totals) and totals[0] < totals[len(totals) // 2] < totals[-1]
    assert masked[-1] == [172 - 128, 2] * 5  # every block: 44 channels and 2 of 4 KV groups
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(ids).logits, before["logits"], rtol=1e-5, atol=1e-5)
    assert (pruner.model.config.intermediate_size, pruner.model.config.num_key_value_heads) == (128, 2)
    assert report.structure["mlp"] == {"original": 172, "kept": 128}
    pruner.save_pretrained(tmp_path / "out")
    reloaded = __import__("transformers").AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before["logits"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="blocks and experts are removed one-shot"):
        Pruner.from_pretrained(
            STORIES_260K, PruningConfig(method="magnitude", structure={"layers": 0.2}), progress=False
        ).prune_while_training(TINYSTORIES_VAL, max_steps=2, seq_len=64, work_dir=tmp_path / "b")


def test_pruning_while_training_reaches_the_target_with_growing_masks(tmp_path):
    """Gradual pruning: masks only grow, every target layer ends exactly at the target sparsity, the zeros hold
    through the steps after the schedule, and the metadata records it."""
    import optimum_prune.recovery.gradual as gradual

    seen = []
    original = gradual.GradualPruningCallback.on_step_end

    def record(self, args, state, control, **kwargs):
        original(self, args, state, control, **kwargs)
        seen.append({name: mask.clone() for name, mask in self.masks.items()})

    gradual.GradualPruningCallback.on_step_end = record
    try:
        pruner = Pruner.from_pretrained(
            STORIES_260K, PruningConfig(method="wanda", sparsity=0.6), device="cpu", progress=False
        )
        report = pruner.prune_while_training(
            TINYSTORIES_VAL, max_steps=12, interval=3, batch_size=2, seq_len=64, learning_rate=1e-3, work_dir=tmp_path
        )
    finally:
        gradual.GradualPruningCallback.on_step_end = original
    sparsities = [sum(int(m.sum()) for m in step.values()) for step in seen]
    assert sparsities == sorted(sparsities) and sparsities[0] < sparsities[-1]
    assert all(
        (later | earlier).equal(later) for earlier, later in zip(seen[0].values(), seen[-1].values(), strict=True)
    )
    assert all(layer.sparsity == pytest.approx(0.6, abs=1e-3) for layer in report.layers)
    masks = Masks.from_pruner(pruner.model, pruner.masks)
    check_masks_hold(pruner.model, masks)
    pruner.save_pretrained(tmp_path / "out")
    from optimum_prune.export import read_metadata

    assert read_metadata(tmp_path / "out")["recovery"]["steps"] == 12
    with pytest.raises(ValueError, match="unstructured, uniform sparsity"):
        Pruner.from_pretrained(
            STORIES_260K, PruningConfig(method="wanda", pattern="2:4"), progress=False
        ).prune_while_training(TINYSTORIES_VAL, max_steps=2)


class _KillAfterStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    "recipe", [{"sparsity": 0.6}, {"structure": {"mlp": 0.25, "attention": 0.5}}], ids=["unstructured", "structured"]
)
def test_pruning_while_training_resumes_after_a_kill(recipe, tmp_path):
    """Killed after its checkpoint at step 4 (saliency gathered since the masks grew at step 3) and resumed,
    gradual pruning ends with the same weights as a run never stopped: the masks and saliency were saved."""

    def run(work, callbacks=(), resume=False) -> dict:
        config = PruningConfig(method="magnitude", **recipe)
        pruner = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
        pruner.prune_while_training(
            TINYSTORIES_VAL, max_steps=8, interval=3, batch_size=2, seq_len=32, learning_rate=1e-3, distill=False,
            eval_windows=0, work_dir=work, resume=resume, callbacks=callbacks,
        )  # fmt: skip
        return {name: p.detach().clone() for name, p in pruner.model.named_parameters()}

    expected = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", callbacks=[_KillAfterStep(5)])
    assert (tmp_path / "killed" / "checkpoint-4" / "gradual_state.safetensors").is_file()
    resumed = run(tmp_path / "killed", resume=True)
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass the work_dir= of the run"):
        Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude", **recipe)).prune_while_training(
            TINYSTORIES_VAL, max_steps=2, resume=True
        )


RESUMED_RECIPES = {  # the pruning flags of each schedule whose training the CLI resumes
    "gradual": ("--method", "magnitude", "--sparsity", "0.5", "--recover-schedule", "gradual", "--recover-loss", "lm"),
    "one-shot budget, distilled": (
        "--method",
        "sparsegpt",
        "--structure",
        "params=0.7",
        "--dataset",
        str(C4_SAMPLE),
        "--num-samples",
        "16",
        "--seq-len",
        "32",
    ),  # fmt: skip
}


@pytest.mark.parametrize("recipe", list(RESUMED_RECIPES))
def test_cli_resumes_training(recipe, tmp_path, capsys, monkeypatch):
    """Ctrl-C during training (gradual pruning's, or distillation after a searched budget) names --resume; a rerun
    without it is refused (nothing is overwritten); with it, the saved model equals that of a run never
    stopped."""
    from safetensors.torch import load_file
    from test_cli import run_main

    import optimum_prune.recovery.train as train

    def command(output):
        return (
            "--model", str(STORIES_260K), *RESUMED_RECIPES[recipe], "--output", str(output),
            "--recover-steps", "8", "--recover-dataset", str(TINYSTORIES_VAL),
            "--recover-seq-len", "32", "--recover-batch-size", "2", "--recover-eval-windows", "0",
        )  # fmt: skip

    assert run_main(*command(tmp_path / "straight")) == 0
    original = train._RecoveryTrainer.__init__

    def with_kill(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "callbacks": [*kwargs["callbacks"], _KillAfterStep(5)]})

    monkeypatch.setattr(train._RecoveryTrainer, "__init__", with_kill)
    assert run_main(*command(tmp_path / "out")) == 130
    assert "training checkpoints are kept in" in capsys.readouterr().err
    monkeypatch.setattr(train._RecoveryTrainer, "__init__", original)
    assert run_main(*command(tmp_path / "out")) == 2
    assert "holds the checkpoints of an unfinished training run: add --resume" in capsys.readouterr().err
    assert run_main(*command(tmp_path / "out"), "--resume") == 0
    assert not (tmp_path / "out.recover").exists()  # nothing left that the next run would meet
    expected = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "out" / "model.safetensors")
    assert resumed.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
