"""A run killed after block k resumes from block k + 1 and writes the same model as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ARCHITECTURES, REPO, random_ids
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine import work_folder as work_folder_module

# The child prunes a 4-block model and dies (os._exit, no cleanup) right after block KILL_AFTER is saved.
CHILD = textwrap.dedent(
    """
    import os, sys
    import torch
    from optimum_prune import Pruner, PruningConfig
    from optimum_prune.engine.work_folder import WorkFolder

    source, output, offload, kill_after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    save_block = WorkFolder.save_block

    def save_then_die(self, index, *args, **kwargs):
        save_block(self, index, *args, **kwargs)
        if index == kill_after:
            os._exit(17)

    WorkFolder.save_block = save_then_die
    config = PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=32, batch_size=4)
    ids = torch.load(os.path.join(source, "ids.pt"))
    pruner = Pruner.from_pretrained(source, config, device="cpu", offload=offload, progress=False)
    pruner.prune(ids, output_dir=output, resume=True)
    """
)


def _config(**kwargs) -> PruningConfig:
    return PruningConfig(method="sparsegpt", sparsity=0.5, num_samples=8, seq_len=32, batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 4-block random Llama saved as shards, with its calibration ids."""
    folder = tmp_path_factory.mktemp("resume") / "source"
    torch.manual_seed(0)
    config = ARCHITECTURES["llama"]()
    config.num_hidden_layers = 4
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="100KB")
    torch.save(random_ids(), folder / "ids.pt")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(source, tmp_path_factory):
    output = tmp_path_factory.mktemp("reference") / "model"
    pruner = Pruner.from_pretrained(source, _config(), device="cpu", progress=False)
    pruner.prune(torch.load(source / "ids.pt"), output_dir=output)
    return output


def _state(folder) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("offload", ["disk", pytest.param("cpu", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_the_same_output(source, uninterrupted, tmp_path, offload):
    output = tmp_path / "model"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), str(output), offload, "1"],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 17, child.stderr
    work = tmp_path / "model.partial"
    assert not output.exists()  # a partial run never looks finished
    assert json.loads((work / "state.json").read_text())["next_block"] == 2

    resumed_blocks = []
    pruner = Pruner.from_pretrained(source, _config(), device="cpu", offload=offload, progress=False)
    original = work_folder_module.WorkFolder.save_block
    try:
        work_folder_module.WorkFolder.save_block = lambda self, index, *a, **k: (
            resumed_blocks.append(index),
            original(self, index, *a, **k),
        )
        report = pruner.prune(torch.load(source / "ids.pt"), output_dir=output, resume=True)
    finally:
        work_folder_module.WorkFolder.save_block = original

    assert resumed_blocks == [2, 3]
    assert [layer.block for layer in report.layers] == sorted(layer.block for layer in report.layers)
    assert {layer.block for layer in report.layers} == {0, 1, 2, 3}
    assert not work.exists()
    expected, actual = _state(uninterrupted), _state(output)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert (
        json.loads((output / "config.json").read_text())["optimum_prune"]["layers"]
        == json.loads((uninterrupted / "config.json").read_text())["optimum_prune"]["layers"]
    )


def test_failure_while_assembling_keeps_the_work_and_resumes(source, uninterrupted, tmp_path, monkeypatch):
    from optimum_prune import pruner as pruner_module

    output = tmp_path / "model"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pruner_module, "write_streamed_weights", fail)
    pruner = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    with pytest.raises(OSError, match="disk full"):
        pruner.prune(torch.load(source / "ids.pt"), output_dir=output)
    assert not output.exists()
    assert json.loads((tmp_path / "model.partial" / "state.json").read_text())["next_block"] == 4
    monkeypatch.undo()

    pruner = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    pruner.prune(torch.load(source / "ids.pt"), output_dir=output, resume=True)
    expected, actual = _state(uninterrupted), _state(output)
    assert all(torch.equal(expected[name], actual[name]) for name in expected)


def test_existing_work_needs_resume_and_the_same_arguments(source, tmp_path):
    work = tmp_path / "model.partial"
    work.mkdir()
    ids = torch.load(source / "ids.pt")
    first = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    first_fingerprint = first._fingerprint(ids)
    (work / "fingerprint.json").write_text(json.dumps(first_fingerprint))
    (work / "state.json").write_text("{}")  # a finished block: work that a new run must not throw away

    again = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        again.prune(ids, output_dir=tmp_path / "model")
    changed = Pruner.from_pretrained(source, _config(seed=1), device="cpu", offload="disk", progress=False)
    with pytest.raises(ValueError, match="different config.*delete the folder"):
        changed.prune(ids, output_dir=tmp_path / "model", resume=True)
    other_ids = Pruner.from_pretrained(source, _config(), device="cpu", offload="disk", progress=False)
    with pytest.raises(ValueError, match="different calibration"):
        other_ids.prune((ids + 1) % 512, output_dir=tmp_path / "model", resume=True)
    assert json.loads((work / "fingerprint.json").read_text()) == first_fingerprint


def test_a_work_folder_without_a_finished_block_blocks_nothing(source, tmp_path):
    """A run that failed before its first block finished (a bad pattern, say) leaves no work worth keeping:
    the corrected command runs, with or without resume, and the failing one leaves no folder behind."""
    ids = torch.load(source / "ids.pt")
    work = tmp_path / "model.partial"
    config = PruningConfig(method="wanda", pattern="2:3", num_samples=8, seq_len=32, batch_size=4)
    failing = Pruner.from_pretrained(source, config, device="cpu", progress=False)  # no width is a multiple of 3
    with pytest.raises(ValueError, match="multiple of 3"):
        failing.prune(ids, output_dir=tmp_path / "model")
    assert not work.exists()
    for resume in (False, True):
        work.mkdir()
        (work / "fingerprint.json").write_text(json.dumps({"config": "of another run"}))
        pruner = Pruner.from_pretrained(source, _config(), device="cpu", progress=False)
        pruner.prune(ids, output_dir=tmp_path / "model", resume=resume, overwrite=True)
        assert not work.exists() and (tmp_path / "model" / "model.safetensors").is_file()


def test_resume_needs_an_output_dir(source):
    pruner = Pruner.from_pretrained(source, _config(), device="cpu", progress=False)
    with pytest.raises(ValueError, match="output_dir"):
        pruner.prune(torch.load(source / "ids.pt"), resume=True)
