"""Vision-language models (AutoModelForImageTextToText): the language model's blocks are pruned as a text
model's, the vision tower and projector are left as they were, and the output loads with stock classes."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import STORIES_260K, TINYSTORIES_VAL, VLM_ARCHITECTURES, random_ids, tiny_vlm
from test_cli import run_main

from optimum_prune import Pruner, PruningConfig, perplexity
from optimum_prune.errors import InputError
from optimum_prune.export import read_metadata
from optimum_prune.export.loading import load_pruned

CALIBRATION = {"num_samples": 8, "seq_len": 32, "batch_size": 4}


def _outside_language_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items() if ".language_model.layers." not in name}


@pytest.mark.parametrize("architecture", list(VLM_ARCHITECTURES))
def test_the_language_model_is_pruned_and_the_rest_kept_through_save_and_reload(architecture, tmp_path):
    model = tiny_vlm(architecture)
    kept = _outside_language_model(model)
    pruner = Pruner.from_pretrained(model, PruningConfig(method="wanda", **CALIBRATION), device="cpu", progress=False)
    report = pruner.prune(random_ids(8, 32))
    assert report.layers and all(".language_model.layers." in layer.name for layer in report.layers)
    assert report.global_sparsity == pytest.approx(0.5)
    assert report.vision_parameters > 0 and "vision tower and projector" in report.table()
    for name, value in _outside_language_model(pruner.model).items():
        assert torch.equal(value, kept[name]), name
    pruner.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded) is type(model)
    saved = reloaded.state_dict()
    assert saved.keys() == pruner.model.state_dict().keys()
    assert all(torch.equal(saved[name], value) for name, value in pruner.model.state_dict().items())
    assert read_metadata(tmp_path / "out")["vision_parameters"] == report.vision_parameters
    pruner.save_pretrained(tmp_path / "compressed", format="compressed")
    compressed = load_pruned(tmp_path / "compressed").state_dict()
    assert all(torch.equal(compressed[name], value) for name, value in pruner.model.state_dict().items())
    card = str(pruner.model_card("me/pruned-vlm"))
    assert "AutoModelForImageTextToText.from_pretrained" in card and "image-text-to-text" in card


def _text_twin(model: torch.nn.Module) -> torch.nn.Module:
    """The text model class of ``model``'s language model: its config's own, or for Qwen2-VL and Qwen2.5-VL a
    Qwen2 with the same sizes (on text alone their multimodal rotary positions are the plain 1-D ones)."""
    text_config = model.config.get_text_config()
    if model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        return transformers.AutoModelForCausalLM.from_config(text_config).eval()
    sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    qwen2 = transformers.Qwen2Config(
        **{name: getattr(text_config, name) for name in (*sizes, "num_key_value_heads", "rms_norm_eps")},
        tie_word_embeddings=model.config.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": text_config.rope_parameters["rope_theta"]},
    )
    return transformers.Qwen2ForCausalLM(qwen2).eval()


@pytest.mark.parametrize("architecture", ["llava", "mistral3", "gemma3", "qwen2_vl", "qwen2_5_vl"])
def test_masks_equal_those_of_the_same_decoder_pruned_as_a_text_model(architecture):
    """The language model and head copied into the text model class of its config, pruned on the same ids."""
    model = tiny_vlm(architecture)
    text = _text_twin(model)
    state = {
        name.replace("model.language_model.", "model."): value
        for name, value in model.state_dict().items()
        if "language_model" in name or name.startswith("lm_head")
    }
    assert not text.load_state_dict(state, strict=False).missing_keys
    config = PruningConfig(method="sparsegpt", **CALIBRATION)
    ids = random_ids(8, 32)
    pruned = {}
    for name, candidate in (("vlm", model), ("text", text)):
        pruner = Pruner.from_pretrained(candidate, config, device="cpu", progress=False)
        pruner.prune(ids)
        pruned[name] = {
            layer.name.replace("model.language_model.", "model."): pruner.model.get_submodule(layer.name).weight == 0
            for layer in pruner.report.layers
        }
    assert pruned["vlm"].keys() == pruned["text"].keys()
    for name, mask in pruned["vlm"].items():
        assert torch.equal(mask, pruned["text"][name]), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES_260K)  # the tiny models' 512-token vocabulary
    text_perplexity = [perplexity(m, tokenizer, TINYSTORIES_VAL.read_text()[:20_000], 32, 4) for m in (model, text)]
    assert text_perplexity[0] == pytest.approx(text_perplexity[1], rel=1e-5)  # evaluation runs the language model


@pytest.mark.parametrize(
    ("architecture", "structure", "sizes"),
    [
        ("qwen2_vl", {"mlp": 0.5, "layers": 0.5}, {"intermediate_size": 64, "num_hidden_layers": 1}),
        ("gemma3", {"mlp": 0.5, "layers": 0.5}, {"intermediate_size": 64, "num_hidden_layers": 1}),
        ("qwen3_vl_moe", {"experts": 0.5, "layers": 0.5}, {"num_experts": 2, "num_hidden_layers": 1}),
    ],
)
def test_structured_pruning_updates_the_nested_text_config(architecture, structure, sizes, tmp_path):
    pruner = Pruner.from_pretrained(
        tiny_vlm(architecture),
        PruningConfig(method="sparsegpt", structure=structure, **CALIBRATION),
        device="cpu",
        progress=False,
    )
    kept = _outside_language_model(pruner.model)
    pruner.prune(random_ids(8, 32))
    pruner.save_pretrained(tmp_path / "out")
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    text_config = reloaded.config.get_text_config()
    assert {name: getattr(text_config, name) for name in sizes} == sizes
    ids = random_ids(2, 16, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, pruner.model(input_ids=ids).logits)
    for name, value in _outside_language_model(reloaded).items():
        assert torch.equal(value, kept[name]), name


def test_cli_prunes_a_saved_vision_language_model(tmp_path, capsys):
    """The output keeps the processor's files of the input folder."""
    tiny_vlm("llava").save_pretrained(tmp_path / "llava")
    processor = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 28}}
    (tmp_path / "llava" / "preprocessor_config.json").write_text(json.dumps(processor))
    flags = ["--model", str(tmp_path / "llava"), "--method", "magnitude", "--output", str(tmp_path / "out")]
    assert run_main(*flags) == 0
    assert "left dense outside the language model" in capsys.readouterr().out
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    layer = reloaded.model.language_model.layers[0].mlp.down_proj.weight
    assert (layer == 0).float().mean() == pytest.approx(0.5)
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text()) == processor


