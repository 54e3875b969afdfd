"""ALPS against its reference implementation, layer by layer, on the same Hessians.

The reference is the authors' ``alps.py`` (github.com/mazumder-lab/ALPS), read from a local copy given with
``--reference`` and run on the CPU (its hard-wired ``cuda:0`` replaced by ``cpu``; nothing else changed). For
each layer of one decoder block of a small real model, both solve the same problem from the same calibration
inputs (the dense model's, C4 sample, seed 0); the script prints and records each one's relative
reconstruction error ``||X (W_hat - W)||^2 / ||X W||^2`` on the dampened, scaled Hessian (the reference's own
measure), beside SparseGPT's and Wanda + refit's on the same layer. ``tests/test_alps.py`` checks optimum-prune's
errors against the recorded reference errors.

    python benchmarks/alps_reference.py --reference /path/to/ALPS/alps.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.markdown import table, write_section
from benchmarks.models import ASSETS, C4_SAMPLE
from optimum_prune.calibration import calibration_ids, load_texts
from optimum_prune.core.layers import find_target_layers
from optimum_prune.core.masks import NMPattern
from optimum_prune.methods import BlockContext, get_method

RESULTS = Path(__file__).resolve().parent / "results" / "alps-reference.json"
MODEL = "stories260K"
BLOCK = 1
SAMPLES, SEQ_LEN = 16, 256
SETTINGS = {"50%": (0.5, None), "70%": (0.7, None), "2:4": (0.5, NMPattern(2, 4))}


def layer_inputs(model_path: Path) -> tuple[dict[str, torch.Tensor], list]:
    """Every target layer's calibration inputs in block `BLOCK` of the dense model, ``(tokens, in)``."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts, _ = load_texts(C4_SAMPLE)
    ids = calibration_ids(texts, tokenizer, SAMPLES, SEQ_LEN, 0)
    layers = find_target_layers(model)[BLOCK]
    inputs: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = [
        layer.module.register_forward_pre_hook(
            lambda module, args, name=layer.name: inputs[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks).float() for name, chunks in inputs.items()}, layers


def ours(method: str, weight: torch.Tensor, x: torch.Tensor, sparsity: float, pattern, refit: bool = False) -> float:
    """optimum-prune's relative error on one layer (``weight`` ``(out, in)``, inputs ``x``)."""
    from optimum_prune.core.layers import TargetLayer
    from optimum_prune.methods.refit import ScaledHessian

    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data.copy_(weight)
    layer = TargetLayer("layer", module, 0)
    pruning = get_method(method, refit=refit)
    statistic = pruning.make_statistic(layer, torch.device("cpu"))
    statistic.update(x)
    reference_problem = ScaledHessian.from_matrix(2 * x.T @ x / x.shape[0], 0.01)
    pruning.prune_block(BlockContext(0, module, [layer], {"layer": statistic}, sparsity, pattern))
    scale = reference_problem.scale.unsqueeze(0)
    return reference_problem.error(module.weight.detach() * scale, weight * scale)


def reference(module_source: str, weight: torch.Tensor, x: torch.Tensor, sparsity: float, pattern) -> float:
    """The reference implementation's relative error on the same layer."""
    alps = types.ModuleType("alps_reference")
    exec(
        compile(module_source.replace("cuda:0", "cpu").replace("torch.cuda.synchronize()", "pass"), "alps.py", "exec"),
        alps.__dict__,
    )  # noqa: S102
    module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    module.weight.data.copy_(weight)
    solver = alps.ALPS_prune(module, nsamples=SAMPLES, seqlen=SEQ_LEN)
    solver.add_batch(x.unsqueeze(0), torch.zeros(1, x.shape[0], weight.shape[0]))
    n, m = (pattern.n, pattern.m) if pattern is not None else (0, 0)
    return float(solver.ALPS_admm(sp=sparsity, nm_n=n, nm_m=m, rho=0.1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="the reference alps.py (mazumder-lab/ALPS)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    source = args.reference.read_text(encoding="utf-8")
    inputs, layers = layer_inputs(ASSETS / "models" / MODEL)
    results = {"model": MODEL, "block": BLOCK, "calibration": f"{SAMPLES} x {SEQ_LEN} C4, seed 0", "layers": {}}
    for layer in layers:
        x, weight = inputs[layer.name], layer.matrix()
        row = {}
        for label, (sparsity, pattern) in SETTINGS.items():
            row[label] = {
                "reference": reference(source, weight, x, sparsity, pattern),
                "alps": ours("alps", weight, x, sparsity, pattern),
                "sparsegpt": ours("sparsegpt", weight, x, sparsity, pattern),
                "wanda": ours("wanda", weight, x, sparsity, pattern),
                "wanda+refit": ours("wanda", weight, x, sparsity, pattern, refit=True),
            }
            cells = "  ".join(f"{key} {value:.5f}" for key, value in row[label].items())
            print(f"{layer.name:28s} {label:>4}  {cells}", flush=True)
        results["layers"][layer.name] = row
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    write_section("alps-reference", render(results))
    print(f"written to {RESULTS}")


def render(results: dict) -> str:
    """The docs section: every layer and setting, the reference beside optimum-prune's methods."""
    methods = ["reference", "alps", "sparsegpt", "wanda", "wanda+refit"]
    rows = [
        [name.split(".", 3)[-1], label, *(f"{errors[method]:.5f}" for method in methods),
         f"{errors['alps'] / errors['reference'] - 1:+.2%}"]
        for name, settings in results["layers"].items()
        for label, errors in settings.items()
    ]  # fmt: skip
    return "\n".join([
        "## ALPS against its reference implementation, layer by layer",
        "",
        f"Relative reconstruction error `||X(W_hat - W)||^2 / ||X W||^2` (on the dampened, scaled Hessian) of every "
        f"layer of block {results['block']} of {results['model']}, each solver on the same Hessian from the dense "
        f"model's inputs ({results['calibration']}). `reference`: the authors' `alps.py` (mazumder-lab/ALPS) run on "
        "the CPU. Command: `python benchmarks/alps_reference.py --reference PATH/alps.py`.",
        "",
        table(["layer", "setting", "reference ALPS", "alps", "sparsegpt", "wanda", "wanda + refit", "alps vs reference"], rows),
    ])  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
