"""export_onnx: optimum-style decoder I/O, logits equal to PyTorch in onnxruntime, every pruned zero kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from accelerate import cpu_offload
from conftest import tiny_model
from onnx import numpy_helper
from torch.nn import Linear

from optimum_prune import Pruner, PruningConfig, export_onnx
from optimum_prune.export.onnx import EXTERNAL_DATA_FILE, ONNX_FILE


@pytest.fixture(scope="module")
def pruned(magnitude_stories: Pruner) -> Pruner:
    return magnitude_stories


@pytest.fixture(scope="module")
def exported(pruned: Pruner, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(pruned.model, tmp_path_factory.mktemp("onnx") / "stories", tokenizer=pruned.tokenizer)


class Session:
    """onnxruntime over an exported folder, fed like optimum's ORTModelForCausalLM."""

    def __init__(self, folder: Path) -> None:
        self.session = ort.InferenceSession(folder / ONNX_FILE, providers=["CPUExecutionProvider"])
        self.past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, input_ids, attention_mask, position_ids, past=None) -> tuple[np.ndarray, list[np.ndarray]]:
        batch = input_ids.shape[0]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for index, info in enumerate(self.past):
            empty = np.zeros((batch, info.shape[1], 0, info.shape[3]), dtype=np.float32)
            feed[info.name] = past[index] if past is not None else empty
        logits, *present = self.session.run(self.outputs, {k: np.asarray(v) for k, v in feed.items()})
        return logits, present


def torch_logits(model, input_ids, attention_mask, position_ids) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            position_ids=torch.from_numpy(position_ids),
        ).logits.numpy()


def test_io_names_and_files(exported: Path) -> None:
    model = onnx.load(exported / ONNX_FILE, load_external_data=False)
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    assert inputs == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(5) for kind in ("key", "value")
    ]
    assert outputs == ["logits"] + [f"present.{i}.{kind}" for i in range(5) for kind in ("key", "value")]
    assert model.ir_version == 9, "IR 9 so that older runtimes (DeepSparse 1.8) read opset 18"
    assert not (exported / EXTERNAL_DATA_FILE).exists(), "a 1 MB model needs no external data"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in exported.iterdir()}
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_metadata_props(exported: Path, pruned: Pruner) -> None:
    model = onnx.load(exported / ONNX_FILE, load_external_data=False)
    props = {prop.key: prop.value for prop in model.metadata_props}
    metadata = json.loads(props["optimum_prune"])
    assert metadata["method"] == "magnitude"
    assert metadata["global_sparsity"] == pytest.approx(pruned.report.global_sparsity, abs=1e-6)
    assert set(metadata["layers"]) == {layer.name for layer in pruned.report.layers}
    assert json.loads((exported / "config.json").read_text())["optimum_prune"] == metadata


def test_every_pruned_weight_keeps_exactly_its_zeros(exported: Path, pruned: Pruner) -> None:
    model = onnx.load(exported / ONNX_FILE)
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for layer in pruned.report.layers:
        weight = pruned.model.get_submodule(layer.name).weight.detach().numpy()
        stored = initializers[f"{layer.name}.weight"]
        assert stored.shape == weight.T.shape, "stored as the (in, out) right-hand side of MatMul"
        np.testing.assert_array_equal(stored, weight.T)
        assert (stored == 0).sum() == round(layer.sparsity * weight.size) > 0


def test_logits_match_pytorch_with_padding_and_new_shapes(exported: Path, pruned: Pruner) -> None:
    session = Session(exported)
    rng = np.random.default_rng(0)
    for batch, length, pad in [(1, 9, 0), (3, 17, 5)]:
        input_ids = rng.integers(3, 512, (batch, length))
        attention_mask = np.ones((batch, length), dtype=np.int64)
        attention_mask[0, :pad] = 0  # left padding in the first row
        position_ids = np.clip(attention_mask.cumsum(-1) - 1, 0, None)
        logits, present = session.run(input_ids, attention_mask, position_ids)
        expected = torch_logits(pruned.model, input_ids, attention_mask, position_ids)
        keep = attention_mask.astype(bool)
        assert np.abs(logits[keep] - expected[keep]).max() <= 1e-4
        assert present[0].shape[2] == length


def test_decoding_with_past_matches_pytorch(exported: Path, pruned: Pruner) -> None:
    session = Session(exported)
    input_ids = np.random.default_rng(1).integers(3, 512, (2, 6))
    mask = np.ones_like(input_ids)
    logits, past = session.run(input_ids, mask, np.arange(6)[None].repeat(2, 0))
    for step in range(4):  # greedy decoding, one token at a time through the cache
        token = logits[:, -1].argmax(-1)[:, None]
        input_ids = np.concatenate([input_ids, token], axis=1)
        length = input_ids.shape[1]
        positions = np.full((2, 1), length - 1)
        logits, past = session.run(token, np.ones((2, length), dtype=np.int64), positions, past)
        expected = torch_logits(pruned.model, input_ids, np.ones_like(input_ids), np.arange(length)[None].repeat(2, 0))
        assert np.abs(logits[:, -1] - expected[:, -1]).max() <= 1e-4, f"step {step}"
        assert past[0].shape[2] == length


def test_offloaded_model_is_refused_and_nothing_written(tmp_path: Path) -> None:
    model = cpu_offload(tiny_model("llama"))
    with pytest.raises(ValueError, match="offload hooks"):
        export_onnx(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_onnx(tiny_model("llama"), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        export_onnx(tmp_path / "nowhere", tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["gpt2", "opt"])
def test_other_architectures_without_past_and_external_data(architecture: str, tmp_path: Path) -> None:
    pruner = Pruner(tiny_model(architecture), PruningConfig(method="magnitude", pattern="2:4"), device="cpu")
    pruner.progress = False
    pruner.prune()
    pruner.save_pretrained(tmp_path / "saved", format="compressed")
    folder = export_onnx(tmp_path / "saved", tmp_path / "onnx", with_past=False, external_data=True)
    assert (folder / EXTERNAL_DATA_FILE).stat().st_size > 100_000
    session = ort.InferenceSession(folder / ONNX_FILE)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    input_ids = np.random.default_rng(2).integers(0, 512, (2, 11))
    mask, positions = np.ones_like(input_ids), np.arange(11)[None].repeat(2, 0)
    (logits,) = session.run(None, {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions})
    assert np.abs(logits - torch_logits(pruner.model, input_ids, mask, positions)).max() <= 1e-4
    graph = onnx.load(folder / ONNX_FILE).graph
    initializers = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for layer in pruner.report.layers:
        name = f"{layer.name}.weight"
        (consumer,) = [node for node in graph.node if name in node.input]
        module = pruner.model.get_submodule(layer.name)
        weight = module.weight.detach().numpy()  # Linear: (out, in); GPT-2's Conv1D: (in, out)
        # MatMul reads the (in, out) operand; OPT flattens its MLP input to 2-D, giving Gemm(x, W, transB=1).
        trans_b = next((attribute.i for attribute in consumer.attribute if attribute.name == "transB"), 0)
        reads_out_in = consumer.op_type == "Gemm" and trans_b == 1
        expected = weight.T if (type(module) is Linear) != reads_out_in else weight
        np.testing.assert_array_equal(initializers[name], expected)
