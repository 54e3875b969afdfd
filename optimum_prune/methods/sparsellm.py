"""SparseLLM (Bai et al., 2024, arXiv 2402.17946): global pruning of each block's feed-forward chain.

The feed-forward chain ``Y = W2 act(W1 X)`` (or ``W_down (act(W_gate X) * W_up X)``) is pruned jointly by
introducing auxiliary variables for the pre-activation ``z = W1 X`` (and ``s = W_gate X``) and the
post-activation ``p = act(z)`` (``act(s) * z``) and minimising, alternately,

    alpha ||z - W1 X||^2 + gamma ||p - act(z)||^2 + beta ||Y - W2 p||^2

over the weights (least squares, then SparseGPT pruning with the Hessian of the layer's *target* inputs:
``X`` for the first layers, the auxiliary ``p`` for the last one) and over ``p`` and ``z`` (closed form; ``s``
by gradient steps), as the reference implementation (github.com/BaiTheBest/SparseLLM) does. Attention and
every other layer outside the chain are pruned with SparseGPT.

The chain is found generically: among the layers whose inputs were recorded (those inside a module named
``mlp``/``ffn``/``feed_forward``, or named ``fc1``/``fc2``), one or two layers reading the same input and a
layer whose inputs are their outputs; the activation is the container's ``act_fn``/``activation_fn``/``act``/
``activation``, and the chain is accepted only if it reproduces the recorded inputs of the last layer. A
block without such a chain is pruned with SparseGPT, with a warning.

Memory: the calibration inputs of the chain are kept on the CPU in float32 chunks of 512 tokens, together
with the auxiliary variables: ``tokens x (2 hidden + 2 intermediate)`` floats per block (``+ intermediate``
for gated MLPs); the device only holds one chunk at a time plus ``intermediate x intermediate`` matrices.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.layers import TargetLayer
from ..core.masks import NMPattern
from ..core.statistics import (
    Hessian,
    LayerStatistic,
    RankGroup,
    add_upper_gram,
    gram_panel,
    inverse_hessian_cholesky,
    mirror_upper,
)
from ..errors import InputError
from ..method_settings import SparseLLMSettings
from .base import BlockContext
from .sparsegpt import SparseGPTPruning, sparsegpt_prune

logger = logging.getLogger(__name__)

CHUNK_TOKENS = 512
HELD_OUT_EVERY = 8  # every 8th chunk of calibration tokens chooses the iterate instead of fitting it
_CONTAINERS = ("mlp", "ffn", "feed_forward")
_CHAIN_LAYERS = ("fc1", "fc2")  # OPT keeps its feed-forward layers directly in the decoder block
_ACTIVATIONS = ("act_fn", "activation_fn", "act", "activation")
_NUMERIC_STEPS = 2  # as the reference's update of s
_CHAIN_TOLERANCE = 0.05  # relative error allowed when checking the chain against the recorded inputs


class RecordedInputs(LayerStatistic):
    """Keeps every calibration input of a layer on the CPU, in float32 chunks of at most 512 tokens of one
    sequence each, so that the chunks do not depend on how the sequences were batched (or split over ranks)."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def update(self, inputs: torch.Tensor) -> None:
        sequences = inputs.detach().to("cpu", torch.float32, copy=True)
        for sequence in sequences.reshape(-1, *sequences.shape[-2:]) if sequences.dim() > 2 else [sequences]:
            self.chunks.extend(sequence.split(CHUNK_TOKENS))

    def sum_over_ranks(self, ranks: RankGroup) -> None:
        """Every rank's chunks, in rank order: the sequences in the order of one process."""
        self.chunks = [chunk for chunks in ranks.gather(self.chunks) for chunk in chunks]

    def gram(self, device: torch.device) -> torch.Tensor:
        """``X^T X`` over all recorded tokens."""
        return _gram(self.chunks, device)


