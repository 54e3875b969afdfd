"""Models placed by accelerate (``device_map``: cpu and disk here, GPUs with the gpu marker) are pruned through
accelerate's hooks: the same masks and weights as the model pruned in memory, written back where accelerate keeps
them (the checkpoint they were read from untouched), and generation and saving work afterwards."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import C4_SAMPLE, STORIES_260K, killed_at_block
from test_cli import run_main
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig
from optimum_prune.engine.work_folder import WorkFolder
from optimum_prune.errors import InputError

BLOCKS_ON_DISK = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.layers.4": "disk",
    "model.norm": "cpu",
    "model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
IDS = torch.tensor([[1, 500, 300, 200, 17, 99]])


def _config(method: str = "sparsegpt", **kwargs) -> PruningConfig:
    return PruningConfig(method=method, sparsity=0.5, num_samples=8, seq_len=64, **kwargs)


def _checkpoint_digest() -> str:
    return hashlib.sha256((STORIES_260K / "model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def in_memory() -> dict[str, Pruner]:
    pruners = {}
    for method in ("wanda", "sparsegpt"):
        pruners[method] = Pruner.from_pretrained(STORIES_260K, _config(method), device="cpu", progress=False)
        pruners[method].prune(C4_SAMPLE)
    return pruners


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_dispatched_model_prunes_as_in_memory(in_memory, method, tmp_path):
    digest = _checkpoint_digest()
    model = AutoModelForCausalLM.from_pretrained(
        STORIES_260K, device_map=BLOCKS_ON_DISK, offload_folder=tmp_path / "off"
    )
    pruner = Pruner(model, _config(method), tokenizer=in_memory[method].tokenizer, device="cpu", progress=False)
    pruner.prune(C4_SAMPLE)
    reference = in_memory[method]
    assert pruner.masks.keys() == reference.masks.keys()
    assert all(torch.equal(pruner.masks[name], reference.masks[name]) for name in reference.masks)
    assert model.model.layers[1].mlp.down_proj.weight.is_meta  # still offloaded, its pruned values on disk
    assert (tmp_path / "off" / "model.layers.1.mlp.down_proj.weight.dat").is_file()
    assert _checkpoint_digest() == digest  # the checkpoint the weights came from is never written
    torch.testing.assert_close(model(IDS).logits, reference.model(IDS).logits, rtol=0, atol=1e-5)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(model.generate(IDS, **greedy), reference.model.generate(IDS, **greedy))
    pruner.save_pretrained(tmp_path / "ours")
    model.save_pretrained(tmp_path / "theirs")
    expected = reference.model.state_dict()
    for folder in ("ours", "theirs"):
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / folder).state_dict()
        assert all(torch.equal(saved[name], expected[name]) for name in expected), folder


def test_from_pretrained_passes_the_placement_to_accelerate(in_memory, tmp_path):
    pruner = Pruner.from_pretrained(
        STORIES_260K, _config("wanda"), device="cpu", progress=False, device_map="auto",
        max_memory={"cpu": "300KB"}, offload_folder=tmp_path / "off",
    )  # fmt: skip
    assert "disk" in set(pruner.model.hf_device_map.values())
    pruner.prune(C4_SAMPLE)
    reference = in_memory["wanda"]
    assert all(torch.equal(pruner.masks[name], reference.masks[name]) for name in reference.masks)


def test_a_resumed_dispatched_run_equals_an_uninterrupted_one(in_memory, tmp_path):
    def dispatched() -> Pruner:
        model = AutoModelForCausalLM.from_pretrained(
            STORIES_260K, device_map=BLOCKS_ON_DISK, offload_folder=tmp_path / "off"
        )
        return Pruner(model, _config(), tokenizer=in_memory["sparsegpt"].tokenizer, device="cpu", progress=False)

    with killed_at_block(WorkFolder, "save_block", 2), pytest.raises(KeyboardInterrupt):
        dispatched().prune(C4_SAMPLE, output_dir=tmp_path / "out")
    dispatched().prune(C4_SAMPLE, output_dir=tmp_path / "out", resume=True)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = in_memory["sparsegpt"].model.state_dict()
    assert all(torch.equal(saved[name], expected[name]) for name in expected)


def test_what_cannot_work_with_a_dispatched_model_is_refused_before_any_work(in_memory, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K, device_map=BLOCKS_ON_DISK, offload_folder=tmp_path / "o")
    tokenizer = in_memory["wanda"].tokenizer
    with pytest.raises(InputError, match="Structured pruning changes the shapes"):
        Pruner(model, _config("wanda", structure={"mlp": 0.25}), tokenizer=tokenizer).prune(C4_SAMPLE)
    with pytest.raises(InputError, match="drop offload="):
        Pruner(model, _config("wanda"), tokenizer=tokenizer, offload="cpu")
    with pytest.raises(InputError, match="choose one"):
        Pruner.from_pretrained(STORIES_260K, device_map="auto", offload="disk")
    pruner = Pruner(model, _config("wanda"), tokenizer=tokenizer, device="cpu", progress=False)
    pruner.prune(C4_SAMPLE)
    with pytest.raises(InputError, match="Training needs every weight in memory"):
        pruner.recover(C4_SAMPLE, max_steps=2)
    with pytest.raises(InputError, match="save it with format='dense'"):
        pruner.save_pretrained(tmp_path / "c", format="compressed")
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device-map", "everywhere"], "argument --device-map: cannot read 'everywhere'"),
        (["--device-map", "auto", "--offload", "disk"], "argument --device-map: not with --offload"),
        (["--device-map", "auto", "--structure", "mlp=0.25"], "argument --device-map: not with --structure"),
        (["--device-map", "auto", "--save-masks", "--output", "x"], "argument --device-map: not with --save-masks"),
        (["--device-map", '{"model": "cpu"}'], "it places no device for lm_head"),  # issue 37: incomplete
        (["--device-map", '{"": "gpu"}'], "'gpu' is not a device"),
        (["--device-map", '{"": 7}'], "goes to GPU 7, and this machine has"),
        (["--device-map", '{"model": "disk", "lm_head": "cpu"}'], "a module goes to disk: add --offload-folder"),
    ],
)
def test_cli_device_map_refusals_exit_2_before_loading(flags, message, monkeypatch, capsys):
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    assert run_main("--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), *flags) == 2
    assert message in capsys.readouterr().err


def test_cli_prunes_a_dispatched_model(in_memory, tmp_path):
    output = tmp_path / "out"
    flags = ["--model", str(STORIES_260K), "--method", "wanda", "--dataset", str(C4_SAMPLE), "--num-samples", "8"]
    flags += ["--seq-len", "64", "--device-map", "auto", "--max-memory", "cpu=300KB"]
    assert run_main(*flags, "--offload-folder", str(tmp_path / "off"), "--output", str(output)) == 0
    saved = AutoModelForCausalLM.from_pretrained(output).state_dict()
    expected = in_memory["wanda"].model.state_dict()
    assert all(torch.equal(saved[name], expected[name]) for name in expected)


@pytest.mark.gpu
def test_a_model_dispatched_on_the_gpu_and_disk_prunes_as_in_memory(in_memory, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    placement = {**BLOCKS_ON_DISK, "model.layers.0": 0, "model.layers.3": 0, "model.embed_tokens": 0, "lm_head": 0}
    model = AutoModelForCausalLM.from_pretrained(STORIES_260K, device_map=placement, offload_folder=tmp_path / "off")
    pruner = Pruner(model, _config("wanda"), tokenizer=in_memory["wanda"].tokenizer, device="cuda:0", progress=False)
    pruner.prune(C4_SAMPLE)
    agree = sum(int((pruner.masks[n] == in_memory["wanda"].masks[n]).sum()) for n in pruner.masks)
    total = sum(in_memory["wanda"].masks[n].numel() for n in pruner.masks)
    assert agree / total > 0.999  # CPU and GPU float sums differ in the last bits: rare ties flip


def test_cpu_offload_and_a_whole_model_hook(in_memory):
    """accelerate's cpu_offload hooks every leaf module: pruned as in memory. A hook that holds the whole model's
    weights (place_submodules above the blocks) leaves no block to load alone: refused."""
    from accelerate import cpu_offload
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = AutoModelForCausalLM.from_pretrained(STORIES_260K)
    cpu_offload(model, execution_device=torch.device("cpu"))
    pruner = Pruner(model, _config("wanda"), tokenizer=in_memory["wanda"].tokenizer, device="cpu", progress=False)
    pruner.prune(C4_SAMPLE)
    assert all(torch.equal(pruner.masks[n], mask) for n, mask in in_memory["wanda"].masks.items())
    whole = AutoModelForCausalLM.from_pretrained(STORIES_260K)
    add_hook_to_module(whole, AlignDevicesHook(execution_device="cpu", offload=True, place_submodules=True))
    with pytest.raises(InputError, match="offloads this model as a whole"):
        Pruner(whole, _config("wanda"), tokenizer=in_memory["wanda"].tokenizer)