def test_a_language_model_without_blocks_and_a_structure_its_config_cannot_express_are_refused():
    model = tiny_vlm("llava")
    model.model.language_model.layers = torch.nn.ModuleList()
    pruner = Pruner(model, PruningConfig(method="magnitude"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="no list of decoder blocks.*in its language model .model.language_model"):
        pruner.prune()
    config = PruningConfig(method="wanda", structure={"attention": 0.5}, **CALIBRATION)
    with pytest.raises(InputError, match="cannot express structure attention=0.5.*other kinds of structure"):
        Pruner.from_pretrained(tiny_vlm("qwen2_vl"), config, device="cpu", progress=False).prune(random_ids(8, 32))


def test_an_encoder_is_still_refused():
    with pytest.raises(InputError, match="not a causal language model"):
        Pruner.from_pretrained(
            transformers.AutoModel.from_config(
                transformers.CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
            ),
            PruningConfig(method="magnitude"),
        )


def test_recovery_keeps_the_zeros_and_leaves_the_vision_tower_frozen():
    """Language-model training on text (the stories260K tokenizer shares the tiny models' 512-token vocabulary)."""
    model = tiny_vlm("llava")
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES_260K)
    pruner = Pruner.from_pretrained(
        model, PruningConfig(method="wanda", **CALIBRATION), tokenizer=tokenizer, device="cpu", progress=False
    )
    pruner.prune(random_ids(8, 32))
    vision = {name: value.clone() for name, value in model.state_dict().items() if "language_model" not in name}
    language = {name: value.clone() for name, value in model.state_dict().items() if "language_model" in name}
    pruner.recover(str(TINYSTORIES_VAL), max_steps=3, distill=False, seq_len=32, learning_rate=1e-2)
    trained = pruner.model.state_dict()
    assert any(not torch.equal(trained[name], value) for name, value in language.items())
    assert all(torch.equal(trained[name], value) for name, value in vision.items() if not name.startswith("lm_head"))
    assert all(parameter.requires_grad for parameter in pruner.model.parameters())
    for layer in pruner.report.layers:
        assert (pruner.model.get_submodule(layer.name).weight == 0).float().mean() == pytest.approx(0.5)


