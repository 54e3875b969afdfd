"""Recovery after pruning: fine-tune (fully or with LoRA) with transformers' Trainer, distilling from the dense
model by default, while `SparsityCallback` keeps every pruned weight exactly zero.

LoRA adapters are merged through the masks, ``W + (B A) * keep``, so the merged model keeps its sparsity exactly
(a plain merge would make every weight dense again); structured outputs have no masks and are fine-tuned as the
smaller dense models they are.

A few windows of the training text (``eval_windows``, drawn with the training windows and never trained on) give
the held-out perplexity before training, at every checkpoint and after training (after the merge, with LoRA,
whose unmerged adapters are dense and are not evaluated along the way).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..calibration import calibration_ids, load_texts
from ..core.layers import outside_language_model
from ..errors import InputError
from ..evaluation.perplexity import windows_perplexity
from .callback import SparsityCallback, check_masks_hold

logger = logging.getLogger(__name__)

KL_CHUNK_TOKENS = 1024  # the KL divergence is computed this many positions at a time: bounded extra memory


@dataclass
class RecoveryConfig:
    """How to train after pruning.

    Args:
        max_steps: optimizer steps.
        learning_rate: peak learning rate, constant after a 10% warm-up; default `default_learning_rate` of the
            model's size (1e-3 for a few million parameters, about 1e-4 at 135M, 1.2e-5 at 7B; ten times that with
            LoRA, at most 2e-3).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        distill: KL divergence to the dense teacher's next-token distribution (the default); ``False``: the
            plain language-model loss.
        lora: train LoRA adapters on the pruned layers instead of every weight, merged through the masks.
        lora_rank: the adapters' rank.
        seed: seed of the training windows and of the Trainer.
        eval_windows: held-out windows of the training text whose perplexity is measured along the way (0: none).
    """

    max_steps: int
    learning_rate: float | None = None
    batch_size: int = 4
    seq_len: int = 512
    distill: bool = True
    lora: bool = False
    lora_rank: int = 16
    seed: int = 0
    eval_windows: int = 8

    def __post_init__(self) -> None:
        for name, least in (("max_steps", 1), ("batch_size", 1), ("seq_len", 2), ("lora_rank", 1), ("eval_windows", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = {0: "a non-negative integer", 1: "a positive integer"}.get(least, f"an integer >= {least}")
                why = " (a token and the next one to predict)" if name == "seq_len" else ""
                raise InputError(f"recovery {name} must be {kind}{why}, got {value!r}.")
        if self.learning_rate is not None and (
            not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate))
            or self.learning_rate <= 0
        ):
            raise InputError(f"recovery learning_rate must be a positive number, got {self.learning_rate!r}.")


def default_learning_rate(parameters: int, lora: bool) -> float:
    """The default peak learning rate for a model of ``parameters``: ``1e-3 * (parameters / 1e6) ** -0.5``, at most
    1e-3 (ten times that with LoRA, at most 2e-3). Small models need and bear a far larger rate than the 2e-5 of
    7B fine-tuning recipes: measured on the asset models and SmolLM2-135M in docs/benchmarks.md."""
    rate = min(1e-3, 1e-3 * (parameters / 1e6) ** -0.5)
    return min(2e-3, 10 * rate) if lora else rate


GRADUAL_WARNING = 2.0  # pruning while training that ends above this multiple of the dense perplexity is named


@dataclass
class TrainingEstimate:
    """What recovery training will need, roughly: peak memory on its device and wall time."""

    memory_bytes: int
    seconds: float
    tokens: int

    def __str__(self) -> str:
        return (
            f"recovery training: {self.tokens:,} tokens, peak memory about {self.memory_bytes / 2**30:.2f} GiB "
            f"(weights, gradients, AdamW's two moments, the teacher, activations), about {self.seconds / 60:.1f} min"
        )


def estimate_training(
    parameters: int, weight_bytes: int, model_config: Any, config: RecoveryConfig, flops_per_second: float,
    gradual: bool = False,
) -> TrainingEstimate:  # fmt: skip
    """The memory and time of training ``parameters`` (``weight_bytes`` each) with ``config``: weights, their
    gradients and AdamW's two float32 moments (adapters only with LoRA), the teacher's weights when distilling,
    per token about 20 hidden-sized float32 activations per block and the logits (and the teacher's); gradual
    pruning adds its masks and float32 saliency. Time: 6 FLOPs per parameter and token to train, 2 more for the
    teacher, at the measured matmul throughput."""
    text = model_config.get_text_config()
    tokens = config.max_steps * config.batch_size * config.seq_len
    batch_tokens = config.batch_size * config.seq_len
    trained = 0 if config.lora else parameters
    memory = parameters * weight_bytes + trained * (weight_bytes + 8)
    memory += parameters * weight_bytes if config.distill else 0
    memory += batch_tokens * text.hidden_size * 4 * 20 * text.num_hidden_layers
    memory += batch_tokens * text.vocab_size * 4 * (3 if config.distill else 2)
    memory += parameters * 4 + parameters // 8 if gradual else 0
    flops = tokens * parameters * (6 + (2 if config.distill else 0))
    return TrainingEstimate(int(memory), flops / flops_per_second, tokens)


class TrainingDiverged(RuntimeError):
    """Recovery training left non-finite weights or losses."""


@dataclass
class RecoveryReport:
    """What recovery did: tokens seen, the loss, the time; recorded in the metadata and the model card."""

    steps: int
    tokens: int
    loss: str
    teacher: str | None
    lora: bool
    dataset: str
    learning_rate: float
    first_loss: float | None
    final_loss: float | None
    seconds: float
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_perplexity: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out perplexity)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(teacher || student)`` of next-token distributions, a chunk of positions at
    a time so that only one chunk's log-probabilities are held at once."""
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.reshape(-1, teacher.shape[-1])
    total = student.new_zeros(())
    for start in range(0, student.shape[0], KL_CHUNK_TOKENS):
        s = F.log_softmax(student[start : start + KL_CHUNK_TOKENS].float(), dim=-1)
        t = F.log_softmax(teacher[start : start + KL_CHUNK_TOKENS].float(), dim=-1)
        total = total + F.kl_div(s, t, log_target=True, reduction="sum")
    return total / student.shape[0]


class _RecoveryTrainer(Trainer):
    """A Trainer whose loss is distillation from ``teacher`` (or the model's own language-model loss)."""

    def __init__(self, *args: Any, teacher: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(input_ids=inputs["input_ids"], use_cache=False)
        with torch.no_grad():
            target = self.teacher(input_ids=inputs["input_ids"].to(self.teacher.device), use_cache=False).logits
        loss = distillation_loss(outputs.logits, target.to(outputs.logits.device))
        return (loss, outputs) if return_outputs else loss


def training_windows(
    dataset: Any, tokenizer: PreTrainedTokenizerBase, config: RecoveryConfig, text_column: str, split: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``max_steps x batch_size`` training windows of ``seq_len`` tokens and ``eval_windows`` held-out ones, all
    distinct (consecutive pieces of the text): a dataset too small is refused."""
    texts, name = load_texts(dataset, text_column=text_column, split=split)
    needed = config.max_steps * config.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ids = calibration_ids(texts, tokenizer, needed + config.eval_windows, config.seq_len, config.seed)
        except (UserWarning, ValueError) as problem:
            raise InputError(
                f"The recovery data {name!r} is too small for {config.max_steps} steps of {config.batch_size} x "
                f"{config.seq_len} tokens and {config.eval_windows} evaluation windows ({problem}): lower the steps, "
                "the batch size or seq_len, or give more text."
            ) from None
    return ids[:needed], ids[needed:], name


def held_out_perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    """The perplexity of ``model`` on the held-out windows ``ids`` (BOS included where the tokenizer adds one,
    as the calibration windows are), measured in eval mode."""
    was_training = model.training
    model.eval()
    value = windows_perplexity(model, ids, batch_size)
    model.train(was_training)
    return value


class _EvaluatePerplexity(TrainerCallback):
    """The held-out perplexity before training and at every checkpoint, logged and kept in the Trainer's log
    history (so that a resumed run has the points before it)."""

    def __init__(self, ids: torch.Tensor, batch_size: int) -> None:
        self.ids, self.batch_size = ids, batch_size

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if len(self.ids) and state.global_step == 0:  # LoRA's adapters start at zero: the pruned model itself
            record(state, 0, held_out_perplexity(model, self.ids, self.batch_size))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        """Before a checkpoint is written (``should_save``), so that the checkpoint holds this point too."""
        final = state.global_step >= state.max_steps  # measured after training (after the merge, with LoRA)
        if len(self.ids) and control.should_save and not final and not hasattr(model, "peft_config"):
            record(state, state.global_step, held_out_perplexity(model, self.ids, self.batch_size))


class _Progress(ProgressCallback):
    """The Trainer's progress bar with the last loss and held-out perplexity beside it, instead of a printed
    dictionary per log."""

    def __init__(self) -> None:
        super().__init__()
        self.postfix: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in (logs or {}):
            self.postfix["loss"] = f"{logs['loss']:.4g}"
            self._show(state)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self._show(state)

    def _show(self, state: Any) -> None:
        latest = next((entry for entry in reversed(state.log_history) if "eval_perplexity" in entry), None)
        if latest is not None:
            self.postfix["held-out ppl"] = f"{latest['eval_perplexity']:.2f}"
        if self.training_bar is not None:
            self.training_bar.set_postfix(self.postfix, refresh=False)


def record(state: Any, step: int, perplexity: float) -> None:
    """Log a held-out perplexity and keep it in the Trainer state's log history."""
    logger.info("recovery step %d: held-out perplexity %.3f", step, perplexity)
    state.log_history.append({"step": step, "eval_perplexity": perplexity})


def lora_targets(model: nn.Module, masks: Mapping[str, torch.Tensor], layers: list[str]) -> list[str]:
    """The modules LoRA adapts: the masked weights' layers (else ``layers``), each refused unless an nn.Linear."""
    names = {name.removesuffix(".weight") for name in masks} or set(layers)
    modules = dict(model.named_modules())
    missing = [name for name in names if not isinstance(modules.get(name), nn.Linear)]
    if missing:
        raise InputError(f"LoRA needs nn.Linear target layers; {missing[0]} is not one (GPT-2's Conv1D, say).")
    return sorted(names)


def _merge_lora(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Merge every LoRA adapter into its base weight through the layer's keep-mask; return the plain model."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            key = name.split("base_model.model.", 1)[-1] + ".weight"
            delta = module.get_delta_weight("default")
            if key in masks:
                delta = delta * (~masks[key]).to(delta.device, delta.dtype)
            module.base_layer.weight += delta.to(module.base_layer.weight.dtype)
    return model.unload()


def _training_arguments(config: RecoveryConfig, work_dir: str | Path, progress: bool, device: torch.device):
    """The Trainer's arguments: constant learning rate after a 10% warm-up, four checkpoints, no reporting."""
    return TrainingArguments(
        output_dir=str(work_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=max(1, config.max_steps // 10),
        logging_steps=max(1, config.max_steps // 20),
        save_steps=max(1, config.max_steps // 4),
        save_total_limit=1,
        report_to=[],
        seed=config.seed,
        use_cpu=device.type == "cpu",
        disable_tqdm=not progress,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def recover(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    masks: Mapping[str, torch.Tensor],
    dataset: Any,
    config: RecoveryConfig,
    work_dir: str | Path,
    *,
    teacher: nn.Module | None = None,
    teacher_name: str | None = None,
    target_layers: list[str] | None = None,
    text_column: str = "text",
    split: str = "train",
    resume: bool = False,
    progress: bool = True,
    callback: SparsityCallback | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[nn.Module, RecoveryReport]:
    """Train ``model`` after pruning and return it (a new object with LoRA) and the report. Checkpoints go to
    ``work_dir`` (``resume=True`` continues from the last one) and are removed once training has finished; every
    pruned weight is checked to be zero. ``callback`` replaces the `SparsityCallback` of ``masks`` (gradual
    pruning passes its `GradualPruningCallback`, whose masks grow during training); ``callbacks`` are added to
    the Trainer's (evaluation at some steps, say)."""
    ids, eval_ids, name = training_windows(dataset, tokenizer, config, text_column, split)
    if config.learning_rate is None:
        parameters = sum(parameter.numel() for parameter in model.parameters())
        config = replace(config, learning_rate=default_learning_rate(parameters, config.lora))
    if config.distill and teacher is None:
        raise InputError("Distillation needs the dense teacher model: pass teacher=, or distill=False.")
    student = model
    if config.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError(
                'LoRA recovery needs PEFT: pip install "optimum-prune[recovery]" (or pip install peft).'
            ) from None

        targets = lora_targets(model, masks, target_layers or [])
        lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, target_modules=targets, lora_dropout=0.0)
        with warnings.catch_warnings():  # PEFT calls a transformers API that transformers deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            student = get_peft_model(model, lora)
    args = _training_arguments(config, work_dir, progress, next(model.parameters()).device)
    trainer = _RecoveryTrainer(
        model=student,
        args=args,
        train_dataset=_Windows(ids),
        callbacks=[
            *([callback or SparsityCallback(masks)] if (masks or callback) and not config.lora else []),
            _EvaluatePerplexity(eval_ids, config.batch_size),
            *callbacks,
        ],
        teacher=teacher if config.distill else None,
    )
    for printer in (ProgressCallback, PrinterCallback):  # our bar instead, and no printed log dictionaries
        trainer.remove_callback(printer)
    if progress:
        trainer.add_callback(_Progress)
    checkpoints = sorted(Path(work_dir).glob("checkpoint-*")) if resume else []
    start = time.perf_counter()
    frozen = [parameter for parameter in outside_language_model(model) if parameter.requires_grad]
    for parameter in frozen:  # a vision-language model's vision tower and projector are not trained
        parameter.requires_grad_(False)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoints[-1]) if checkpoints else None)
    finally:
        for parameter in frozen:
            parameter.requires_grad_(True)
    seconds = time.perf_counter() - start
    for checkpoint in Path(work_dir).glob("checkpoint-*"):  # only an interrupted run needs them
        shutil.rmtree(checkpoint, ignore_errors=True)
    trained = _merge_lora(student, masks) if config.lora else student
    trained.eval()
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    _check_finite(trained, losses, config.learning_rate)
    check_masks_hold(trained, callback.masks if callback is not None else masks)
    if len(eval_ids):
        record(trainer.state, trainer.state.global_step, held_out_perplexity(trained, eval_ids, config.batch_size))
    report = RecoveryReport(
        steps=trainer.state.global_step,
        tokens=trainer.state.global_step * config.batch_size * config.seq_len,
        loss="distillation (KL to the dense model)" if config.distill else "language modelling",
        teacher=teacher_name if config.distill else None,
        lora=config.lora,
        dataset=name,
        learning_rate=config.learning_rate,
        first_loss=losses[0][1] if losses else None,
        final_loss=losses[-1][1] if losses else None,
        seconds=seconds,
        losses=losses,
        eval_perplexity=[(entry["step"], entry["eval_perplexity"]) for entry in history if "eval_perplexity" in entry],
    )
    _warn_unless_improved(report, gradual=callback is not None)
    return trained, report


def _check_finite(model: nn.Module, losses: list[tuple[int, float]], learning_rate: float) -> None:
    """Refuse the result of training that diverged: non-finite weights (or losses), with the step and the fix."""
    bad = next(((step, loss) for step, loss in losses if not math.isfinite(loss)), None)
    broken = [name for name, parameter in model.named_parameters() if not torch.isfinite(parameter).all()]
    if broken or bad:
        where = f"the loss was {bad[1]} at step {bad[0]}" if bad else f"{len(broken)} weights hold NaN or inf"
        raise TrainingDiverged(
            f"Recovery training diverged ({where}) at learning rate {learning_rate:g}: lower it, e.g. "
            f"--recover-lr {learning_rate / 10:g} (learning_rate={learning_rate / 10:g})."
        )


def _warn_unless_improved(report: RecoveryReport, gradual: bool) -> None:
    """Say so when the held-out perplexity did not fall: training that did not help, or hurt. Gradual pruning
    starts from the dense model, so there it says so when the end is far above the dense start."""
    if len(report.eval_perplexity) < 2:
        return
    (_, before), (_, after) = report.eval_perplexity[0], report.eval_perplexity[-1]
    if gradual:
        if after > GRADUAL_WARNING * before:
            logger.warning(
                "Pruning while training ended at %.3f held-out perplexity, %.1fx the dense model's %.3f, after %d "
                "steps: with this few steps the schedule prunes faster than training can follow; prune one-shot and "
                "recover (--recover-schedule one-shot), or give it more steps.",
                after,
                after / before,
                before,
                report.steps,
            )
        return
    if after >= before:
        advice = (
            "the learning rate is too high for this model: lower --recover-lr"
            if after > 1.1 * before
            else "raise --recover-lr or --recover-steps"
        )
        logger.warning(
            "Recovery did not lower the held-out perplexity (%.3f -> %.3f after %d steps at learning rate %g): %s.",
            before,
            after,
            report.steps,
            report.learning_rate,
            advice,
        )