def _gram(chunks: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``X^T X`` of the chunks stacked (upper triangle accumulated, then mirrored)."""
    width = chunks[0].shape[1]
    gram = torch.zeros(width, width, dtype=torch.float32, device=device)
    panel = gram_panel(width)
    for chunk in chunks:
        add_upper_gram(gram, chunk.to(device), panel)
    mirror_upper(gram, panel)
    return gram


@dataclass
class _Linear:
    """A working float32 copy of a target layer on the execution device."""

    layer: TargetLayer
    weight: torch.Tensor
    bias: torch.Tensor
    mask: torch.Tensor | None = None

    @classmethod
    def of(cls, layer: TargetLayer, device: torch.device) -> _Linear:
        bias = getattr(layer.module, "bias", None)
        rows = layer.shape[0]
        bias = torch.zeros(rows, device=device) if bias is None else bias.detach().to(device, torch.float32)
        return cls(layer, layer.matrix().to(device), bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.T)


@dataclass
class FeedForwardChain:
    """``output(act(gate(X)) * up(X))`` when gated, else ``output(act(up(X)))``."""

    up: TargetLayer
    output: TargetLayer
    activation: Callable[[torch.Tensor], torch.Tensor]
    gate: TargetLayer | None = None

    @property
    def layers(self) -> list[TargetLayer]:
        return [layer for layer in (self.gate, self.up, self.output) if layer is not None]

    def hidden(self, up: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return self.activation(up) if gate is None else self.activation(gate) * up


@dataclass
class SparseLLMResult:
    """Masks of the chain; its relative reconstruction error ``||f(X) - Y||^2 / ||Y||^2`` on the fitted tokens
    (`errors`) and on the held-out ones (`held_out_errors`) after each iteration's pruning; `chosen`, the
    iteration written back (0: SparseGPT, then refit on every token)."""

    masks: dict[str, torch.Tensor]
    errors: list[float] = field(default_factory=list)
    held_out_errors: list[float] = field(default_factory=list)
    chosen: int = 0


def records_inputs(layer: TargetLayer) -> bool:
    """Whether SparseLLM keeps ``layer``'s calibration inputs: a candidate link of a feed-forward chain."""
    parts = layer.name.split(".")
    return parts[-1] in _CHAIN_LAYERS or any(part in _CONTAINERS for part in parts[:-1])


def _is_relu(activation: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    probe = torch.linspace(-4.0, 4.0, 81)
    try:
        return torch.allclose(activation(probe), torch.relu(probe))
    except (RuntimeError, TypeError):
        return False


def _container(block: nn.Module, layer: TargetLayer) -> nn.Module:
    for name, module in block.named_modules():
        if module is layer.module:
            return block.get_submodule(name.rpartition(".")[0])
    raise InputError(f"{layer.name} is not inside its decoder block.")


def find_chain(context: BlockContext) -> FeedForwardChain | None:
    """The block's feed-forward chain, checked against the recorded inputs of its last layer, or ``None``."""
    recorded = [layer for layer in context.layers if isinstance(context.statistics.get(layer.name), RecordedInputs)]
    for output in recorded:
        feeders = [
            layer
            for layer in recorded
            if layer is not output
            and layer.shape[0] == output.in_features
            and context.statistics[layer.name] is not context.statistics[output.name]
        ]
        if len(feeders) not in (1, 2) or len({id(context.statistics[layer.name]) for layer in feeders}) != 1:
            continue
        parent = _container(context.block, output)
        activations = [getattr(parent, name) for name in _ACTIVATIONS if callable(getattr(parent, name, None))]
        orders = [(None, feeders[0])] if len(feeders) == 1 else [tuple(feeders), tuple(reversed(feeders))]
        for activation in activations:
            for gate, up in orders:
                chain = FeedForwardChain(up, output, activation, gate)
                if _reproduces(chain, context):
                    return chain
    return None


@torch.no_grad()
def _reproduces(chain: FeedForwardChain, context: BlockContext) -> bool:
    device = chain.up.module.weight.device
    x = context.statistics[chain.up.name].chunks[0][:512].to(device)
    target = context.statistics[chain.output.name].chunks[0][:512].to(device)
    gate = _Linear.of(chain.gate, device)(x) if chain.gate is not None else None
    try:
        hidden = chain.hidden(_Linear.of(chain.up, device)(x), gate)
    except (RuntimeError, TypeError):
        return False
    if hidden.shape != target.shape:
        return False
    return bool((hidden - target).norm() <= _CHAIN_TOLERANCE * target.norm().clamp_min(1e-12))


def _solve(rhs: torch.Tensor, gram: torch.Tensor, dampening: float) -> torch.Tensor:
    """Least squares: the ``W`` minimising ``||W A - B||^2`` given ``rhs = B A^T`` and ``gram = A A^T``
    (dampened like SparseGPT's Hessian, which stands in for the reference's pseudo-inverse)."""
    factor = inverse_hessian_cholesky(gram, dampening)  # upper U with (gram + damp I)^-1 = U^T U
    return (rhs @ factor.T) @ factor


def _descend(
    value: torch.Tensor,
    target: torch.Tensor,
    hidden: torch.Tensor,
    scale: torch.Tensor | None,
    activation: Callable[[torch.Tensor], torch.Tensor],
    alpha: float,
    gamma: float,
) -> torch.Tensor:
    """Minimise ``alpha (v - target)^2 + gamma (hidden - act(v) * scale)^2`` element-wise by gradient steps,
    each scaled by a bound on the element's curvature (``act'`` taken as at most 1.12, as for GELU/SiLU).
    Autograd differentiates the activation alone (one vector-Jacobian product); the rest is written out."""
    weight = 1.0 if scale is None else scale.pow(2)
    step = 1.0 / (2.0 * (alpha + gamma * 1.25 * weight))
    for _ in range(_NUMERIC_STEPS):
        with torch.enable_grad():
            variable = value.detach().requires_grad_(True)
            activated = activation(variable)
        # d/dv of gamma (hidden - act(v) s)^2 is 2 gamma (act(v) s - hidden) s act'(v)
        produced = activated.detach() if scale is None else activated.detach() * scale
        upstream = (produced - hidden).mul_(2.0 * gamma)
        if scale is not None:
            upstream.mul_(scale)
        (gradient,) = torch.autograd.grad(activated, variable, grad_outputs=upstream)
        gradient.add_(value - target, alpha=2.0 * alpha).mul_(step)
        value = value - gradient
    return value


def _relu_preactivation(hidden: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Exact minimiser of ``alpha (z - target)^2 + gamma (hidden - relu(z))^2``: the better of the best
    non-negative and the best non-positive ``z``."""
    positive = ((gamma * hidden + alpha * target) / (gamma + alpha)).clamp_min(0.0)
    negative = target.clamp_max(0.0)

    def cost(z: torch.Tensor) -> torch.Tensor:
        return gamma * (hidden - torch.relu(z)).pow(2) + alpha * (z - target).pow(2)

    return torch.where(cost(positive) <= cost(negative), positive, negative)


def _relative_error(
    chain: FeedForwardChain,
    linears: tuple[_Linear, _Linear | None, _Linear],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    device: torch.device,
) -> float:
    up, gate, output = linears
    error = energy = 0.0
    for x_cpu, y_cpu in zip(inputs, targets, strict=True):
        x, y = x_cpu.to(device), y_cpu.to(device)
        produced = output(chain.hidden(up(x), gate(x) if gate is not None else None))
        error += float((produced - y).pow(2).sum())
        energy += float(y.pow(2).sum())
    return error / max(energy, 1e-30)


@dataclass
class _Auxiliaries:
    """SparseLLM's auxiliary variables per chunk of fitted tokens, on the CPU: pre-activations ``z``, gate
    pre-activations ``s`` (gated MLPs) and post-activations ``p``."""

    pre: list[torch.Tensor]
    gates: list[torch.Tensor]
    post: list[torch.Tensor]


def _refit(
    layers: tuple[_Linear | None, _Linear, _Linear],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    auxiliaries: _Auxiliaries,
    gram_x: torch.Tensor,
    dampening: float,
) -> torch.Tensor:
    """Refit every weight of the chain to the auxiliary variables by least squares; return the Gram matrix of
    ``p``, the last layer's inputs."""
    gate, up, output = layers
    device = up.weight.device
    up_rhs = torch.zeros_like(up.weight)
    gate_rhs = torch.zeros_like(up.weight)
    output_rhs = torch.zeros_like(output.weight)
    for index, x_cpu in enumerate(inputs):
        x, p = x_cpu.to(device), auxiliaries.post[index].to(device)
        up_rhs.addmm_((auxiliaries.pre[index].to(device) - up.bias).T, x)
        if gate is not None:
            gate_rhs.addmm_((auxiliaries.gates[index].to(device) - gate.bias).T, x)
        output_rhs.addmm_((targets[index].to(device) - output.bias).T, p)
    up.weight = _solve(up_rhs, gram_x, dampening)
    if gate is not None:
        gate.weight = _solve(gate_rhs, gram_x, dampening)
    gram_p = _gram(auxiliaries.post, device)
    output.weight = _solve(output_rhs, gram_p, dampening)
    return gram_p


def _update_auxiliaries(
    chain: FeedForwardChain,
    layers: tuple[_Linear | None, _Linear, _Linear],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    auxiliaries: _Auxiliaries,
    alpha: float,
    beta: float,
    gamma: float,
    update: bool,
) -> float:
    """The chain's squared output error over the fitted chunks with the current weights; with ``update``, also
    the closed-form ``p`` and the new ``z`` (and ``s``) of every chunk, one chunk on the device at a time."""
    gate, up, output = layers
    device = up.weight.device
    relu = gate is None and _is_relu(chain.activation)
    if update:
        system = beta * output.weight.T @ output.weight
        system.diagonal().add_(gamma)
        solve_p = torch.cholesky_inverse(torch.linalg.cholesky(system))
    error = 0.0
    for index, x_cpu in enumerate(inputs):
        x, y = x_cpu.to(device), targets[index].to(device)
        up_out = up(x)
        gate_out = gate(x) if gate is not None else None
        error += float((output(chain.hidden(up_out, gate_out)) - y).pow(2).sum())
        if not update:
            continue
        # p: closed form of beta ||Y - W2 p||^2 + gamma ||p - act(z)||^2 with the current z (and s).
        z = auxiliaries.pre[index].to(device)
        s = auxiliaries.gates[index].to(device) if gate is not None else None
        p = (beta * (y - output.bias) @ output.weight + gamma * chain.hidden(z, s)) @ solve_p
        # z (and s): alpha ||z - W1 X||^2 + gamma ||p - act(z)||^2 with the new p.
        if gate is not None:
            a = chain.activation(s)
            z = (alpha * up_out + gamma * a * p) / (alpha + gamma * a.pow(2))
            s = _descend(s, gate_out, p, z, chain.activation, alpha, gamma)
            auxiliaries.gates[index] = s.cpu()
        elif relu:
            z = _relu_preactivation(p, up_out, alpha, gamma)
        else:
            z = _descend(z, up_out, p, None, chain.activation, alpha, gamma)
        auxiliaries.pre[index], auxiliaries.post[index] = z.cpu(), p.cpu()
    return error


def sparsellm_prune(
    chain: FeedForwardChain,
    inputs: list[torch.Tensor],
    hidden: list[torch.Tensor],
    sparsity: float,
    pattern: NMPattern | None,
    *,
    iterations: int,
    alpha: float,
    beta: float,
    gamma: float,
    dampening: float = 0.01,
    block_size: int = 128,
    device: torch.device | str = "cpu",
) -> SparseLLMResult:
    """Prune a feed-forward chain with SparseLLM's alternating optimisation; write the weights back.

    ``inputs`` and ``hidden`` are the chain's calibration inputs and the inputs of its last layer (the dense
    post-activations), as CPU chunks of ``(tokens, features)``; the fitted chunks of ``hidden`` are taken over
    (their entries become ``None``) and replaced by the auxiliary ``p`` as it is updated (no second copy).
    Iteration 0 is SparseGPT on every layer; each later one refits the weights to the auxiliary variables and
    prunes them again.

    With 8 chunks or more, every 8th chunk is held out: the iterate with the lowest error on those tokens is
    written back, so that refits which only fit the calibration tokens better (few tokens for a wide layer)
    are not kept; when that is iteration 0, SparseGPT is rerun on every token. With fewer chunks the iterate
    with the lowest error on the fitted tokens is kept.

    The outer loop stays whole (about 90 lines) so that its order of updates reads against the paper's
    algorithm and the reference implementation; the refit and the auxiliary updates are helpers.
    """
    device = torch.device(device)
    held = list(range(len(inputs) - 1, -1, -HELD_OUT_EVERY)) if len(inputs) >= HELD_OUT_EVERY else []
    fit = [index for index in range(len(inputs)) if index not in held]
    up, output = _Linear.of(chain.up, device), _Linear.of(chain.output, device)
    gate = _Linear.of(chain.gate, device) if chain.gate is not None else None
    first = [layer for layer in (gate, up) if layer is not None]
    held_inputs = [inputs[index] for index in held]
    held_hidden = [hidden[index] for index in held]
    held_targets = [output(p.to(device)).cpu() for p in held_hidden]
    inputs = [inputs[index] for index in fit]

    # Constants: the dense outputs Y; initial auxiliaries: the dense pre-activations z (and s) and p.
    targets, pre, gates, post = [], [], [], []
    for x_cpu, index in zip(inputs, fit, strict=True):
        x = x_cpu.to(device)
        targets.append(output(hidden[index].to(device)).cpu())
        pre.append(up(x).cpu())
        if gate is not None:
            gates.append(gate(x).cpu())
        post.append(hidden[index])
        hidden[index] = None  # p replaces the recorded chunk (below), which is freed with it
    target_energy = sum(float(y.pow(2).sum()) for y in targets)
    gram_x = _gram(inputs, device)
    if held:  # every token's Hessians (fitted + held-out), for SparseGPT on all of them if it is the best iterate
        gram_x_all = gram_x + _gram(held_inputs, device)
    inverse_x = inverse_hessian_cholesky(gram_x, dampening)

    result = SparseLLMResult(masks={})
    best: list[tuple[_Linear, torch.Tensor, torch.Tensor]] = []
    for step in range(iterations):
        auxiliaries = _Auxiliaries(pre, gates, post)
        if step > 0:
            gram_p = _refit((gate, up, output), inputs, targets, auxiliaries, gram_x, dampening)
        else:
            gram_p = _gram(post, device)
            if held:
                gram_p_all = gram_p + _gram(held_hidden, device)
        for layer in first:
            layer.mask = sparsegpt_prune(layer.weight, inverse_x, sparsity, pattern, block_size)
        output.mask = sparsegpt_prune(
            output.weight, inverse_hessian_cholesky(gram_p, dampening, in_place=True), sparsity, pattern, block_size
        )
        error = _update_auxiliaries(
            chain, (gate, up, output), inputs, targets, auxiliaries, alpha, beta, gamma, step < iterations - 1
        )
        result.errors.append(error / max(target_energy, 1e-30))
        if held:
            result.held_out_errors.append(_relative_error(chain, (up, gate, output), held_inputs, held_targets, device))
        scores = result.held_out_errors or result.errors
        if step == 0 or scores[-1] <= min(scores[:-1]):  # the best iterate; SparseGPT's at worst
            result.chosen = step
            best = [(layer, layer.weight.clone(), layer.mask.clone()) for layer in (*first, output)]
    if held and result.chosen == 0:  # SparseGPT, on every token
        inverse_x = inverse_hessian_cholesky(gram_x_all, dampening, in_place=True)
        inverse_p = inverse_hessian_cholesky(gram_p_all, dampening, in_place=True)
        best = []
        for linear, inverse in [(gate, inverse_x), (up, inverse_x), (output, inverse_p)]:
            if linear is not None:
                weight = linear.layer.matrix().to(device)
                best.append((linear, weight, sparsegpt_prune(weight, inverse, sparsity, pattern, block_size)))
    for layer, weight, mask in best:
        layer.layer.write(weight)
        result.masks[layer.layer.name] = mask
    return result


class SparseLLMPruning(SparseGPTPruning):
    name = "sparsellm"
    settings_class = SparseLLMSettings
    joint = True

    def __init__(self, settings: SparseLLMSettings | None = None) -> None:
        super().__init__(settings)
        self._warned: set[bool] = set()
        self.errors: dict[int, list[float]] = {}

    def block_costs(self, layers: list[list[TargetLayer]], tokens: int) -> tuple[int, float]:
        """Host bytes of the largest block's recorded chain inputs, auxiliary variables and Gram matrices, and the
        FLOPs of every block's iterations after the first (Gram matrices, refits, the auxiliary updates and one
        more SparseGPT pass over the chain per iteration)."""
        peak, flops = 0, 0.0
        for block in layers:
            chain = [layer for layer in block if records_inputs(layer)]
            if not chain:
                continue
            width, inner = min(layer.in_features for layer in chain), max(layer.in_features for layer in chain)
            per_token = 2 * width + (3 if len(chain) > 2 else 2) * inner
            peak = max(peak, 4 * (tokens * per_token + 4 * inner * inner))
            pruning = sum(2 * rows * cols * cols + 3 * cols**3 for rows, cols in (layer.shape for layer in chain))
            flops += (self.settings.iterations - 1) * (
                4 * tokens * inner * inner + 14 * tokens * width * inner + pruning
            )
        return peak, flops

    def make_statistic(self, layer: TargetLayer, device: torch.device) -> LayerStatistic:
        return RecordedInputs() if records_inputs(layer) else Hessian(layer.in_features, device)

    def prune_matrix(
        self, weight: torch.Tensor, statistic: LayerStatistic, sparsity: float, pattern: NMPattern | None
    ) -> torch.Tensor:
        if not isinstance(statistic, RecordedInputs):
            return super().prune_matrix(weight, statistic, sparsity, pattern)
        inverse = inverse_hessian_cholesky(statistic.gram(weight.device), self.settings.dampening, in_place=True)
        return sparsegpt_prune(weight, inverse, sparsity, pattern, self.settings.block_size)

    def prune_block(self, context: BlockContext) -> dict[str, torch.Tensor]:
        chain = find_chain(context)
        others = [layer for layer in context.layers if chain is None or layer not in chain.layers]
        if chain is None and any(isinstance(s, RecordedInputs) for s in context.statistics.values()):
            self._warn(context)
        masks = super().prune_block(dataclasses.replace(context, layers=others))
        if chain is None:
            return masks
        settings = self.settings
        result = sparsellm_prune(
            chain,
            context.statistics[chain.up.name].chunks,
            context.statistics[chain.output.name].chunks,
            context.sparsity,
            context.pattern,
            iterations=settings.iterations,
            alpha=settings.alpha,
            beta=settings.beta,
            gamma=settings.gamma,
            dampening=settings.dampening,
            block_size=settings.block_size,
            device=chain.up.module.weight.device,
        )
        self.errors[context.index] = result.errors
        logger.info(
            "SparseLLM block %d: feed-forward reconstruction error %s (held out: %s); kept iteration %d",
            context.index,
            " -> ".join(f"{e:.4g}" for e in result.errors),
            " -> ".join(f"{e:.4g}" for e in result.held_out_errors) or "none",
            result.chosen,
        )
        return {**masks, **result.masks}

    def _warn(self, context: BlockContext) -> None:
        experts = any(layer.expert is not None for layer in context.layers)
        if experts not in self._warned:  # once for blocks, once for experts
            logger.warning(
                "SparseLLM found no feed-forward chain (fc1 -> act -> fc2 or gate/up -> act * up -> down) among "
                "the target layers of %s; they are pruned with SparseGPT (reported once).",
                "the fused experts (their gate and up share one matrix)" if experts else f"block {context.index}",
            )
            self._warned.add(experts)