def _llava_with_processor(folder):
    """A tiny LLaVA saved with a working processor: the stories260K tokenizer plus an ``<image>`` token, a CLIP
    image processor of the tower's 28 x 28 input (4 patches, so 4 image tokens per image)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES_260K)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    config = VLM_ARCHITECTURES["llava"]()
    config.text_config.vocab_size = len(tokenizer)
    config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    transformers.AutoModelForImageTextToText.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return processor


def _image_text_file(folder, count=4):
    """``count`` rows of TinyStories text, each with its own random 28 x 28 PNG."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    stories = TINYSTORIES_VAL.read_text(encoding="utf-8").split("\n\n")
    rows = []
    for index in range(count):
        pixels = torch.randint(0, 256, (28, 28, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"image{index}.png")
        rows.append({"text": stories[index], "image": f"image{index}.png"})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_image_text_calibration_runs_the_images_through_the_model(tmp_path):
    """Calibration on image + text pairs (the model folder's processor): block 0's Wanda masks equal a reference
    taken from the dense model's own forward on the processor's inputs, and differ from text-only calibration."""
    processor = _llava_with_processor(tmp_path / "llava")
    pairs = _image_text_file(tmp_path)
    config = PruningConfig(method="wanda", num_samples=4, seq_len=24)
    pruner = Pruner.from_pretrained(tmp_path / "llava", config, device="cpu", progress=False)
    dense = {name: value.clone() for name, value in pruner.model.state_dict().items()}
    report = pruner.prune(pairs)
    assert report.global_sparsity == pytest.approx(0.5) and pruner.config.num_samples == 4
    assert pruner.config.dataset == "pairs.jsonl"
    for name, value in _outside_language_model(pruner.model).items():
        assert torch.equal(value, dense[name]), name

    reference = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "llava").eval()
    layer = reference.model.language_model.layers[0].self_attn.q_proj
    squares = []
    handle = layer.register_forward_pre_hook(lambda module, args: squares.append(args[0].pow(2).sum((0, 1))))
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    from PIL import Image

    with torch.no_grad():
        for row in rows:
            ids = processor.tokenizer(row["text"], add_special_tokens=False)["input_ids"][:24]
            text = processor.image_token + processor.tokenizer.decode(ids)
            image = Image.open(tmp_path / row["image"]).convert("RGB")
            inputs = processor(text=[text], images=[[image]], return_tensors="pt")
            assert (inputs["input_ids"] == reference.config.image_token_id).sum() == 4
            reference(**inputs)
    handle.remove()
    scores = layer.weight.abs() * torch.stack(squares).sum(0).sqrt()
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(
        1, scores.argsort(1)[:, : scores.shape[1] // 2], True
    )
    pruned = pruner.model.model.language_model.layers[0].self_attn.q_proj.weight == 0
    assert torch.equal(pruned, expected)

    pruner.save_pretrained(tmp_path / "out")  # stock classes load it and its processor, same logits on image + text
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    inputs = transformers.AutoProcessor.from_pretrained(tmp_path / "out")(
        text=[processor.image_token + "Once upon a time"], images=[[image]], return_tensors="pt"
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruner.model(**inputs).logits, rtol=0, atol=0)

    import datasets

    pairs_with_images = [{"text": row["text"], "image": Image.open(tmp_path / row["image"])} for row in rows]
    dataset = datasets.Dataset.from_list(pairs_with_images)
    from_dataset = Pruner.from_pretrained(tmp_path / "llava", config, device="cpu", progress=False)
    from_dataset.prune(dataset)  # the same pairs as a datasets.Dataset with an image column
    assert torch.equal(from_dataset.model.model.language_model.layers[0].self_attn.q_proj.weight == 0, pruned)

    text_only = Pruner.from_pretrained(tmp_path / "llava", config, device="cpu", progress=False)
    text_only.prune([row["text"] for row in rows])
    assert not torch.equal(text_only.model.model.language_model.layers[0].self_attn.q_proj.weight == 0, pruned)


def test_bad_image_calibration_fails_before_any_work(tmp_path):
    pairs = _image_text_file(tmp_path, count=2)
    config = PruningConfig(method="wanda", num_samples=2, seq_len=16)
    tiny_vlm("llava").save_pretrained(tmp_path / "no-processor")
    with pytest.raises(InputError, match="needs the model's processor.*processor="):
        Pruner.from_pretrained(tmp_path / "no-processor", config, progress=False).prune(pairs)
    text_model = Pruner.from_pretrained(STORIES_260K, config, progress=False)
    with pytest.raises(InputError, match="takes no images"):
        text_model.prune(pairs)
    _llava_with_processor(tmp_path / "llava")
    structured = PruningConfig(method="wanda", sparsity=0.0, structure={"mlp": 0.5}, num_samples=2, seq_len=16)
    with pytest.raises(InputError, match="Structured pruning calibrates on text"):
        Pruner.from_pretrained(tmp_path / "llava", structured, progress=False).prune(pairs)
    (tmp_path / "image1.png").unlink()
    with pytest.raises(InputError, match="row 2 names images that do not exist"):
        Pruner.from_pretrained(tmp_path / "llava", config, progress=False).prune(pairs)


def test_cli_calibrates_on_image_text_pairs(tmp_path, capsys):
    processor = _llava_with_processor(tmp_path / "processor")
    model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "processor")
    model.save_pretrained(tmp_path / "llava")  # a tokenizer but no processor files: --processor gives them
    processor.tokenizer.save_pretrained(tmp_path / "llava")
    pairs = _image_text_file(tmp_path, count=2)
    flags = ["--model", str(tmp_path / "llava"), "--method", "wanda", "--dataset", str(pairs), "--num-samples", "2"]
    flags += ["--seq-len", "16", "--output", str(tmp_path / "out")]
    assert run_main(*flags) == 2
    assert "needs the model's processor" in capsys.readouterr().err
    assert run_main(*flags, "--processor", str(tmp_path / "processor")) == 0
    assert read_metadata(tmp_path / "out")["config"]["dataset"] == "pairs.jsonl"
    transformers.AutoProcessor.from_pretrained(tmp_path / "out")  # the --processor folder's files came along


