"""Calibration data: every source kind, and reproducible ``(num_samples, seq_len)`` token windows."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
import torch
from conftest import C4_SAMPLE, GPT2_TOKENIZER, STORIES_260K, TINYSTORIES_VAL, tiny_model
from transformers import AutoTokenizer

from optimum_prune import Pruner, PruningConfig
from optimum_prune.calibration import calibration_ids, load_texts

TEXTS = [f"Once upon a time there was a cat number {i}. It liked to play in the sun all day." for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(STORIES_260K)


def test_list_of_strings():
    texts, name = load_texts(TEXTS)
    assert texts == TEXTS and name == "custom texts"


def test_dataset_with_text_column():
    dataset = datasets.Dataset.from_dict({"text": TEXTS, "id": list(range(40))})
    texts, _ = load_texts(dataset)
    assert texts == TEXTS
    renamed = dataset.rename_column("text", "content")
    assert load_texts(renamed, text_column="content")[0] == TEXTS
    with pytest.raises(ValueError, match="no 'text' column"):
        load_texts(renamed)


def test_local_jsonl_and_parquet_agree():
    jsonl, jsonl_name = load_texts(C4_SAMPLE)
    parquet, parquet_name = load_texts(C4_SAMPLE.with_suffix(".parquet"))
    assert len(jsonl) == 2000 and jsonl == parquet
    assert (jsonl_name, parquet_name) == ("c4_validation_2k.jsonl", "c4_validation_2k.parquet")
    with pytest.raises(ValueError, match="no 'body' column"):
        load_texts(C4_SAMPLE.with_suffix(".parquet"), text_column="body")


def test_local_txt_and_json(tmp_path):
    texts, name = load_texts(TINYSTORIES_VAL)
    assert len(texts) == 1 and texts[0].startswith("Spot. Spot saw the shiny car") and name == "tinystories_val.txt"
    (tmp_path / "rows.json").write_text(json.dumps([{"text": "a b"}, {"text": "c"}]))
    (tmp_path / "plain.json").write_text(json.dumps(["a b", "c"]))
    assert load_texts(tmp_path / "rows.json")[0] == load_texts(tmp_path / "plain.json")[0] == ["a b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="name the text field with text_column="):
        load_texts(tmp_path / "bad.jsonl")


def test_missing_file_and_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="No file at"):
        load_texts(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="Unsupported text file"):
        load_texts(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="is a folder: pass one .txt/.jsonl/.json/.parquet file"):
        load_texts(tmp_path)
    with pytest.raises(TypeError, match="Unsupported calibration data of type int"):
        load_texts(42)


@pytest.mark.parametrize("texts", [[], [""], ["   ", "\n\n"]])
def test_empty_text_is_an_error(texts):
    with pytest.raises(ValueError, match="holds no text"):
        load_texts(texts)


def test_windows_have_the_requested_shape_and_come_from_the_text(tokenizer):
    ids = calibration_ids(TEXTS, tokenizer, num_samples=6, seq_len=32, seed=0)
    assert ids.shape == (6, 32) and ids.dtype == torch.long
    assert (ids[:, 0] == tokenizer.bos_token_id).all()  # the Llama tokenizer adds BOS: every window starts with it
    stream = ids[:, 1:].flatten().tolist()  # then consecutive windows of one stream of texts joined by EOS
    assert tokenizer.eos_token_id in stream and tokenizer.bos_token_id not in stream
    first_text = tokenizer.decode(stream[: stream.index(tokenizer.eos_token_id)])
    assert first_text in TEXTS


def test_no_bos_for_tokenizers_that_add_none():
    gpt2 = AutoTokenizer.from_pretrained(GPT2_TOKENIZER)
    ids = calibration_ids(TEXTS, gpt2, num_samples=3, seq_len=16, seed=0)
    stream = gpt2(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert ids.shape == (3, 16) and any(ids[0, :5].tolist() == stream[i : i + 5] for i in range(len(stream)))


def test_sampling_is_deterministic_with_seed(tokenizer):
    first = calibration_ids(TEXTS, tokenizer, 4, 32, seed=1)
    assert torch.equal(first, calibration_ids(TEXTS, tokenizer, 4, 32, seed=1))
    assert not torch.equal(first, calibration_ids(TEXTS, tokenizer, 4, 32, seed=2))


def test_single_text_starts_at_a_seeded_offset(tokenizer):
    text = TINYSTORIES_VAL.read_text(encoding="utf-8")[:20000]
    stream = tokenizer(text, add_special_tokens=False)["input_ids"]
    first = calibration_ids([text], tokenizer, 4, 32, seed=1)
    assert torch.equal(first, calibration_ids([text], tokenizer, 4, 32, seed=1))
    assert not torch.equal(first, calibration_ids([text], tokenizer, 4, 32, seed=2))
    text_ids = first[:, 1:].flatten().tolist()  # after each window's BOS
    start = next(i for i in range(len(stream)) if stream[i : i + len(text_ids)] == text_ids)
    assert start > 0  # not always the head of the text


def test_small_corpus_overlaps_windows_with_a_warning(tokenizer):
    texts = TEXTS[:3]
    with pytest.warns(UserWarning, match="sampling overlapping windows"):
        ids = calibration_ids(texts, tokenizer, 8, 32, seed=0)
    assert ids.shape == (8, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(ids, calibration_ids(texts, tokenizer, 8, 32, seed=0))


def test_too_short_text_names_the_fix(tokenizer):
    with pytest.raises(ValueError, match="fewer than a window of seq_len=512: give more text or lower seq_len"):
        calibration_ids(["A short story."], tokenizer, 4, 512)


def test_pruner_calibration_from_text_and_token_ids(tokenizer):
    config = PruningConfig(method="wanda", num_samples=5, seq_len=16)
    pruner = Pruner.from_pretrained(tiny_model("llama"), config, tokenizer=tokenizer, device="cpu", progress=False)
    ids = pruner.calibration_ids(C4_SAMPLE)
    assert ids.shape == (5, 16) and pruner.config.dataset is None  # asking changes nothing
    given = torch.randint(0, 512, (3, 24), dtype=torch.int32)
    assert torch.equal(pruner.calibration_ids(given), given.long())
    assert (pruner.config.num_samples, pruner.config.seq_len) == (5, 16)
    pruner.prune(given)  # the recipe records what was run
    assert (pruner.config.num_samples, pruner.config.seq_len, pruner.config.dataset) == (3, 24, "token ids")
    with pytest.raises(ValueError, match=r"integer tensor of shape \(num_samples, seq_len\)"):
        pruner.calibration_ids(torch.rand(3, 24))
    with pytest.raises(ValueError, match=r"integer tensor of shape \(num_samples, seq_len\)"):
        pruner.calibration_ids(torch.zeros(24, dtype=torch.long))


def test_text_without_tokenizer_is_an_error():
    pruner = Pruner.from_pretrained(tiny_model("llama"), PruningConfig(method="wanda"), device="cpu", progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer: pass tokenizer="):
        pruner.prune(TEXTS)
