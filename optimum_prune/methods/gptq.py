"""GPTQ (Frantar et al., 2022, arXiv 2210.17323) onto the grid of an int4 or int8 ONNX export.

`export_onnx(quantize="int4" | "int8")` quantizes weights with onnxruntime's ``MatMulNBits`` rounding: for each
output channel, blocks of `NBITS_BLOCK` consecutive inputs share one scale, ``scale = v / -2**(bits - 1)`` where ``v``
is the block's weight of largest magnitude, and each weight becomes ``clamp(round(w / scale), -2**(bits - 1),
2**(bits - 1) - 1) * scale``. Rounding every weight to its nearest grid point on its own (what the export does to
a float model) ignores the calibration inputs; GPTQ instead rounds the input columns one by one and compensates
each column's rounding error on the columns not yet rounded, through the layer's inverse Hessian (the same
Optimal Brain Surgeon step SparseGPT takes for pruned weights; the SparseGPT paper does both in one pass).

The result stays a float model whose weights already lie on that grid: each block keeps its scale-defining weight
at ``-2**(bits - 1)`` steps, so that onnxruntime's quantizer finds the same scale and reproduces every weight
exactly (tested), and a pruned weight stays exactly zero. `GPTQRounded` wraps any per-layer pruning method: the
method chooses the mask, then the kept weights are rounded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..core.layers import TargetLayer
from ..core.masks import NMPattern
from ..core.statistics import Hessian, LayerStatistic, inverse_hessian_cholesky
from ..errors import InputError
from ..method_settings import NBITS_BLOCK
from .base import BlockContext, PruningMethod, WrappedMethod
from .refit import WithHessian, _probe_layer

GPTQ_DAMPENING = 0.01  # of the mean Hessian diagonal (GPTQ's percdamp), when the method does not invert it itself
PANEL = 128  # columns whose errors reach the later columns in one matrix product (GPTQ's lazy batch)


@dataclass(frozen=True)
class Grid:
    """A symmetric grid of codes ``low..high`` with one scale per `NBITS_BLOCK` inputs, set by the block's weight
    ``v`` of largest magnitude: ``v / low`` (``v`` takes code ``low``: MatMulNBits, GGUF Q4_0) or ``|v| / high``
    (``v`` takes ``±high``: GGUF Q8_0), the scale stored in float16 for GGUF (``half``)."""

    low: int
    high: int
    by_low: bool
    half: bool

    def extreme_codes(self, values: torch.Tensor) -> torch.Tensor:
        """The code each block's scale-defining weight takes (``values``: those weights)."""
        if self.by_low:
            return torch.full_like(values, float(self.low))
        return torch.where(values < 0, -float(self.high), float(self.high))

    def scales(self, values: torch.Tensor) -> torch.Tensor:
        scales = values / self.extreme_codes(values)
        return scales.half().float() if self.half else scales


GRIDS = {  # what `export_onnx(quantize=...)` and `export_gguf(quantize=...)` store, by name
    "int4": Grid(-8, 7, by_low=True, half=False),
    "int8": Grid(-128, 127, by_low=True, half=False),
    "q4_0": Grid(-8, 7, by_low=True, half=True),  # d = max / -8 in fp16, w = d * (q - 8)
    "q8_0": Grid(-127, 127, by_low=False, half=True),  # d = amax / 127 in fp16, w = d * q
}


