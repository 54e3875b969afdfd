"""The compressed sparse safetensors format: bit-exact round trips, sharding, decompression, damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from optimum_prune import Pruner, PruningConfig, apply_masks, decompress, load_masks, load_pruned
from optimum_prune.core.safetensors import write_safetensors
from optimum_prune.export.compressed import INDEX_NAME, compress, pack_bits, read_index, unpack_bits
from optimum_prune.export.masks import Masks, write_masks


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (so -0.0 differs from +0.0 and NaNs compare)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().reshape(-1).view(torch.uint8))


def assert_same_state(expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(want) == set(got)
    for name, tensor in want.items():
        assert same_bits(tensor, got[name]), name


def pruned(arch: str = "llama", dtype: torch.dtype = torch.float32, pattern: str = "unstructured", **config) -> Pruner:
    model = tiny_model(arch).to(dtype)
    pruner = Pruner(model, PruningConfig(method="magnitude", pattern=pattern, **config), device="cpu", progress=False)
    pruner.prune()
    return pruner


def index_of(folder: Path) -> dict:
    return json.loads((folder / INDEX_NAME).read_text())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_round_trip_is_bit_exact(tmp_path, dtype, pattern):
    pruner = pruned(dtype=dtype, pattern=pattern)
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    index = index_of(tmp_path / "out")
    encodings = {entry["encoding"] for name, entry in index["tensors"].items() if ".layers." in name}
    assert encodings >= {"nm" if pattern == "2:4" else "bitmask"}
    assert index["metadata"]["stored_size"] < index["metadata"]["dense_size"]
    loaded = load_pruned(tmp_path / "out")
    assert loaded.dtype == dtype
    assert_same_state(pruner.model, loaded)
    pruner.save_pretrained(tmp_path / "dense")  # the same model loaded the plain way computes the same logits
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embeddings_stored_once_and_tied_again(tmp_path, arch):
    model = tiny_model(arch)
    if arch == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    pruner = Pruner(model, PruningConfig(method="magnitude", pattern="2:4"), device="cpu", progress=False)
    pruner.prune()
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    tied = {name: e for name, e in index_of(tmp_path / "out")["tensors"].items() if e["encoding"] == "tied"}
    assert list(tied) == ["lm_head.weight"]
    loaded = load_pruned(tmp_path / "out")
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert_same_state(pruner.model, loaded)


def test_from_pretrained_arguments_pass_through(tmp_path):
    pruner = pruned(dtype=torch.bfloat16)
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    loaded = load_pruned(tmp_path / "out", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    for name, tensor in pruner.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.float()), name
    assert loaded.generation_config.eos_token_id == pruner.model.generation_config.eos_token_id


def test_conv1d_nm_groups_run_along_the_stored_rows(tmp_path):
    pruner = pruned("gpt2", pattern="2:4")
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    entry = index_of(tmp_path / "out")["tensors"]["transformer.h.0.mlp.c_fc.weight"]
    assert (entry["encoding"], entry["group_dim"], entry["n"], entry["m"], entry["index_bits"]) == ("nm", 0, 2, 4, 2)
    assert_same_state(pruner.model, load_pruned(tmp_path / "out"))


def test_four_of_eight_uses_four_bit_indices(tmp_path):
    pruner = pruned(pattern="4:8")
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    entry = index_of(tmp_path / "out")["tensors"]["model.layers.0.mlp.up_proj.weight"]
    assert (entry["encoding"], entry["index_bits"]) == ("nm", 4)
    shard = load_file(tmp_path / "out" / entry["shard"])
    values = shard["model.layers.0.mlp.up_proj.weight:values"]
    assert values.shape == (128, 32)  # (rows, cols * N / M) for the (128, 64) weight
    assert_same_state(pruner.model, load_pruned(tmp_path / "out"))


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_pack_bits_round_trip(width):
    values = torch.randint(0, 2**width, (37,), dtype=torch.uint8)
    packed = pack_bits(values, width)
    assert packed.numel() == -(-37 * width // 8)
    assert torch.equal(unpack_bits(packed, width, 37), values)


def test_sharded_output_streams_and_indexes_every_shard(tmp_path):
    pruner = pruned(dtype=torch.float16)
    pruner.save_pretrained(tmp_path / "out", format="compressed", max_shard_size="40KB")
    index = read_index(tmp_path / "out")
    assert len(index["files"]) > 2
    assert all(name.startswith("model.sparse-") and "-of-" in name for name in index["files"])
    assert not list((tmp_path / "out").glob("*.partial"))
    for file in index["files"]:
        tensors = load_file(tmp_path / "out" / file)
        groups = {name.split(":")[0] for name in tensors}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 40_000 or len(groups) == 1
    assert_same_state(pruner.model, load_pruned(tmp_path / "out"))


def test_decompress_gives_a_folder_transformers_loads(tmp_path):
    pruner = pruned("gpt2", dtype=torch.bfloat16, pattern="2:4")
    pruner.save_pretrained(tmp_path / "sparse", format="compressed", save_masks=True)
    decompress(tmp_path / "sparse", tmp_path / "dense", max_shard_size="60KB")
    files = {p.name for p in (tmp_path / "dense").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "sparsity_masks.safetensors", "pruning_config.json"} <= files
    assert INDEX_NAME not in files and not any(name.startswith("model.sparse") for name in files)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert_same_state(pruner.model, model)
    assert model.config.optimum_prune["pattern"] == "2:4"
    with pytest.raises(FileExistsError, match="overwrite"):
        decompress(tmp_path / "sparse", tmp_path / "dense")


def test_modified_pruned_weight_is_refused_and_nothing_is_written(tmp_path):
    pruner = pruned()
    weight = pruner.model.model.layers[0].mlp.up_proj.weight
    weight.data[weight == 0] = 1.0
    with pytest.raises(ValueError, match="apply_masks"):
        pruner.save_pretrained(tmp_path / "out", format="compressed")
    assert list(tmp_path.iterdir()) == []


def test_negative_zero_pruned_weights_decode_as_positive_zero(tmp_path):
    pruner = pruned()
    weight = pruner.model.model.layers[0].mlp.up_proj.weight
    weight.data[weight == 0] = -0.0
    assert torch.signbit(weight[weight == 0]).all()
    pruner.save_pretrained(tmp_path / "out", format="compressed")
    loaded = load_pruned(tmp_path / "out").model.layers[0].mlp.up_proj.weight
    assert torch.equal(loaded, weight)
    assert not torch.signbit(loaded[weight == 0]).any()


def test_bad_format_and_existing_folder(tmp_path):
    pruner = pruned()
    with pytest.raises(ValueError, match="'dense', 'compressed'"):
        pruner.save_pretrained(tmp_path / "out", format="sparse")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pruner.save_pretrained(tmp_path / "out", format="compressed")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_masks_from_dense_round_trip_on_odd_shapes():
    mask = torch.rand(3, 5, 7) < 0.4
    masks = Masks.from_dense({"w": mask})
    assert masks.packed("w").numel() == (105 + 7) // 8
    assert torch.equal(masks["w"], mask)


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.fixture
def saved(tmp_path) -> Path:
    pruned(dtype=torch.float16).save_pretrained(tmp_path / "out", format="compressed", max_shard_size="60KB")
    return tmp_path / "out"


def _layer_shard(folder: Path, name: str = "model.layers.0.mlp.up_proj.weight") -> tuple[Path, dict]:
    index = index_of(folder)
    return folder / index["tensors"][name]["shard"], index


def test_truncated_shard_is_named(saved):
    shard, _ = _layer_shard(saved)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        load_pruned(saved)


def test_flipped_value_bytes_fail_the_checksum_of_that_tensor(saved):
    shard, _ = _layer_shard(saved)
    tensors = {name: tensor.clone() for name, tensor in load_file(shard).items()}  # not views of the file
    values = tensors["model.layers.0.mlp.up_proj.weight:values"]
    values[:5] += 1.0
    data = shard.read_bytes()
    write_safetensors(shard, tensors, {"format": "pt", "optimum_prune": "optimum-prune-sparse"})
    assert len(shard.read_bytes()) == len(data)  # same size: only the checksum can tell
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*CRC-32"):
        load_pruned(saved)


def test_missing_tensor_is_named(saved):
    shard, index = _layer_shard(saved)
    tensors = load_file(shard)
    del tensors["model.layers.0.mlp.up_proj.weight:mask"]
    save_file(tensors, shard)
    index["files"][shard.name] = shard.stat().st_size
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lacks tensors \['model\.layers\.0\.mlp\.up_proj\.weight:mask'\]"):
        load_pruned(saved)


def test_wrong_part_size_is_named(saved):
    shard, index = _layer_shard(saved)
    tensors = load_file(shard)
    name = "model.layers.0.mlp.up_proj.weight:values"
    tensors[name] = tensors[name][:-3].clone()
    save_file(tensors, shard)
    index["files"][shard.name] = shard.stat().st_size
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{shard.name}: tensor '{name}' is torch.float16 with"):
        load_pruned(saved)


def test_garbage_header_is_named(saved):
    shard, _ = _layer_shard(saved)
    size = shard.stat().st_size
    shard.write_bytes(b"\xff" * size)
    with pytest.raises(ValueError, match=f"{shard.name} is not a valid safetensors file"):
        load_pruned(saved)


def test_missing_shard_and_bad_index(saved):
    shard, index = _layer_shard(saved)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name} is missing"):
        load_pruned(saved)
    (saved / INDEX_NAME).write_text(json.dumps({**index, "format_version": 99}))
    with pytest.raises(ValueError, match="upgrade optimum-prune"):
        load_pruned(saved)
    (saved / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pruned(saved)


def test_unknown_encoding_is_refused(saved):
    index = index_of(saved)
    index["tensors"]["model.layers.0.mlp.up_proj.weight"]["encoding"] = "pickle"
    (saved / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="unknown encoding 'pickle'"):
        load_pruned(saved)


def test_load_pruned_needs_a_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        load_pruned(tmp_path / "nowhere")


def test_compress_a_fine_tuned_dense_folder_with_masks(tmp_path):
    pruner = pruned(dtype=torch.bfloat16, pattern="2:4")
    pruner.save_pretrained(tmp_path / "dense", save_masks=True, max_shard_size="60KB")
    model = load_pruned(tmp_path / "dense")
    masks = load_masks(tmp_path / "dense")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)  # a "fine-tuning step" that also moves pruned weights
    model.save_pretrained(tmp_path / "tuned")
    write_masks(masks, tmp_path / "tuned")
    with pytest.raises(ValueError, match="apply_masks"):
        compress(tmp_path / "tuned", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    apply_masks(model, masks)
    model.save_pretrained(tmp_path / "tuned", max_shard_size="60KB")
    compress(tmp_path / "tuned", tmp_path / "sparse")
    assert {e["encoding"] for n, e in index_of(tmp_path / "sparse")["tensors"].items() if ".layers." in n} >= {"nm"}
    assert (tmp_path / "sparse" / "config.json").is_file() and not (tmp_path / "sparse" / "model.safetensors").exists()
    assert_same_state(model, load_pruned(tmp_path / "sparse"))
    pruner.model.save_pretrained(tmp_path / "no-masks")
    with pytest.raises(FileNotFoundError, match="save_masks=True"):
        compress(tmp_path / "no-masks", tmp_path / "x")
    with pytest.raises(ValueError, match="already compressed"):
        compress(tmp_path / "sparse", tmp_path / "x")
