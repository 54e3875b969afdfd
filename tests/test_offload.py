"""offload="disk": blocks streamed from safetensors shards give the same model as an in-memory run, bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import STORIES_260K, TINYSTORIES_VAL, random_ids, tiny_model
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import resources


def _config(method: str = "sparsegpt", **kwargs) -> PruningConfig:
    return PruningConfig(method=method, sparsity=0.5, num_samples=8, seq_len=32, batch_size=4, **kwargs)


def _state(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


def _assert_identical(expected, actual) -> None:
    expected, actual = _state(expected), _state(actual)
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different


@pytest.fixture
def sharded(tmp_path):
    """Save a tiny model of ``architecture`` as several safetensors shards with an index."""

    def save(architecture: str):
        folder = tmp_path / f"{architecture}-source"
        tiny_model(architecture).save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file()
        return folder

    return save


@pytest.mark.parametrize(
    ("architecture", "method", "allocation"),
    [("llama", "sparsegpt", "uniform"), ("gpt2", "wanda", "owl"), ("gpt_neox", "magnitude", "uniform")],
)
def test_disk_offload_matches_in_memory_run(sharded, tmp_path, architecture, method, allocation):
    source = sharded(architecture)
    ids = random_ids()
    memory = Pruner.from_pretrained(source, _config(method, allocation=allocation), device="cpu", progress=False)
    memory.prune(ids)
    memory.save_pretrained(tmp_path / "memory")

    disk = Pruner.from_pretrained(
        source, _config(method, allocation=allocation), device="cpu", offload="disk", progress=False
    )
    report = disk.prune(ids, output_dir=tmp_path / "disk")

    _assert_identical(tmp_path / "memory", tmp_path / "disk")
    assert report.global_sparsity == pytest.approx(memory.report.global_sparsity)
    assert disk.masks == {} and memory.masks  # with disk offload only the work folder held the masks
    assert all(parameter.is_meta for parameter in disk.model.parameters())  # nothing kept in memory
    assert not (tmp_path / "disk.partial").exists()
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert all((tmp_path / "disk" / name).is_file() for name in set(index["weight_map"].values()))
    saved = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert saved["optimum_prune"] == json.loads((tmp_path / "memory" / "config.json").read_text())["optimum_prune"]


def test_disk_offload_on_stories260k_single_file_tied_embeddings(tmp_path):
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=64, batch_size=4)
    memory = Pruner.from_pretrained(STORIES_260K, config, device="cpu", progress=False)
    ids = memory.calibration_ids(TINYSTORIES_VAL)
    memory.prune(ids)
    memory.save_pretrained(tmp_path / "memory")
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=64, batch_size=4)
    disk = Pruner.from_pretrained(STORIES_260K, config, device="cpu", offload="disk", progress=False)
    disk.prune(ids, output_dir=tmp_path / "disk")
    _assert_identical(tmp_path / "memory", tmp_path / "disk")
    assert (tmp_path / "disk" / "tokenizer.json").is_file()
    assert (tmp_path / "disk" / "pruning_config.json").is_file()


def test_offload_cpu_is_the_default_in_memory_behaviour(tmp_path):
    ids = random_ids()
    pruner = Pruner(tiny_model("llama"), _config(), device="cpu", progress=False, offload="cpu")
    pruner.prune(ids, output_dir=tmp_path / "out")
    default = Pruner(tiny_model("llama"), _config(), device="cpu", progress=False)
    default.prune(ids)
    default.save_pretrained(tmp_path / "default")
    _assert_identical(tmp_path / "default", tmp_path / "out")
    assert pruner.offload == "cpu" and not (tmp_path / "out.partial").exists()


def test_missing_shard_is_reported_before_loading(sharded):
    source = sharded("llama")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (source / lost).unlink()
    with pytest.raises(FileNotFoundError, match=lost):
        Pruner.from_pretrained(source, _config(), device="cpu", offload="disk")
    with pytest.raises(FileNotFoundError, match=lost):
        Pruner.estimate(source, _config(), device="cpu")


def test_bad_offload_arguments(sharded, tmp_path):
    source = sharded("llama")
    with pytest.raises(ValueError, match="Unknown offload"):
        Pruner.from_pretrained(source, _config(), offload="gpu")
    with pytest.raises(ValueError, match="not a loaded model"):
        Pruner.from_pretrained(tiny_model("llama"), _config(), offload="disk")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Pruner.from_pretrained(tmp_path, _config(), offload="disk")
    pruner = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    with pytest.raises(ValueError, match="output_dir"):
        pruner.prune(random_ids())
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        pruner.prune(random_ids(), output_dir=tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_max_memory_smaller_than_a_block(sharded, tmp_path):
    pruner = Pruner.from_pretrained(
        sharded("llama"), _config(), device="cpu", offload="disk", max_memory={"cpu": "10KB"}, progress=False
    )
    with pytest.raises(ValueError, match=r"smaller than one decoder block \([\d.]+ KiB"):
        pruner.prune(random_ids(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    in_memory = Pruner(tiny_model("llama"), _config(), device="cpu", max_memory={"cpu": "200KB"}, progress=False)
    with pytest.raises(ValueError, match="offload='disk'"):
        in_memory.prune(random_ids())


def test_not_enough_disk_space_fails_before_pruning(sharded, tmp_path, monkeypatch):
    pruner = Pruner.from_pretrained(sharded("llama"), _config(), device="cpu", offload="disk", progress=False)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda path: _Usage(1000))
    with pytest.raises(OSError, match="Not enough free disk space"):
        pruner.prune(random_ids(), output_dir=tmp_path / "out")
    assert pruner.report is None
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


class _Usage:
    def __init__(self, free: int) -> None:
        self.total = self.free = free
        self.used = 0


def test_save_pretrained_after_disk_offload_copies_the_output(sharded, tmp_path):
    """prune -> save_pretrained works as transformers users expect: the streamed dense folder is copied."""
    pruner = Pruner.from_pretrained(sharded("llama"), _config(), device="cpu", offload="disk", progress=False)
    pruner.prune(random_ids(), output_dir=tmp_path / "out")
    assert pruner.save_pretrained(tmp_path / "out") == str(tmp_path / "out")  # already there
    pruner.save_pretrained(tmp_path / "again")
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    copied = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(streamed[name], copied[name]) for name in streamed)
    assert (tmp_path / "again" / "pruning_config.json").is_file()
    with pytest.raises(RuntimeError, match="exists only as dense safetensors"):
        pruner.save_pretrained(tmp_path / "compressed", format="compressed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_disk_offload_on_cuda_matches_in_memory_cuda_run(sharded, tmp_path):
    source = sharded("llama")
    ids = random_ids()
    memory = Pruner.from_pretrained(source, _config(), device="cuda:0", progress=False)
    memory.prune(ids)
    memory.save_pretrained(tmp_path / "memory")
    disk = Pruner.from_pretrained(source, _config(), device="cuda:0", offload="disk", progress=False)
    disk.prune(ids, output_dir=tmp_path / "disk")
    _assert_identical(tmp_path / "memory", tmp_path / "disk")


def test_safetensors_writer_and_reader_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    from optimum_prune.core.safetensors import SafetensorsCheckpoint, write_safetensors

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "i64": torch.arange(4),
        "flag": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }
    write_safetensors(tmp_path / "model.safetensors", tensors)
    loaded = load_file(tmp_path / "model.safetensors")  # the reference reader accepts our files
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    save_file(tensors, tmp_path / "reference.safetensors")
    (tmp_path / "reference.safetensors").replace(tmp_path / "model.safetensors")
    read = SafetensorsCheckpoint(tmp_path).read(tensors)  # and we read the reference writer's files
    assert all(torch.equal(read[name], tensors[name]) and read[name].dtype == tensors[name].dtype for name in tensors)

    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        SafetensorsCheckpoint(tmp_path).read(["f32", "i64", "bf16", "flag", "scalar", "empty"])


_FRAGMENTATION = """
import os, sys
import torch
from optimum_prune.core.memory import map_large_allocations

def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS:")).split()[1]) * 1024

if sys.argv[1] == "mapped":
    map_large_allocations()
freed = torch.ones(1 << 20)
del freed  # 4 MiB freed: glibc's default raises its mmap threshold past it
before = rss()
tensors = [torch.ones(3 << 18) for _ in range(64)]  # 64 x 3 MiB
last = tensors[-1]
del tensors  # all freed but the last, which pins the heap's top
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc are Linux")
def test_freed_activations_leave_resident_memory_with_large_allocations_mapped():
    def grown(mode: str) -> int:
        env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
        run = subprocess.run([sys.executable, "-c", _FRAGMENTATION, mode], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    assert grown("default") > 100  # MiB kept resident by glibc's heap
    assert grown("mapped") < 16