def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, pruned: torch.Tensor, grid: Grid, dampening: float = GPTQ_DAMPENING
) -> None:
    """Round a float32 ``(out, in)`` ``weight`` in place onto ``grid`` (`NBITS_BLOCK` inputs per scale), given the
    layer's Hessian ``H`` (left unchanged); weights where ``pruned`` stay exactly zero (their drift is rounded to
    zero like any error).

    Each block's scale is fixed first, from the weights as they come (GPTQ's static groups), so that columns can
    be rounded in order of decreasing ``H_jj`` (GPTQ's act-order: the inputs that carry the most energy first,
    while the most columns are left to take their error); each column's error is compensated on the columns not
    yet rounded through the upper Cholesky factor of the permuted ``H^-1``, lazily in panels of `PANEL`."""
    low, high = grid.low, grid.high
    rows, cols = weight.shape
    kept = weight.masked_fill(pruned, 0.0)
    blocks = torch.nn.functional.pad(kept, (0, -cols % NBITS_BLOCK)).view(rows, -1, NBITS_BLOCK)
    extreme = blocks.abs().argmax(-1)  # (rows, blocks): the weight that sets each block's scale
    values = blocks.gather(-1, extreme.unsqueeze(-1)).squeeze(-1)
    codes = grid.extreme_codes(values)
    scales = grid.scales(values)
    order = torch.argsort(hessian.diagonal(), descending=True)
    inverse = inverse_hessian_cholesky(hessian[order][:, order], dampening)
    columns = kept[:, order].T.contiguous()  # one input column per row, in the order they are rounded
    removed = pruned[:, order].T.contiguous()
    errors = torch.empty_like(columns[:PANEL])
    sources = order.tolist()  # the input each rounded column was
    for start in range(0, cols, PANEL):
        end = min(start + PANEL, cols)
        for i in range(start, end):
            block, place = divmod(sources[i], NBITS_BLOCK)
            scale = scales[:, block]
            steps = torch.where(scale != 0, columns[i] / torch.where(scale != 0, scale, 1.0), 0.0)
            steps = steps.round_().clamp_(low, high)
            sets_scale = extreme[:, block] == place  # the scale-defining weight: exactly where the export expects it
            steps[sets_scale] = codes[sets_scale, block]
            rounded = (steps * scale).masked_fill_(removed[i], 0.0)
            torch.div(columns[i] - rounded, inverse[i, i], out=errors[i - start])
            columns[i] = rounded
            columns[i + 1 : end].addr_(inverse[i, i + 1 : end], errors[i - start], alpha=-1)
        columns[end:].addmm_(inverse[start:end, end:].T, errors[: end - start], alpha=-1)
    weight[:, order] = columns.T


class GPTQRounded(WrappedMethod):
    """``method``'s masks, then the kept weights rounded by GPTQ onto the grid of an ``quantize`` ONNX export."""

    def __init__(self, method: PruningMethod, quantize: str) -> None:
        if quantize not in GRIDS:
            raise InputError(f"gptq={quantize!r}: choose one of {', '.join(GRIDS)} (the exported weights).")
        super().__init__(method, "gptq= rounds each layer on its own after a per-layer method.")
        self.grid = GRIDS[quantize]
        self.dampening = getattr(method.settings, "dampening", GPTQ_DAMPENING)
        probe = method.make_statistic(_probe_layer(), torch.device("meta")) if method.needs_statistics else None
        self._adds_hessian = not isinstance(probe, (Hessian, WithHessian))

    def statistic_bytes(self, rows: int, cols: int) -> int:
        return self.method.statistic_bytes(rows, cols) + (cols * cols * 4 if self._adds_hessian else 0)

    def working_bytes(self, rows: int, cols: int) -> int:
        # the Hessian kept from the method, its permuted copy and inverse; the permuted weight and its errors
        return max(self.method.working_bytes(rows, cols), 3 * cols * cols * 4 + 3 * rows * cols * 4)

    def pruning_flops(self, rows: int, cols: int, tokens: int) -> float:
        accumulate = 2.0 * cols * cols * tokens if self._adds_hessian else 0.0
        return self.method.pruning_flops(rows, cols, tokens) + accumulate + 2.0 * rows * cols * cols + 3 * cols**3

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> LayerStatistic:
        own = self.method.make_statistic(layer, device) if self.method.needs_statistics else None
        return WithHessian(own, Hessian(layer.in_features, device)) if self._adds_hessian else own

    def prune_matrix(
        self, weight: torch.Tensor, statistic: LayerStatistic, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        hessian = self._hessian(statistic).matrix.clone()  # before the method may turn it into its inverse
        mask = self.method.prune_matrix(weight, self._own(statistic), sparsity, pattern)
        weight.masked_fill_(mask, 0.0)
        gptq_round(weight, hessian, mask, self.grid, self.dampening)
        return mask

    def prune_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        """The method prunes the block (with its own statistics and its own report), then each layer's kept
        weights are rounded on its Hessian, kept aside before the method (q/k/v and gate/up share one)."""
        hessians: dict[int, torch.Tensor] = {}
        for layer in context.layers:
            hessian = self._hessian(context.statistics[layer.name])
            if id(hessian) not in hessians:
                hessians[id(hessian)] = hessian.matrix.clone()
        own = {name: self._own(statistic) for name, statistic in context.statistics.items()}
        masks = self.method.prune_block(dataclasses.replace(context, statistics=own))
        for layer in context.layers:
            weight = layer.matrix()
            hessian = hessians[id(self._hessian(context.statistics[layer.name]))]
            gptq_round(weight, hessian, masks[layer.name], self.grid, self.dampening)
            layer.write(weight)
        return masks

    def _own(self, statistic: LayerStatistic) -> LayerStatistic | None:
        """The method's own statistic inside ours."""
        return statistic.own if self._adds_hessian else statistic

    @staticmethod
    def _hessian(statistic: LayerStatistic) -> Hessian:
        return statistic if isinstance(statistic, Hessian) else statistic.hessian
