"""`PruningConfig`: everything that defines a pruning run, validated and serialisable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .core.experts import EXPERT_CALIBRATIONS
from .core.masks import NMPattern
from .errors import InputError
from .method_settings import GPTQ_GRIDS, ReconstructionSettings
from .methods import MethodSettings, method_class
from .structured.spec import Structure

CONFIG_NAME = "pruning_config.json"
ALLOCATIONS = ("uniform", "owl")
_FINITE_FIELDS = ("owl_m", "owl_lambda")
# Method settings that pruning_config.json files of version 0.1 kept at the top level, by their new name.
_LEGACY_SETTINGS = {
    "block_size": "block_size",
    "dampening": "dampening",
    "sparsellm_iterations": "iterations",
    "sparsellm_alpha": "alpha",
    "sparsellm_beta": "beta",
    "sparsellm_gamma": "gamma",
}


@dataclass
class PruningConfig:
    """How to prune a model.

    Args:
        method: a name from `optimum_prune.methods.METHODS`: ``"magnitude"``, ``"wanda"``, ``"sparsegpt"``,
            ``"sparsellm"``.
        sparsity: fraction of the target weights set to zero, ``0 <= sparsity < 1``. With an ``N:M``
            pattern it defaults to (and must equal) ``1 - N/M``.
        pattern: ``"unstructured"`` or ``"N:M"`` (keep ``N`` weights in every group of ``M`` consecutive
            input columns, e.g. ``"2:4"``).
        allocation: ``"uniform"`` (every block gets ``sparsity``) or ``"owl"`` (outlier-weighted layerwise
            sparsity, arXiv 2310.05175).
        owl_m: OWL outlier threshold: a score is an outlier above ``owl_m`` times its block's mean.
        owl_lambda: OWL spread: block sparsities lie in ``[sparsity - owl_lambda, sparsity + owl_lambda]``.
        targets: glob patterns (``fnmatch``) of module names to prune; default: every linear layer inside the
            decoder blocks.
        ignore: glob patterns of module names never to prune (applied after ``targets``).
        num_samples: number of calibration sequences.
        seq_len: tokens per calibration sequence.
        seed: seed of the calibration sampling.
        dataset: name of the calibration data, recorded in the metadata (set by `Pruner.prune`).
        batch_size: calibration sequences per forward pass.
        structure: structured pruning, ``{"mlp": 0.25, "attention": 0.33, "layers": 0.1}`` (fractions removed;
            also ``align``, ``compensate`` and ``layer_criterion``, or a budget ``{"params": 0.7}`` (the share of
            parameters kept, the mix searched), see `optimum_prune.structured.spec.Structure`): the model gets
            smaller, and ``method`` chooses what to remove. With a structure, ``sparsity`` defaults to 0 (an
            unstructured sparsity or pattern given beside it prunes the smaller model afterwards).
        settings: the method's own settings, a dict or its settings object (``{"dampening": 0.02}`` for
            SparseGPT: ``block_size``, ``dampening``; SparseLLM adds ``iterations``, ``alpha``, ``beta``,
            ``gamma``). Default: the method's defaults.
        expert_calibration: how the experts of a mixture of experts are calibrated: ``"routed"`` (the tokens
            the router sends each expert), ``"all"`` (every token through every expert) or ``"weighted"`` (the
            routed tokens scaled by their gate weight, as MoE-Pruner); see `optimum_prune.core.experts`.
        min_expert_tokens: with ``"routed"``/``"weighted"``, an expert routed fewer calibration tokens than this
            is calibrated on every token (0: never).
        refit: after each layer's mask is chosen, solve its kept weights for the least reconstruction error on
            the calibration inputs (conjugate gradients on the fixed support, as ALPS does); the report gives
            each layer's error before and after. Any method that prunes layers one by one (``alps`` always does).
        reconstruct: ``True`` (the defaults), a dict or `ReconstructionSettings`: after each block is pruned, train
            its kept weights (masks frozen) so that it reproduces the dense block's outputs on the calibration
            batches (`optimum_prune.engine.reconstruct`); a block keeps them only if its held-out error fell.
        gptq: ``"int4"`` or ``"int8"`` (or GGUF's ``"q4_0"``, ``"q8_0"``): after each layer's mask (and refit), round
            its kept weights by GPTQ onto the grid of `export_onnx(quantize=...)` (`export_gguf`) with the same name, each rounding error compensated on the
            calibration inputs (`optimum_prune.methods.gptq`): the saved model stays float, its ONNX export
            quantizes to exactly these weights and loses less quality than rounding each weight on its own. With
            a structure, the smaller model is rounded after it is pruned. Any per-layer method.
    """

    method: str = "sparsegpt"
    sparsity: float | None = None
    pattern: str = "unstructured"
    allocation: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    targets: list[str] | None = None
    ignore: list[str] = field(default_factory=list)
    num_samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    dataset: str | None = None
    batch_size: int = 8
    structure: Structure | dict[str, Any] | None = None
    settings: MethodSettings | dict[str, Any] | None = None
    expert_calibration: str = "routed"
    min_expert_tokens: int = 64
    refit: bool = False
    gptq: str | None = None
    reconstruct: ReconstructionSettings | dict[str, Any] | bool | None = None

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        settings_class = method_class(self.method).settings_class
        if self.settings is None:
            self.settings = settings_class()
        elif isinstance(self.settings, dict):
            self.settings = settings_class.from_dict(self.method, self.settings)
        elif type(self.settings) is not settings_class:
            raise TypeError(
                f"settings for method {self.method!r} must be a {settings_class.__name__} or a dict, got "
                f"{type(self.settings).__name__}."
            )
        try:
            self.reconstruct = ReconstructionSettings.from_value(self.reconstruct)
        except ValueError as error:
            raise InputError(str(error)) from None
        if self.allocation not in ALLOCATIONS:
            raise InputError(f"Unknown allocation {self.allocation!r}: choose one of {', '.join(ALLOCATIONS)}.")
        for name in _FINITE_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}.")
        nm = self.nm_pattern  # validates the pattern string
        if self.structure is not None:
            self.structure = Structure.from_value(self.structure)
        if self.sparsity is None:
            self.sparsity = nm.sparsity if nm is not None else 0.0 if self.structure is not None else 0.5
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a number in [0, 1), got {self.sparsity!r}.")
        self.sparsity = float(self.sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise InputError(
                f"sparsity must be in [0, 1), got {self.sparsity}: it is the fraction of weights set to zero "
                "(0.5 prunes half of them)."
            )
        if nm is not None and abs(self.sparsity - nm.sparsity) > 1e-9:
            raise InputError(
                f"pattern {self.pattern!r} fixes the sparsity at {nm.sparsity:g}, but sparsity={self.sparsity:g} "
                "was given: drop `sparsity` or use the unstructured pattern."
            )
        if self.allocation == "owl":
            if nm is not None:
                raise InputError(
                    "allocation='owl' varies the sparsity per block, which an N:M pattern fixes: use "
                    "pattern='unstructured' with OWL, or allocation='uniform' with N:M."
                )
            if not (0.0 <= self.owl_lambda <= self.sparsity and self.sparsity + self.owl_lambda < 1.0):
                raise InputError(
                    f"owl_lambda={self.owl_lambda} must keep every block sparsity in [0, 1): use "
                    f"0 <= owl_lambda <= {self.sparsity:g} and owl_lambda < {1.0 - self.sparsity:g} "
                    f"for sparsity {self.sparsity:g}."
                )
            if self.owl_m <= 0:
                raise InputError(f"owl_m must be positive, got {self.owl_m}.")
        for name in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}.")
        if self.expert_calibration not in EXPERT_CALIBRATIONS:
            raise InputError(
                f"Unknown expert_calibration {self.expert_calibration!r}: choose one of {', '.join(EXPERT_CALIBRATIONS)}."
            )
        if (
            isinstance(self.min_expert_tokens, bool)
            or not isinstance(self.min_expert_tokens, int)
            or self.min_expert_tokens < 0
        ):
            raise InputError(f"min_expert_tokens must be an integer >= 0, got {self.min_expert_tokens!r}.")
        self.settings.check(nm)
        if not isinstance(self.refit, bool):
            raise TypeError(f"refit must be True or False, got {self.refit!r}.")
        if self.gptq is not None and self.gptq not in GPTQ_GRIDS:
            raise InputError(
                f"gptq={self.gptq!r}: choose one of {', '.join(GPTQ_GRIDS)} (the --onnx-quantize or --gguf-type weights "
                "it rounds onto), or leave it unset."
            )
        wrappers = {"refit": "re-solves", "gptq": "rounds"}  # what each does to every layer's kept weights on its own
        for name, does in wrappers.items():
            if getattr(self, name) and method_class(self.method).joint:
                raise InputError(
                    f"{name}={getattr(self, name)!r} {does} each layer's kept weights on its own, but method "
                    f"{self.method!r} prunes the layers of a block jointly: drop {name}, or choose a per-layer method."
                )
        if self.reconstruct is not None:
            self._check_reconstruct()
        if isinstance(self.targets, str) or isinstance(self.ignore, str):
            raise TypeError("targets and ignore are lists of glob patterns, e.g. ['*.mlp.*'].")
        self.ignore = list(self.ignore)
        if self.targets is not None:
            self.targets = list(self.targets)

    def _check_reconstruct(self) -> None:
        """Reconstruction needs calibration batches to train on and to hold out, and comes before any rounding."""
        batches = math.ceil(self.num_samples / self.batch_size)
        if self.reconstruct.split(batches)[0] < 1:
            raise InputError(
                f"reconstruct trains on calibration batches and judges on held-out ones, and num_samples="
                f"{self.num_samples} with batch_size={self.batch_size} makes {batches}: use num_samples >= "
                f"{2 * self.batch_size}, or a smaller batch_size."
            )
        if self.gptq:
            raise InputError(
                f"reconstruct with gptq={self.gptq!r}: the rounding would have to follow the training, and GPTQ rounds "
                "inside the method: reconstruct without gptq, or round without reconstruct."
            )

    @property
    def nm_pattern(self) -> NMPattern | None:
        """The parsed ``N:M`` pattern, or ``None`` when unstructured."""
        return NMPattern.parse(self.pattern)

    @property
    def needs_calibration(self) -> bool:
        """Whether the run needs calibration data (all but uniform magnitude pruning do)."""
        return self.calibration_needed_by is not None

    @property
    def calibration_needed_by(self) -> str | None:
        """What in the recipe needs calibration data (``"method 'wanda'"``, ``"refit=True"``...), or ``None``."""
        structure = self.structure
        needs = {
            f"method {self.method!r}": method_class(self.method).needs_statistics,
            f"{self.allocation} allocation": self.allocation != "uniform",
            "refit=True": self.refit,
            "reconstruct": self.reconstruct is not None,
            f"gptq={self.gptq!r}": bool(self.gptq),
            f"structure {structure}": structure is not None
            and (structure.compensate or bool(structure.layers or structure.experts or structure.is_budget)),
        }
        return next((what for what, needed in needs.items() if needed), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        """A config from `to_dict`'s output; files of version 0.1, with the method settings at the top level,
        read too."""
        data = dict(data)
        legacy = {new: data.pop(old) for old, new in _LEGACY_SETTINGS.items() if old in data}
        if legacy:
            method = method_class(str(data.get("method", cls.method)).lower())
            names = {field.name for field in dataclasses.fields(method.settings_class)}
            data["settings"] = {**{k: v for k, v in legacy.items() if k in names}, **(data.get("settings") or {})}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown PruningConfig fields {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write ``pruning_config.json`` into ``save_directory`` and return its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> PruningConfig:
        """Read a config from a folder holding ``pruning_config.json`` or from a JSON file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No pruning config at {path}: expected a {CONFIG_NAME} file.")
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def gptq_with_training(gptq: str) -> str:
    """The refusal of recovery training after ``gptq=`` rounding (it would move the rounded weights off the grid)."""
    return (
        f"gptq={gptq!r} rounds the kept weights onto the {gptq} grid as they are pruned, and training would move them "
        "off it: recover without gptq, then export with quantize= (each weight rounded on its own)."
    )
