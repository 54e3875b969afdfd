"""push_to_hub and the model card, against a local fake Hub (tests/hub_server.py); nothing leaves 127.0.0.1."""

from __future__ import annotations

import json
import logging

import huggingface_hub
import pytest
import yaml
from conftest import STORIES_260K
from hub_server import FakeHub
from huggingface_hub import ModelCard
from safetensors.torch import load as load_safetensors

from optimum_prune import Pruner, PruningConfig, load_pruned

TOKEN = "hf_optimumPruneTestToken0123456789xyz"
PERPLEXITY = {"dataset": "tinystories", "before": 4.06, "after": 9.5, "seq_len": 512}


@pytest.fixture(scope="module")
def pruner() -> Pruner:
    pruner = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude", sparsity=0.5), device="cpu")
    pruner.progress = False
    pruner.prune()
    return pruner


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    with FakeHub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield hub


def authorizations(hub: FakeHub) -> set[str | None]:
    """The Authorization headers of the repository calls (huggingface_hub also makes an anonymous GET of its own)."""
    return {auth for _, path, auth in hub.recorded.requests if path.startswith(("/api/repos/", "/api/models/"))}


def card_metadata(text: str) -> dict:
    return yaml.safe_load(text.split("---")[1])


def test_push_uploads_everything_in_one_commit(pruner: Pruner, hub: FakeHub, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)
    info = pruner.push_to_hub("someone/stories-magnitude-50", token=TOKEN, private=True, perplexity=PERPLEXITY)

    assert hub.recorded.created == [
        {"name": "stories-magnitude-50", "organization": "someone", "visibility": "private", "type": "model"}
    ]
    assert len(hub.recorded.commits) == 1, "everything goes in a single commit"
    commit = hub.recorded.commits[0]
    assert (commit["repo"], commit["revision"]) == ("someone/stories-magnitude-50", "main")
    assert "magnitude" in commit["header"]["summary"]
    assert info.oid == "0123456789abcdef0123456789abcdef01234567"
    files = commit["files"]
    assert {"README.md", "config.json", "model.safetensors", "pruning_config.json", "tokenizer.json"} <= set(files)

    weights = load_safetensors(files["model.safetensors"])
    for layer in pruner.report.layers:
        uploaded = weights[f"{layer.name}.weight"]
        assert float((uploaded == 0).float().mean()) == pytest.approx(layer.sparsity)
        assert uploaded.equal(pruner.model.get_submodule(layer.name).weight.detach())
    assert json.loads(files["pruning_config.json"])["method"] == "magnitude"
    assert json.loads(files["config.json"])["optimum_prune"]["target_sparsity"] == 0.5

    readme = files["README.md"].decode()
    metadata = card_metadata(readme)
    assert metadata["library_name"] == "transformers"
    assert "base_model" not in metadata, "a local folder is no Hub base model"
    assert {"pruned", "sparse", "magnitude", "unstructured", "optimum-prune"} <= set(metadata["tags"])
    metrics = metadata["model-index"][0]["results"][0]["metrics"]
    assert {(metric["name"], metric["value"]) for metric in metrics} == {
        ("Perplexity (pruned)", 9.5),
        ("Perplexity (dense base model)", 4.06),
    }
    assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "tinystories"
    for layer in pruner.report.layers:
        assert f"`{layer.name}`" in readme
    assert 'AutoModelForCausalLM.from_pretrained("someone/stories-magnitude-50")' in readme

    # The token reaches the server, and nowhere else.
    assert authorizations(hub) == {f"Bearer {TOKEN}"}
    out, err = capfd.readouterr()
    assert TOKEN not in out + err + caplog.text


def test_compressed_push_with_saved_token(pruner: Pruner, hub: FakeHub, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    pruner.push_to_hub("someone/compressed", format="compressed")
    files = hub.recorded.commits[0]["files"]
    assert "model.sparse.safetensors.index.json" in files
    assert "load_pruned" in files["README.md"].decode()
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    reloaded = load_pruned(tmp_path)
    for name, tensor in pruner.model.state_dict().items():
        assert reloaded.state_dict()[name].equal(tensor), name
    assert authorizations(hub) == {f"Bearer {TOKEN}"}


def test_no_token_fails_before_any_request(pruner: Pruner, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("optimum_prune.hub.push.get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a write token"):
        pruner.push_to_hub("someone/model")
    assert authorizations(hub) == set()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"format": "gguf"}, "Unknown format"),
        ({"perplexity": {"before": 3.0}}, "perplexity must be a dict"),
        ({"perplexity": {"dataset": "c4", "after": -1}}, "positive number"),
        ({"perplexity": {"dataset": "c4", "after": 2.0, "ppl": 1}}, "Unknown perplexity keys"),
    ],
)
def test_bad_arguments_fail_before_any_request(pruner: Pruner, hub: FakeHub, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        pruner.push_to_hub("someone/model", token=TOKEN, **kwargs)
    assert authorizations(hub) == set()


def test_unpruned_model_is_refused(hub: FakeHub) -> None:
    unpruned = Pruner.from_pretrained(STORIES_260K, PruningConfig(method="magnitude", sparsity=0.5), device="cpu")
    with pytest.raises(RuntimeError, match="call prune"):
        unpruned.push_to_hub("someone/model", token=TOKEN)
    assert authorizations(hub) == set()


def test_model_card_base_model_and_recipe(pruner: Pruner) -> None:
    card = pruner.model_card("me/x", base_model="karpathy/tinyllamas")
    assert isinstance(card, ModelCard)
    assert card.data.base_model == "karpathy/tinyllamas"
    assert card.data.eval_results is None, "no model-index without a measured perplexity"
    assert "| method | magnitude |" in card.text
    assert "| target sparsity | 0.5 |" in card.text
    reloaded = ModelCard(str(card))
    assert reloaded.data.tags == card.data.tags


def test_offline_mode_is_refused(pruner: Pruner, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        pruner.push_to_hub("someone/model", token=TOKEN)
    assert authorizations(hub) == set()
