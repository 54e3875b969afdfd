"""The settings of each method, importable without torch: the CLI builds a flag for every field of every
settings class at start-up (``optimum-cli`` builds its parsers then), so nothing heavy may load here. A method
with settings declares its class here and names it in its ``settings_class``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core.masks import NMPattern


GPTQ_BITS = {"int4": 4, "int8": 8}  # the ONNX quantizations GPTQ rounds onto (`methods.gptq`): their bits
GPTQ_GRIDS = (*GPTQ_BITS, "q4_0", "q8_0")  # every grid gptq= rounds onto: the ONNX ones, then GGUF's
NBITS_BLOCK = 32  # input rows per scale of MatMulNBits weights: the ONNX export's blocks, GPTQ's groups


@dataclass
class MethodSettings:
    """A method's own settings. Subclasses add fields with a ``metadata={"help": ...}`` (the CLI offers a flag for
    each, ``--block-size`` for ``block_size``) and cross-check them against the pattern in `check`. Numbers are
    checked here: integers positive, floats finite and not negative."""

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.type in (int, "int") and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{item.name} must be a positive integer, got {value!r}.")
            if item.type in (float, "float"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{item.name} must be a finite number, got {value!r}.")
                if value < 0:
                    raise ValueError(f"{item.name} must be >= 0, got {value!r}.")

    def check(self, pattern: NMPattern | None) -> None:
        """Refuse settings that cannot serve ``pattern``."""

    @classmethod
    def from_dict(cls, method: str, values: dict[str, Any]) -> MethodSettings:
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(
                f"Method {method!r} has no setting {', '.join(unknown)}; its settings: {', '.join(known) or 'none'}."
            )
        return cls(**values)


@dataclass
class SparseGPTSettings(MethodSettings):
    block_size: int = field(default=128, metadata={"help": "lazy-update block size, in columns"})
    dampening: float = field(default=0.01, metadata={"help": "added to the Hessian diagonal, times its mean"})

    def check(self, pattern: NMPattern | None) -> None:
        if pattern is not None and self.block_size % pattern.m:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of M={pattern.m} for {pattern}: its N:M groups "
                "must not straddle two lazy-update blocks."
            )


@dataclass
class SparseLLMSettings(SparseGPTSettings):
    iterations: int = field(default=10, metadata={"help": "alternating optimisation rounds per block"})
    alpha: float = field(default=5.0, metadata={"help": "weight of the pre-activation penalty"})
    beta: float = field(default=5.0, metadata={"help": "weight of the output penalty"})
    gamma: float = field(default=5.0, metadata={"help": "weight of the post-activation penalty"})

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "beta", "gamma"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive (SparseLLM's penalty weight), got {getattr(self, name)!r}.")


@dataclass
class ALPSSettings(MethodSettings):
    rho: float = field(default=0.1, metadata={"help": "initial ADMM penalty of the scaled problem"})
    max_iterations: int = field(default=300, metadata={"help": "most ADMM iterations per layer"})
    update_every: int = field(default=3, metadata={"help": "ADMM iterations between penalty updates"})
    refit_iterations: int = field(
        default=10, metadata={"help": "conjugate-gradient steps refining the kept weights (also --refit's)"}
    )
    dampening: float = field(default=0.01, metadata={"help": "added to the Hessian diagonal, times its mean"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.rho > 0:
            raise ValueError(f"rho must be positive (the ADMM penalty), got {self.rho!r}.")


RECONSTRUCTION_INPUTS = ("pruned", "dense")
RECONSTRUCTION_LOSSES = ("normalized", "mse")


@dataclass
class ReconstructionSettings:
    """Block-wise reconstruction (`engine.reconstruct`): after each block is pruned, its kept weights (masks frozen;
    norms and biases too) are trained for ``epochs`` passes over the calibration batches so that the block
    reproduces the dense block's outputs. ``inputs``: the hidden states the block is fed, the pruned model's
    (``"pruned"``, the targets being the dense block's outputs for them) or the dense model's (``"dense"``, Shin et
    al.'s global propagation: a second stream of activations is kept). ``held_out``: the share of each rank's
    calibration batches kept aside to judge the result (a block keeps its trained weights only if their error
    fell). ``loss``: ``"normalized"`` divides each hidden channel's squared error by that channel's mean square in
    the targets, so that a few massive-activation channels do not outweigh the rest; ``"mse"`` is plain."""

    epochs: int = field(default=2, metadata={"help": "passes over the calibration batches per block"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate, decayed linearly to 0"})
    inputs: str = field(
        default="pruned", metadata={"help": "the hidden states each block learns from: pruned or dense"}
    )
    held_out: float = field(default=0.125, metadata={"help": "share of the calibration batches kept to judge it"})
    loss: str = field(default="normalized", metadata={"help": "normalized (per hidden channel) or mse"})

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"reconstruction epochs={self.epochs!r} must be a positive integer.")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < math.inf:
            raise ValueError(f"reconstruction lr={self.lr!r} must be a positive number (Adam's learning rate).")
        if self.inputs not in RECONSTRUCTION_INPUTS:
            raise ValueError(
                f"reconstruction inputs={self.inputs!r}: choose one of {', '.join(RECONSTRUCTION_INPUTS)}."
            )
        if self.loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction loss={self.loss!r}: choose one of {', '.join(RECONSTRUCTION_LOSSES)}.")
        if isinstance(self.held_out, bool) or not isinstance(self.held_out, (int, float)) or not 0 < self.held_out < 1:
            raise ValueError(
                f"reconstruction held_out={self.held_out!r} must be in (0, 1): the share of calibration batches that "
                "judges whether a block's training helped."
            )

    def split(self, batches: int) -> tuple[int, int]:
        """Training and held-out batches out of ``batches`` (at least one held out)."""
        held = max(1, round(self.held_out * batches))
        return batches - held, held

    @classmethod
    def from_value(cls, value: bool | dict[str, Any] | ReconstructionSettings | None) -> ReconstructionSettings | None:
        """``True`` (the defaults), a dict of fields, the settings themselves, or ``None``/``False`` (off)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = [item.name for item in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"reconstruct has no setting {', '.join(unknown)}; its settings: {', '.join(known)}.")
            return cls(**value)
        raise TypeError(f"reconstruct must be True, a dict of settings or ReconstructionSettings, got {value!r}.")


def all_settings_fields() -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """Every settings field of every method, by name, with the settings classes that have it (a shared name
    such as ``dampening`` means the same thing in each): what the CLI turns into flags."""
    fields: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    pending = [MethodSettings]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        for item in dataclasses.fields(cls):
            fields.setdefault(item.name, (item, []))[1].append(cls.__name__.removesuffix("Settings"))
    return fields