@pytest.mark.parametrize(
    ("architecture", "structure"),
    [(architecture, None) for architecture in VLM_ARCHITECTURES] + [("llava", {"mlp": 0.25, "layers": 0.5})],
)
def test_disk_offload_writes_the_model_pruned_in_memory(architecture, structure, tmp_path):
    """LLaVA, Gemma 3 and Mistral 3 checkpoints keep the blocks under transformers' saved names
    (``language_model.model.layers``): the streamed output holds the pruned blocks, not the source's dense ones
    (nor, after a structure removed a block, the removed one)."""
    tiny_vlm(architecture).save_pretrained(tmp_path / "model")
    config = PruningConfig(method="sparsegpt", structure=structure, **CALIBRATION)
    in_memory = Pruner.from_pretrained(tmp_path / "model", config, device="cpu", progress=False)
    in_memory.prune(random_ids(8, 32))
    streamed = Pruner.from_pretrained(tmp_path / "model", config, device="cpu", progress=False, offload="disk")
    streamed.prune(random_ids(8, 32), output_dir=tmp_path / "out")
    saved = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").state_dict()
    expected = in_memory.model.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[name], value) for name, value in expected.items())


def test_onnx_export_of_a_vision_language_model_is_refused_with_the_way_to_deploy_it(tmp_path, capsys):
    from optimum_prune.export.onnx import export_onnx

    with pytest.raises(InputError, match="vision-language model needs its vision encoder.*onnxruntime-genai"):
        export_onnx(tiny_vlm("llava"), tmp_path / "onnx")
    tiny_vlm("qwen2_vl").save_pretrained(tmp_path / "qwen2_vl")
    flags = ["--model", str(tmp_path / "qwen2_vl"), "--method", "magnitude", "--output", str(tmp_path / "out")]
    assert run_main(*flags, "--export", "onnx") == 2
    assert "argument --export onnx: ONNX export writes a text causal LM" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_interrupted_image_text_run_resumes_to_the_same_model(tmp_path):
    """Killed after block 0 of a disk-offloaded run calibrated on image + text pairs; resumed, the output equals
    the uninterrupted run's (the work folder recognises the same processor inputs)."""
    from conftest import killed_at_block

    from optimum_prune.engine.blockwise import BlockwiseEngine

    _llava_with_processor(tmp_path / "llava")
    pairs = _image_text_file(tmp_path)
    config = PruningConfig(method="sparsegpt", num_samples=4, seq_len=24)

    def run(output, resume=False):
        pruner = Pruner.from_pretrained(tmp_path / "llava", config, device="cpu", progress=False, offload="disk")
        pruner.prune(pairs, output_dir=output, resume=resume)

    run(tmp_path / "whole")
    with killed_at_block(BlockwiseEngine, "_prune_block", 1), pytest.raises(KeyboardInterrupt):
        run(tmp_path / "resumed")
    run(tmp_path / "resumed", resume=True)
    whole, resumed = (
        transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / name).state_dict()
        for name in ("whole", "resumed")
    )
    assert all(torch.equal(resumed[name], value) for name, value in whole.items())


