"""The dry-run estimate reads configs and safetensors headers only, and is close to what a run measures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import offload as offload_module
from optimum_prune.engine.estimate import estimate_run

# Stated accuracy, checked below on a real run of a small model (a fresh subprocess, peak RSS = VmHWM).
# Time is compared with the run's CPU time: on the shared 2-core machine wall time depends on the load.
PEAK_FACTOR = 1.5
TIME_FACTOR = 10.0


def _config(**kwargs) -> PruningConfig:
    return PruningConfig(**{"method": "sparsegpt", "num_samples": 8, "seq_len": 32, "batch_size": 4, **kwargs})


def test_estimate_loads_no_weight(tmp_path, monkeypatch):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path, max_shard_size="100KB")

    def refuse(*args, **kwargs):
        raise AssertionError("estimate() read a weight")

    monkeypatch.setattr(offload_module.SafetensorsCheckpoint, "read", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    estimate = Pruner.estimate(tmp_path, _config(), device="cpu", offload="disk")

    assert estimate.parameters == sum(p.numel() for p in model.parameters())
    assert estimate.weights_bytes == 4 * estimate.parameters
    assert estimate.block_bytes == 4 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert estimate.activations_bytes == 8 * 32 * 64 * 4
    assert estimate.disk_bytes == estimate.weights_bytes + estimate.activations_bytes
    assert estimate.host_peak_bytes > estimate.baseline_bytes
    assert estimate.seconds > 0
    assert "estimated peak memory" in str(estimate)

    half = Pruner.estimate(tmp_path, _config(), device="cpu", dtype="bfloat16")
    assert half.weights_bytes == estimate.weights_bytes // 2
    in_memory = Pruner.estimate(tmp_path, _config(), device="cpu", offload="cpu")
    assert in_memory.host_peak_bytes > estimate.host_peak_bytes  # every weight stays in RAM


def test_estimate_scales_with_the_method_and_calibration():
    model = tiny_model("llama")
    common = {"device": "cpu", "offload": "cpu", "flops_per_second": 1e9, "baseline_bytes": 0, "write_output": False}
    sparsegpt = estimate_run(model, _config(), **common)
    wanda = estimate_run(model, PruningConfig(method="wanda", num_samples=8, seq_len=32), **common)
    magnitude = estimate_run(model, PruningConfig(method="magnitude"), **common)
    assert sparsegpt.statistics_bytes > wanda.statistics_bytes > magnitude.statistics_bytes == 0
    assert magnitude.activations_bytes == 0
    sparsellm = estimate_run(model, _config(method="sparsellm"), **common)
    config = model.config
    per_token = 4 * (2 * config.hidden_size + 3 * config.intermediate_size)  # x, Y; z, s, p of a gated MLP
    assert sparsellm.host_peak_bytes >= sparsegpt.host_peak_bytes + 8 * 32 * per_token
    assert sparsellm.seconds > 3 * sparsegpt.seconds  # ten iterations over the MLP
    longer = estimate_run(model, _config(num_samples=16), **common)
    assert longer.activations_bytes == 2 * sparsegpt.activations_bytes
    assert longer.seconds > sparsegpt.seconds


def test_estimate_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Pruner.estimate(tmp_path, _config())
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Unknown dtype"):
        Pruner.estimate(tmp_path, _config(), dtype="float8")
    with pytest.raises(ValueError, match="Unknown offload"):
        Pruner.estimate(tmp_path, _config(), offload="tape")


CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import torch
    from optimum_prune import Pruner, PruningConfig

    def peak():
        lines = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("VmHWM:"))

    source, output, offload = sys.argv[1:4]
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=64, batch_size=4)
    estimate = Pruner.estimate(source, config, device="cpu", offload=offload)
    ids = torch.randint(0, 1024, (8, 64), generator=torch.Generator().manual_seed(0))
    def cpu():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    start, start_cpu = time.perf_counter(), cpu()
    pruner = Pruner.from_pretrained(source, config, device="cpu", offload=offload, progress=False)
    pruner.prune(ids, output_dir=output)
    print(json.dumps({"peak": peak(), "seconds": time.perf_counter() - start, "cpu_seconds": cpu() - start_cpu,
                      "estimate": estimate.host_peak_bytes, "estimate_seconds": estimate.seconds}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_estimate_is_within_the_stated_factor_of_a_measured_run(tmp_path, offload):
    config = LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "source", max_shard_size="2MB")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "source"), str(tmp_path / "out"), offload],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    assert 1 / PEAK_FACTOR <= measured["peak"] / measured["estimate"] <= PEAK_FACTOR, measured
    assert 1 / TIME_FACTOR <= measured["cpu_seconds"] / measured["estimate_seconds"] <= TIME_FACTOR, measured
