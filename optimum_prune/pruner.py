"""`Pruner`: load a model, prune it block by block, save it where people deploy it."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitInfo, ModelCard
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from .calibration import calibration_tokens, has_images, image_text_inputs, load_pairs, load_processor
from .config import PruningConfig, gptq_with_training
from .core.auto import is_vision_language
from .core.layers import find_target_layers
from .engine.activations import DISK
from .engine.blockwise import BlockwiseEngine
from .engine.budget import candidate_mixes, search_budget
from .engine.capture import CalibrationInputs
from .engine.dispatch import AccelerateDispatch, is_dispatched
from .engine.distributed import Ranks
from .engine.estimate import RunEstimate, estimate, estimate_run
from .engine.offload import OFFLOAD_MODES, DiskOffload
from .engine.resources import MaxMemory, check_free_space, check_max_memory
from .engine.streaming import write_streamed_weights
from .engine.structured import StructuredEngine
from .engine.work_folder import WorkFolder, calibration_digest, work_folder_path
from .errors import InputError
from .evaluation.harness import TaskScore, ZeroShotTasks, compare
from .export import METADATA_KEY, atomic_directory, build_metadata
from .export.compressed import check_format, save_compressed
from .export.files import check_writable, copy_processor_files, transformers_bars_off, write_model_files
from .export.masks import Masks, write_masks
from .export.plots import PLOT_NAME, RECOVERY_PLOT_NAME, write_recovery_plot, write_sparsity_plot
from .methods import get_method
from .model_source import check_causal_lm_module, check_no_adapters, load_source, load_teacher, load_tokenizer
from .recovery import RecoveryConfig, RecoveryReport, recover
from .recovery.train import TrainingDiverged
from .report import PruningReport
from .structured.plan import StructurePlan, plan_structure
from .structured.spec import Structure

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


class Pruner:
    """Prunes a transformers causal LM, in the shape of optimum's quantizers.

    Example:
        >>> config = PruningConfig(method="wanda", sparsity=0.5)
        >>> pruner = Pruner.from_pretrained("HuggingFaceTB/SmolLM2-135M", config=config)
        >>> report = pruner.prune("c4_sample.jsonl")
        >>> pruner.save_pretrained("smollm2-wanda-50")
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: PruningConfig | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        device: str | torch.device | None = None,
        activations_device: str | torch.device | None = None,
        progress: bool = True,
        source: str | None = None,
        *,
        offload: str | None = None,
        disk: DiskOffload | None = None,
        offload_folder: str | os.PathLike | None = None,
        max_memory: MaxMemory | None = None,
        offload_activations: bool = False,
        processor: Any = None,
    ) -> None:
        if offload not in (None, *OFFLOAD_MODES):
            raise InputError(f"Unknown offload {offload!r}: choose None, {', '.join(map(repr, OFFLOAD_MODES))}.")
        if offload == "disk" and disk is None:
            raise InputError(
                "offload='disk' streams weights from a checkpoint: use Pruner.from_pretrained(path, offload='disk')."
            )
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(
                f"Pruner needs a loaded transformers model (a module with a `config`), got {type(model).__name__}: "
                "load it with AutoModelForCausalLM.from_pretrained or pass its path."
            )
        check_no_adapters(model)
        self.model = model
        self.dispatch = AccelerateDispatch(model) if is_dispatched(model) else None
        if self.dispatch is not None and (offload is not None or disk is not None):
            raise InputError(
                "The model was placed by accelerate (device_map), which already offloads it: drop offload=, or load "
                "it without device_map and let optimum-prune offload it."
            )
        self.config = config if config is not None else PruningConfig()
        dtype = next(model.parameters()).dtype
        if self.config.gptq and dtype != torch.float32:
            raise InputError(
                f"gptq={self.config.gptq!r} rounds the kept weights onto the export's grid, which a {dtype} model "
                "cannot hold (each grid value would be rounded again to its dtype): load the model with "
                "dtype=torch.float32 (--dtype float32)."
            )
        self.tokenizer = tokenizer
        self.processor = processor  # a vision-language model's processor (or its folder), for image calibration
        self.device = torch.device(device) if device is not None else default_device()
        self.offload = "disk" if disk is not None else "cpu"
        self.disk = disk
        self.offload_folder = Path(offload_folder) if offload_folder is not None else None
        self.max_memory = max_memory
        if offload_activations and activations_device not in (None, DISK):
            raise InputError(
                f"offload_activations=True keeps the calibration activations on disk; drop "
                f"activations_device={activations_device!r} or offload_activations."
            )
        in_memory = activations_device or ("cpu" if disk is not None else None)
        self.activations_device = DISK if offload_activations else in_memory
        self.progress = progress
        self.source = source or getattr(model.config, "_name_or_path", None)
        self.report: PruningReport | None = None
        self.masks: dict[str, torch.Tensor] = {}  # packed, by layer name; left empty by offload='disk' runs
        self.output_dir: str | None = None
        self.recovery: RecoveryReport | None = None
        self._calibration_source: Any = None  # what prune() calibrated on: recovery's default data
        self._budget_mixes: list[tuple[Structure, int]] = []  # a budget's candidates (params=, size=), checked up front

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | PreTrainedModel,
        config: PruningConfig | None = None,
        *,
        tokenizer: PreTrainedTokenizerBase | str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "auto",
        trust_remote_code: bool = False,
        allow_unsafe_weights: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        progress: bool = True,
        offload: str | None = None,
        offload_folder: str | os.PathLike | None = None,
        max_memory: MaxMemory | None = None,
        offload_activations: bool = False,
        device_map: str | dict[str, Any] | None = None,
        processor: Any = None,
        **model_kwargs: Any,
    ) -> Pruner:
        """Load a model (a Hub id, a local folder, or an already loaded model) and its tokenizer.

        Weights load only from safetensors unless ``allow_unsafe_weights=True``; remote code only runs with
        ``trust_remote_code=True``. Extra keyword arguments go to ``AutoModelForCausalLM.from_pretrained``
        (``gguf_file=...``, for example: GGUF weights are dequantized into a plain model that can be saved).

        Large models: ``offload="cpu"`` (the default) keeps the weights in CPU RAM and moves one block at a time
        to ``device``; ``offload="disk"`` builds the model on the meta device and reads each block from the
        safetensors checkpoint only while it is pruned, then `prune` streams it to ``output_dir``, so only about
        one block is ever in memory. ``offload_folder`` holds the run's resumable state (default: beside the
        output); ``max_memory`` (``{0: "20GiB", "cpu": "64GiB"}``) is checked against the estimate before pruning.
        ``offload_activations=True`` keeps the calibration activations between blocks in memory-mapped files (in
        the work folder, else ``offload_folder``, else the system's temporary folder) instead of host RAM.

        ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict) loads the model the accelerate way
        instead: accelerate places its modules on GPUs, the CPU and disk (``max_memory`` and ``offload_folder``
        then go to accelerate, as for ``from_pretrained``), and each block is pruned through accelerate's hooks and
        written back where accelerate keeps it. A model already loaded with a ``device_map`` is taken as it is.

        ``processor`` (a vision-language model's processor, or the folder or Hub id it loads from; default: the
        model's own) turns image + text calibration data into model inputs (docs/vision-language.md).
        """
        resources = {
            "offload": offload,
            "offload_folder": offload_folder,
            "max_memory": max_memory,
            "offload_activations": offload_activations,
            "processor": processor,
        }
        if isinstance(model_or_path, nn.Module):
            if offload == "disk":
                raise InputError("offload='disk' reads blocks from a checkpoint: pass its folder, not a loaded model.")
            check_causal_lm_module(model_or_path)
            return cls(model_or_path, config, load_tokenizer(tokenizer), device, progress=progress, **resources)
        source = os.fspath(model_or_path)
        if device_map is not None:
            if offload is not None:
                raise InputError(
                    f"device_map={device_map!r} lets accelerate place and offload the model, offload={offload!r} asks "
                    "optimum-prune to: choose one."
                )
            model_kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
            resources.update(max_memory=None, offload_folder=None)
        model, tokenizer, disk = load_source(
            source,
            tokenizer=tokenizer,
            dtype=dtype,
            offload=offload,
            trust_remote_code=trust_remote_code,
            allow_unsafe_weights=allow_unsafe_weights,
            revision=revision,
            token=token,
            **model_kwargs,
        )
        resources["offload"] = None if disk is not None else offload
        return cls(model, config, tokenizer, device, progress=progress, source=source, disk=disk, **resources)

    @classmethod
    def estimate(
        cls,
        model_or_path: str | os.PathLike,
        config: PruningConfig | None = None,
        *,
        device: str | torch.device | None = None,
        offload: str | None = None,
        dtype: str | torch.dtype = "auto",
        trust_remote_code: bool = False,
        offload_activations: bool = False,
    ) -> RunEstimate:
        """Dry run: estimated peak device and host memory, disk use and time of pruning a local model folder,
        from its config.json and safetensors headers (no weight is loaded)."""
        return estimate(
            model_or_path,
            config,
            device=device,
            offload=offload,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            offload_activations=offload_activations,
        )

    def calibration_ids(self, dataset: Any, text_column: str = "text", split: str = "train") -> torch.Tensor:
        """The ``(num_samples, seq_len)`` calibration tokens drawn from ``dataset`` with this config (a tensor of
        token ids is checked and returned as it is)."""
        return self._calibration(dataset, text_column, split)[0]

    def _cap_seq_len(self, dataset: Any) -> None:
        """Calibration windows fit the model's context: a longer ``seq_len`` is capped at it, with a warning (the
        recipe records the length that was run); a tensor of longer windows is refused."""
        context = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        length = dataset.shape[-1] if isinstance(dataset, torch.Tensor) else self.config.seq_len
        if not context or length <= context:
            return
        if isinstance(dataset, torch.Tensor):
            raise InputError(
                f"The calibration tensor's windows of {length} tokens are longer than the model's context of "
                f"{context}: pass windows of at most {context} tokens."
            )
        logger.warning("Calibration seq_len=%d capped at the model's context, %d tokens.", length, context)
        self.config = dataclasses.replace(self.config, seq_len=context)

    def _calibration(self, dataset: Any, text_column: str, split: str) -> tuple[CalibrationInputs, str]:
        config = self.config
        if has_images(dataset):
            if config.structure is not None:
                raise InputError(
                    "Structured pruning calibrates on text (it measures the language model's loss on the calibration "
                    "tokens): give text data, or prune the structure on text and then prune with images."
                )
            pairs, name = load_pairs(dataset, text_column)
            processor = self._processor()
            return image_text_inputs(pairs, processor, config.num_samples, config.seq_len, config.seed), name
        return calibration_tokens(
            dataset, self.tokenizer, config.num_samples, config.seq_len, config.seed, text_column, split
        )

    @property
    def _processor_folder(self) -> str | os.PathLike | None:
        """Where the processor's files are: the ``processor=`` folder when one was given, else the model's."""
        return self.processor if isinstance(self.processor, (str, os.PathLike)) else self.source

    def _processor(self) -> Any:
        """The processor that turns image + text calibration pairs into model inputs: the one given to
        `from_pretrained`, else the model folder's; refused for models without a vision tower."""
        if not is_vision_language(self.model.config):
            raise InputError(
                f"The calibration data pairs texts with images, but {type(self.model).__name__} takes no images: "
                "calibrate it on text (rows without an 'image' field)."
            )
        if self.processor is not None and not isinstance(self.processor, (str, os.PathLike)):
            return self.processor
        return load_processor(self._processor_folder)

    def prune(
        self,
        dataset: Any = None,
        *,
        text_column: str = "text",
        split: str = "train",
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        resume: bool = False,
    ) -> PruningReport:
        """Prune the model in place, block by block, and return the report.

        ``dataset`` is the calibration data: a list of strings, a ``datasets.Dataset``, a local
        ``.txt``/``.jsonl``/``.json``/``.parquet`` path, a Hub dataset name, or a ``(num_samples, seq_len)``
        tensor of token ids. Magnitude pruning with uniform allocation needs none.

        With ``output_dir`` (required with ``offload="disk"``) every finished block is saved to a work folder
        (``<output_dir>.partial``) and the pruned model is written to ``output_dir`` as dense safetensors when
        the last block is done; ``resume=True`` continues an interrupted run started with the same arguments.
        """
        if self.report is not None:
            raise RuntimeError("This model is already pruned; create a new Pruner to prune again.")
        if self.disk is not None and output_dir is None:
            raise InputError("offload='disk' writes each pruned block straight to disk: pass output_dir= to prune().")
        if resume and output_dir is None:
            raise InputError("resume=True continues a run that writes to an output_dir: pass output_dir= too.")
        if output_dir is not None:
            check_writable(output_dir, overwrite, inputs=self._inputs())
        plan = self._plan_structure()
        input_ids = None
        if self.config.needs_calibration:
            if dataset is None:
                raise InputError(
                    f"{self.config.calibration_needed_by} needs calibration data: pass a dataset, e.g. "
                    "pruner.prune('path/to/c4_sample.jsonl') or a list of strings."
                )
            self._cap_seq_len(dataset)
            input_ids, name = self._calibration(dataset, text_column, split)
            self._calibration_source = None if isinstance(dataset, torch.Tensor) else (dataset, text_column, split)
            # the recipe records what was run: a tensor sets its own shape, image + text samples their count
            samples, seq_len = input_ids.shape if isinstance(input_ids, torch.Tensor) else (len(input_ids), None)
            self.config = dataclasses.replace(
                self.config, num_samples=samples, seq_len=seq_len or self.config.seq_len, dataset=name
            )
        if plan is None:
            return self._prune_blockwise(input_ids, output_dir, overwrite, resume, None)
        work = None
        if output_dir is not None:
            folder = work_folder_path(output_dir, self.offload_folder, structure=True)
            work = WorkFolder(folder, self._fingerprint(input_ids), resume)
        budget = None
        if self.config.structure.is_budget:  # the mix with the lowest held-out loss, then its plan
            method = get_method(self.config.method, self.config.settings)
            budget = search_budget(
                self.model, self.config, method, self._budget_mixes, input_ids, self.device, self.progress
            )
            chosen = budget.chosen.choosing_blocks_by(self.config.structure.layer_criterion)
            plan = plan_structure(
                self.model, chosen, find_target_layers(self.model, self.config.targets, self.config.ignore)
            )
        structured, engine = self._prune_structure(plan, input_ids, work)
        if budget is not None:
            structured.structure["budget"] = budget.to_dict()
        if self.config.sparsity or self.config.gptq:  # then unstructured sparsity (or GPTQ) on the smaller model
            self._prune_blockwise(input_ids, output_dir, overwrite, resume, structured.structure)
        else:
            self.report = structured
            self._record_metadata()
            if self.disk is not None:
                self._write_streamed(output_dir, overwrite, work, engine)
            elif output_dir is not None:
                self.save_pretrained(output_dir, overwrite=overwrite)
                self.output_dir = os.fspath(output_dir)
        if work is not None:
            work.remove()
        return self.report

    def _prune_blockwise(
        self,
        input_ids: CalibrationInputs | None,
        output_dir: str | os.PathLike | None,
        overwrite: bool,
        resume: bool,
        structure: dict[str, Any] | None,
    ) -> PruningReport:
        """The unstructured (or N:M) pass, after a structured one when ``structure`` (its summary) is given:
        checks against the estimate, the work folder, the engine, the output."""
        planned = estimate_run(
            self.model,
            self.config,
            device=self.device,
            offload=self.offload,
            activations_device=self.activations_device,
            write_output=output_dir is not None,
            measure_time=False,  # only memory and disk are checked here
        )
        if self.dispatch is None:  # accelerate placed a dispatched model within its own max_memory
            check_max_memory(self.max_memory, planned, self.device, self.offload)
        ranks = Ranks.current()
        ranks.check_same("the run (arguments, model, calibration data)", self._fingerprint(input_ids))
        work = None
        if output_dir is not None:
            folder = work_folder_path(output_dir, self.offload_folder)
            check_free_space(planned, folder, output_dir, linked=self.disk is not None)
            work = WorkFolder(folder, self._fingerprint(input_ids), resume, ranks)
        engine = None
        try:
            engine = BlockwiseEngine(
                self.model,
                self.config,
                get_method(self.config.method, self.config.settings, self.config.refit, self.config.gptq),
                device=self.device,
                activations_device=self.activations_device,
                progress=self.progress,
                disk=self.disk,
                work_folder=work,
                activations_folder=work.folder if work is not None else self.offload_folder,
                dispatch=self.dispatch,
            )
            self.report = engine.run(input_ids)
        except BaseException:
            if work is not None and not work.has_finished_block:
                work.remove()  # nothing to resume: leave nothing that would block the corrected command
            finished = len(engine.masks) if engine is not None else 0
            if finished and self.disk is None:
                logger.error(
                    "Pruning stopped partway: %d target layers of the model in memory are pruned and the rest are "
                    "not, so the model is half-pruned; load it again before using it%s.",
                    finished,
                    " (or run again with resume=True to continue from the saved blocks)" if work is not None else "",
                )
            raise
        self.masks = engine.masks
        self.report.structure = structure
        self._record_metadata()
        if work is not None:
            if self.disk is None:
                self.save_pretrained(output_dir, overwrite=overwrite)
                self.output_dir = os.fspath(output_dir)
            elif ranks.main:
                self._write_streamed(output_dir, overwrite, work, engine)
            ranks.barrier()
            if ranks.main:
                work.remove()
        return self.report

    def _plan_structure(self) -> StructurePlan | None:
        """The checked plan of a structured run (``None`` without ``structure``): refused before any work when
        the result could not be loaded by the model's own config class."""
        if self.config.structure is None:
            return None
        if Ranks.current().distributed:
            raise InputError("Structured pruning runs in one process: start it without torchrun.")
        if self.dispatch is not None:
            raise InputError(
                "Structured pruning changes the shapes of layers that accelerate's device map placed: load the model "
                "without device_map (for a model larger than memory, Pruner.from_pretrained(path, offload='disk') "
                "streams it block by block)."
            )
        if self.disk is not None and self.config.sparsity:
            raise InputError(
                "With offload='disk', a structure and unstructured sparsity are two runs (the second reads the "
                "smaller blocks from the first's output): prune the structure, then the saved model with sparsity."
            )
        if self.config.structure.is_budget:
            if self.disk is not None:
                raise InputError(
                    "a structure budget (params=, size=) searches on copies of the model in memory: use offload='cpu', or give the "
                    "fractions (mlp=, attention=, layers=) with offload='disk'."
                )
            self._budget_mixes = candidate_mixes(self.model, self.config)  # compared once calibrated
            layers = find_target_layers(self.model, self.config.targets, self.config.ignore)
            return plan_structure(self.model, self._budget_mixes[0][0], layers)
        layers = find_target_layers(self.model, self.config.targets, self.config.ignore)
        return plan_structure(self.model, self.config.structure, layers)

    def _prune_structure(
        self, plan: StructurePlan, input_ids: CalibrationInputs | None, work: WorkFolder | None
    ) -> tuple[PruningReport, StructuredEngine]:
        """The structured pass; with ``work``, every finished block is saved there and a rerun resumes."""
        method = get_method(self.config.method, self.config.settings)
        engine = StructuredEngine(
            self.model, self.config, method, plan, self.device, self.activations_device, self.progress, work,
            self.disk,
        )  # fmt: skip
        try:
            return engine.run(input_ids), engine
        except BaseException:
            if work is not None and not work.has_finished_block:
                work.remove()  # nothing to resume: leave nothing that would block the corrected command
            raise

    def _inputs(self) -> tuple[str, ...]:
        """The local folders this run reads, which no output may replace."""
        return (self.source,) if self.source is not None and os.path.isdir(self.source) else ()

    def _fingerprint(self, input_ids: CalibrationInputs | None) -> dict[str, Any]:
        """What must match for a run to resume from another's work folder."""
        config = self.config.to_dict()
        return {
            "config": config,
            "model": self.source or type(self.model).__name__,
            "architecture": type(self.model).__name__,
            "dtype": str(next(self.model.parameters()).dtype),
            "device": self.device.type,
            "calibration": calibration_digest(input_ids) if input_ids is not None else None,
            "processes": Ranks.current().world,  # each rank keeps its own activations file
        }

    def _write_streamed(
        self, output_dir: str | os.PathLike, overwrite: bool, work: WorkFolder, engine: BlockwiseEngine
    ) -> None:
        """Assemble the output folder of a disk-offloaded run from its streamed blocks."""
        with atomic_directory(output_dir, overwrite) as staging:
            write_streamed_weights(
                staging, self.model, self.disk.checkpoint, work, engine.blocks_name, len(engine.blocks)
            )
            write_model_files(staging, self.model, self.tokenizer, self.config)
            copy_processor_files(self._processor_folder, staging)
            write_sparsity_plot(self.report, staging / PLOT_NAME)
        self.output_dir = os.fspath(output_dir)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        format: str = "dense",
        save_masks: bool = False,
        max_shard_size: str | int = "5GB",
    ) -> str:
        """Save the pruned model, its tokenizer and ``pruning_config.json``.

        ``format="dense"`` writes plain safetensors that ``AutoModelForCausalLM.from_pretrained`` loads;
        ``format="compressed"`` stores each pruned weight as its kept values plus a bitmask (or N:M indices),
        loaded with `optimum_prune.load_pruned`. ``save_masks=True`` adds ``sparsity_masks.safetensors``, which
        tells pruned weights from kept ones that are zero (`optimum_prune.load_masks`). The sparsity metadata
        lives in ``config.json`` under ``"optimum_prune"``. Files are written to a temporary folder that
        replaces ``save_directory`` only when complete; a non-empty ``save_directory`` is kept unless ``overwrite``.
        """
        if self.report is None:
            raise RuntimeError("Nothing to save yet: call prune() first.")
        check_format(format)
        if not Ranks.current().main:  # in a distributed run, rank 0 writes
            return os.fspath(save_directory)
        if self.disk is not None:
            return self._copy_streamed(save_directory, overwrite, format, save_masks)
        offloaded = self.dispatch is not None and any(parameter.is_meta for parameter in self.model.parameters())
        if offloaded and (format != "dense" or save_masks):
            raise InputError(
                "accelerate keeps some of this model's weights offloaded (device_map), and the compressed format and "
                "masks are built from weights in memory: save it with format='dense' and save_masks=False, then "
                "compress that folder from a machine that holds it (optimum_prune.load_pruned / Pruner)."
            )
        check_writable(save_directory, overwrite, inputs=self._inputs())
        masks = Masks.from_pruner(self.model, self.masks) if save_masks or format == "compressed" else None
        with atomic_directory(save_directory, overwrite) as staging:
            if format == "compressed":
                save_compressed(
                    self.model, staging, masks, pattern=self.config.nm_pattern, max_shard_size=max_shard_size
                )
            else:
                with transformers_bars_off():
                    self.model.save_pretrained(staging, max_shard_size=max_shard_size)
            if save_masks:
                write_masks(masks, staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            copy_processor_files(self._processor_folder, staging)
            self.config.save_pretrained(staging)
            write_sparsity_plot(self.report, staging / PLOT_NAME)
            if self.recovery is not None:
                write_recovery_plot(self.recovery.to_dict(), staging / RECOVERY_PLOT_NAME)
        return os.fspath(save_directory)

    def _copy_streamed(self, save_directory: str | os.PathLike, overwrite: bool, format: str, save_masks: bool) -> str:
        """`save_pretrained` after a disk-offloaded run: a copy of the dense folder it streamed to ``output_dir``."""
        if format != "dense" or save_masks:
            raise RuntimeError(
                f"With offload='disk' the pruned model exists only as dense safetensors in {self.output_dir} (its "
                "masks were never all in memory): save it with format='dense' and save_masks=False, or prune with "
                "offload='cpu' for the compressed format and masks."
            )
        if Path(save_directory).resolve() == Path(self.output_dir).resolve():
            return os.fspath(save_directory)
        check_writable(save_directory, overwrite, inputs=self._inputs())
        with atomic_directory(save_directory, overwrite) as staging:
            shutil.copytree(self.output_dir, staging, dirs_exist_ok=True)
        return os.fspath(save_directory)

    def recover(
        self,
        dataset: Any = None,
        *,
        max_steps: int,
        learning_rate: float | None = None,
        batch_size: int = 4,
        seq_len: int | None = None,
        lora: bool = False,
        distill: bool = True,
        teacher: nn.Module | None = None,
        work_dir: str | os.PathLike | None = None,
        text_column: str = "text",
        split: str = "train",
        resume: bool = False,
        callbacks: Sequence[TrainerCallback] = (),
        eval_windows: int = 8,
    ) -> RecoveryReport:
        """Train the pruned model for ``max_steps`` steps so that it recovers quality, keeping every pruned weight
        exactly zero (see `optimum_prune.recovery`). ``dataset`` defaults to the calibration data; the loss is
        distillation from the dense model (``teacher``, default: loaded again from the source) unless
        ``distill=False``; ``lora=True`` trains LoRA adapters merged through the masks. The pruned model is saved
        to ``work_dir/pruned`` before training starts (removed once training has finished; training that diverges
        names it), and Trainer checkpoints go to ``work_dir`` (``resume=True``
        continues from the last one); ``callbacks`` are added to the Trainer's. The perplexity of
        ``eval_windows`` held-out windows of the training text is measured before, along the way and after
        (`RecoveryReport.eval_perplexity`)."""
        if self.report is None:
            raise RuntimeError("Nothing to recover: call prune() first.")
        _check_resume(resume, work_dir)
        if Ranks.current().distributed:
            raise InputError("Recovery training runs in one process: recover the saved model without torchrun.")
        self._check_trainable()
        if self.disk is not None:
            raise InputError(
                f"offload='disk' left the pruned model only in {self.output_dir}: load it there (it fits in memory "
                "to be trained) and use optimum_prune.recovery with its masks."
            )
        masks = Masks.from_pruner(self.model, self.masks) if self.masks else {}
        if not masks and self.report.structure is None:
            raise InputError("This model has no pruning masks to keep: prune it first (nothing was pruned).")
        if dataset is None and self._calibration_source is None:
            raise InputError("Recovery needs training text: pass a dataset (the calibration tokens were a tensor).")
        source, column, source_split = (
            (dataset, text_column, split) if dataset is not None else self._calibration_source
        )
        config = RecoveryConfig(
            max_steps, learning_rate, batch_size, self._training_seq_len(seq_len), distill, lora,
            eval_windows=eval_windows,
        )  # fmt: skip
        if distill and teacher is None:
            teacher = self._dense_teacher()
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="optimum-prune-recover-"))
        if not (resume and (work / "pruned").is_dir()):
            self.save_pretrained(work / "pruned", overwrite=True)  # the pruned model is never lost
        layers = [
            layer.name
            for block in find_target_layers(self.model, self.config.targets, self.config.ignore)
            for layer in block
        ]
        try:
            self.model, self.recovery = recover(
                self.model, self.tokenizer, masks, source, config, work, teacher=teacher, teacher_name=self.source,
                target_layers=layers, text_column=column, split=source_split, resume=resume, progress=self.progress,
                callbacks=callbacks,
            )  # fmt: skip
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error} The pruned model before training is kept in {work / 'pruned'}.") from None
        shutil.rmtree(work / "pruned", ignore_errors=True)  # trained: the copy made in case training failed
        if work_dir is None or not any(work.iterdir()):
            shutil.rmtree(work, ignore_errors=True)
        self._record_metadata()
        return self.recovery

    def prune_while_training(
        self,
        dataset: Any,
        *,
        max_steps: int,
        interval: int | None = None,
        learning_rate: float | None = None,
        batch_size: int = 4,
        seq_len: int | None = None,
        distill: bool = True,
        teacher: nn.Module | None = None,
        work_dir: str | os.PathLike | None = None,
        text_column: str = "text",
        split: str = "train",
        eval_windows: int = 8,
        resume: bool = False,
        callbacks: Sequence[TrainerCallback] = (),
    ) -> PruningReport:
        """Prune gradually while training, instead of `prune` + `recover`: the sparsity of every target layer
        rises to ``config.sparsity`` along a cubic schedule over the first 75% of ``max_steps`` (masks re-chosen
        every ``interval`` steps from running ``|w * grad|`` saliency, default a tenth of those steps), then
        training goes on with the masks fixed. Unstructured, uniform sparsity; or, with ``config.structure``,
        MLP channels and KV groups masked along the same schedule and removed at the end. Trainer checkpoints,
        with the schedule's masks, go to ``work_dir`` (``resume=True`` continues from the last one);
        ``eval_windows`` and ``callbacks``: as in `recover`."""
        from .core.masks import pack_mask
        from .recovery.gradual import (
            SCHEDULE_FILE,
            check_gradual,
            check_same_schedule,
            prune_gradually,
            record_schedule,
            schedule_settings,
        )
        from .recovery.gradual_structure import prune_structure_gradually

        if self.report is not None:
            raise RuntimeError("This model is already pruned; create a new Pruner to prune again.")
        self._check_trainable()
        if self.disk is not None:
            raise InputError("Training needs the model in memory: use offload='cpu'.")
        config = self.config
        check_gradual(config)
        _check_resume(resume, work_dir)
        plan = self._plan_structure()
        layers = find_target_layers(self.model, config.targets, config.ignore)
        recovery = RecoveryConfig(
            max_steps, learning_rate, batch_size, self._training_seq_len(seq_len), distill, eval_windows=eval_windows
        )
        work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="optimum-prune-gradual-"))
        schedule = schedule_settings(config, max_steps, interval)
        if resume:
            check_same_schedule(work, schedule)
        record_schedule(work, schedule)
        teacher = self._dense_teacher() if distill and teacher is None else teacher
        training = {
            "interval": interval, "teacher": teacher, "teacher_name": self.source, "text_column": text_column,
            "split": split, "progress": self.progress, "resume": resume, "callbacks": callbacks,
        }  # fmt: skip
        if plan is not None:
            self.model, self.report, self.recovery = prune_structure_gradually(
                self.model, self.tokenizer, plan, layers, dataset, recovery, work, **training
            )
        else:
            self.model, masks, self.report, self.recovery = prune_gradually(
                self.model, self.tokenizer, config, layers, dataset, recovery, work, **training
            )
            self.masks = {name.removesuffix(".weight"): pack_mask(mask) for name, mask in masks.items()}
        (work / SCHEDULE_FILE).unlink(missing_ok=True)
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()  # it held only the checkpoints, removed once training finished
        self._record_metadata()
        return self.report

    def _check_trainable(self) -> None:
        """Training needs every weight in memory: refuse a model whose weights accelerate offloaded; and it moves
        weights that GPTQ rounded onto a grid off it."""
        if self.config.gptq:
            raise InputError(gptq_with_training(self.config.gptq))
        if self.dispatch is not None and any(parameter.is_meta for parameter in self.model.parameters()):
            raise InputError(
                "Training needs every weight in memory, and accelerate offloaded some of this model's to the CPU or "
                "disk (device_map): save the pruned model, then load it on devices that hold it to train it."
            )

    def _training_seq_len(self, seq_len: int | None) -> int:
        """``seq_len``, checked against the model's context; default: the calibration length, capped at it."""
        context = getattr(self.model.config, "max_position_embeddings", None) or self.config.seq_len
        if seq_len is not None and seq_len > context:
            raise InputError(f"Training seq_len={seq_len} is longer than the model's context of {context} tokens.")
        return seq_len or min(self.config.seq_len, context)

    def _dense_teacher(self) -> nn.Module:
        """The dense model, loaded again from the source, beside the student (same device and dtype)."""
        if self.source is None or not (os.path.isdir(self.source) or "/" in self.source):
            raise InputError("Distillation needs the dense model: pass teacher= (a loaded model), or distill=False.")
        return load_teacher(self.source, next(self.model.parameters()))

    def _record_metadata(self) -> None:
        """Write what the run did (report, recovery, zero-shot scores) into ``config.json``'s metadata."""
        recovery = self.recovery.to_dict() if self.recovery is not None else None
        setattr(self.model.config, METADATA_KEY, build_metadata(self.config, self.report, recovery))

    def evaluate_tasks(
        self, tasks: ZeroShotTasks, dense: list[TaskScore] | None = None, batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Run lm-evaluation-harness ``tasks`` on the pruned model and keep the scores, beside ``dense`` (the same
        tasks on the model before pruning: ``tasks.evaluate(pruner.model, pruner.tokenizer)`` before `prune`),
        in the report, the metadata and the model card; returns the rows (`evaluation.harness.compare`)."""
        if self.report is None:
            raise RuntimeError("Evaluate the pruned model after prune(); evaluate the dense one with tasks.evaluate().")
        rows = compare(dense or [], tasks.evaluate(self.model, self.tokenizer, batch_size))
        self.report.zero_shot = {"harness": tasks.version, "limit": tasks.limit, "rows": rows}
        self._record_metadata()
        if self.output_dir is not None and Ranks.current().main:  # the folder prune() wrote gets the scores too
            with tempfile.TemporaryDirectory(dir=self.output_dir) as staging:
                self.model.config.save_pretrained(staging)
                os.replace(Path(staging) / "config.json", Path(self.output_dir) / "config.json")
        return rows

    def model_card(
        self,
        repo_id: str,
        *,
        format: str = "dense",
        perplexity: dict[str, Any] | None = None,
        base_model: str | None = None,
        plot: str | None = None,
        recovery_plot: str | None = None,
    ) -> ModelCard:
        """The Hub model card of the pruned model (see `optimum_prune.hub.build_model_card`)."""
        from .hub.model_card import build_model_card, hub_base_model

        if self.report is None:
            raise RuntimeError("No model card before pruning: call prune() first.")
        base_model = base_model or hub_base_model(self.source)
        recovery = self.recovery.to_dict() if self.recovery is not None else None
        return build_model_card(
            self.config,
            self.report,
            repo_id,
            base_model=base_model,
            format=format,
            perplexity=perplexity,
            recovery=recovery,
            plot=plot,
            recovery_plot=recovery_plot,
        )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
        format: str = "dense",
        perplexity: dict[str, Any] | None = None,
        base_model: str | None = None,
        onnx_dir: str | os.PathLike | None = None,
    ) -> CommitInfo | None:
        """Create ``repo_id`` if needed and upload the model, tokenizer, ``pruning_config.json`` and a model card
        (README.md) in one commit. ``perplexity={"dataset": ..., "before": x, "after": y}`` goes into the card's
        model-index; ``onnx_dir``, an `export_onnx` folder of this model, goes up beside it as ``onnx/``. Without
        ``token``, the saved one is used; with none at all, nothing is uploaded.
        """
        from .hub.model_card import check_perplexity
        from .hub.push import check_can_push, kept_push_folder, push_folder

        if self.report is None:
            raise RuntimeError("Nothing to push yet: call prune() first.")
        check_format(format)
        check_perplexity(perplexity)
        if onnx_dir is not None and not (Path(onnx_dir) / "model.onnx").is_file():
            raise InputError(f"onnx_dir={onnx_dir} holds no model.onnx: pass the folder export_onnx wrote.")
        if not Ranks.current().main:  # in a distributed run, rank 0 uploads
            return None
        token = check_can_push(token)
        message = commit_message or (
            f"Upload {self.config.method} {self.config.pattern} pruned model "
            f"({self.report.global_sparsity:.1%} sparse) with optimum-prune"
        )
        with tempfile.TemporaryDirectory(prefix="optimum-prune-push-") as tmp:
            folder = Path(tmp) / "model"
            self.save_pretrained(folder, format=format)
            plot, recovery_plot = (
                name if (folder / name).is_file() else None for name in (PLOT_NAME, RECOVERY_PLOT_NAME)
            )
            card = self.model_card(
                repo_id, format=format, perplexity=perplexity, base_model=base_model, plot=plot,
                recovery_plot=recovery_plot,
            )  # fmt: skip
            card.save(folder / "README.md")
            if onnx_dir is not None:
                shutil.copytree(onnx_dir, folder / "onnx")
            try:
                return push_folder(folder, repo_id, token=token, private=private, commit_message=message)
            except Exception as error:  # whatever stopped the upload, the pruned model is not lost
                kept = kept_push_folder(repo_id)
                shutil.move(folder, kept)
                cause = " ".join(str(error).split())[:300] or "no message"
                raise RuntimeError(
                    f"Pushing to {repo_id} failed ({type(error).__name__}: {cause}). The pruned model, its card and "
                    f"config are kept in {kept}: push that folder again with `hf upload {repo_id} {kept} .` (or "
                    "optimum_prune.hub.push_folder)."
                ) from error


def _check_resume(resume: bool, work_dir: str | os.PathLike | None) -> None:
    """Training resumes from the checkpoints of a ``work_dir``: refuse ``resume=True`` without one."""
    if resume and work_dir is None:
        raise InputError("resume=True continues from the checkpoints in work_dir: pass the work_dir= of the run.")