@pytest.mark.parametrize(
    ("architecture", "settings"),
    [("qwen2_5_vl", {"method": "sparsegpt", "pattern": "2:4"}), ("gemma3", {"method": "wanda", "allocation": "owl"})],
)
def test_n_m_patterns_and_owl_on_the_language_model(architecture, settings):
    pruner = Pruner.from_pretrained(
        tiny_vlm(architecture), PruningConfig(**settings, **CALIBRATION), device="cpu", progress=False
    )
    report = pruner.prune(random_ids(8, 32))
    assert report.global_sparsity == pytest.approx(0.5, abs=0.01) and report.allocation == settings.get(
        "allocation", "uniform"
    )
    for layer in report.layers:
        weight = pruner.model.get_submodule(layer.name).weight
        if "pattern" in settings:
            assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), layer.name
    if "allocation" in settings:
        assert len(set(report.block_sparsities)) > 1  # OWL spreads the sparsity over the blocks


def test_image_calibration_without_pillow_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    pairs = _image_text_file(tmp_path, count=1)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "PIL" else find_spec(name, *args)
    )
    config = PruningConfig(method="wanda", num_samples=1, seq_len=16)
    with pytest.raises(InputError, match=r"reads images with Pillow: pip install 'optimum-prune\[vision\]'"):
        Pruner.from_pretrained(tiny_vlm("llava"), config, progress=False).prune(pairs)
