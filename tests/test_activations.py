"""Calibration activations kept in memory-mapped files (``offload_activations=True``) instead of host RAM."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids
from test_offload import _assert_identical, _config, sharded  # noqa: F401  (fixture)

from optimum_prune import Pruner
from optimum_prune.engine.activations import DISK, ActivationStore
from optimum_prune.engine.estimate import estimate_run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_disk_store_keeps_values_in_unlinked_files(tmp_path, dtype):
    store = ActivationStore(DISK, tmp_path / "activations")
    tensors = [torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(3)]
    kept = [store.keep(tensor) for tensor in tensors]
    assert list((tmp_path / "activations").iterdir()) == []  # unlinked: nothing left behind, even after a crash
    for tensor, copy in zip(tensors, kept, strict=True):
        assert copy.dtype == dtype and copy.shape == tensor.shape and torch.equal(copy, tensor)
        assert copy.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
    assert ActivationStore("cpu").keep(tensors[0]).data_ptr() == tensors[0].data_ptr()  # no copy in RAM
    store.evict(kept[0])  # its pages leave the process; its values come back from the file
    assert torch.equal(kept[0], tensors[0])
    del kept, copy
    assert store._mappings == {}  # a dropped tensor's mapping is released


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_activations_give_the_same_model(sharded, tmp_path, offload):  # noqa: F811
    source = sharded("llama")
    ids = random_ids()
    reference = Pruner.from_pretrained(source, _config("sparsegpt"), device="cpu", offload=offload, progress=False)
    reference.prune(ids, output_dir=tmp_path / "reference")
    pruner = Pruner.from_pretrained(
        source, _config("sparsegpt"), device="cpu", offload=offload, offload_activations=True, progress=False
    )
    assert pruner.activations_device == DISK
    pruner.prune(ids, output_dir=tmp_path / "offloaded")
    _assert_identical(tmp_path / "reference", tmp_path / "offloaded")
    assert not (tmp_path / "offloaded.partial").exists()


def test_in_memory_run_without_output_uses_the_offload_folder(sharded, tmp_path):  # noqa: F811
    source = sharded("llama")
    ids = random_ids()
    reference = Pruner.from_pretrained(source, _config("wanda"), device="cpu", progress=False)
    reference.prune(ids)
    pruner = Pruner.from_pretrained(
        source,
        _config("wanda"),
        device="cpu",
        offload_folder=tmp_path / "work",
        offload_activations=True,
        progress=False,
    )
    pruner.prune(ids)
    expected, actual = reference.model.state_dict(), pruner.model.state_dict()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert (tmp_path / "work").is_dir() and list((tmp_path / "work").iterdir()) == []


def test_estimate_moves_activations_from_memory_to_disk(sharded):  # noqa: F811
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sharded("llama"))
    config = _config("sparsegpt")
    in_memory = estimate_run(model, config, flops_per_second=1e9, baseline_bytes=0)
    on_disk = estimate_run(model, config, activations_device=DISK, flops_per_second=1e9, baseline_bytes=0)
    activations = in_memory.activations_bytes
    assert activations > 0
    assert on_disk.host_peak_bytes == in_memory.host_peak_bytes - 2 * activations
    assert on_disk.disk_bytes == in_memory.disk_bytes + 2 * activations


def test_offload_activations_conflicts_with_another_activations_device(sharded):  # noqa: F811
    from conftest import tiny_model

    with pytest.raises(ValueError, match="offload_activations=True keeps the calibration activations on disk"):
        Pruner(tiny_model("llama"), _config(), activations_device="cpu", offload_activations=True)
