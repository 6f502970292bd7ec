"""Reading rows from files and the hub, chat formatting with response-only labels, classification
data, and dynamic padding."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from peftlab.train import CausalLMData, ClassificationData, DataError, load_rows, pad_collate
from peftlab.train.data import IGNORE_INDEX
from test_train_helpers import qa_rows, tiny_tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROWS = [{"prompt": "hi", "response": "yo"}, {"prompt": 'say "x", ok', "response": "x"}]


# ---------------------------------------------------------------------------------------------
# load_rows


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".json-data", ".csv", ".tsv"])
def test_load_rows_reads_every_local_format(tmp_path, suffix):
    if suffix == ".jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    elif suffix == ".json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif suffix == ".json-data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": ROWS}))
    else:
        sep = "," if suffix == ".csv" else "\t"
        path = tmp_path / f"d{suffix}"
        body = 'hi,yo\n"say ""x"", ok",x\n' if sep == "," else 'hi\tyo\nsay "x", ok\tx\n'
        path.write_text(f"prompt{sep}response\n{body}")
    assert load_rows(str(path)) == ROWS


def test_load_rows_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown data file extension '.txt'.*\.jsonl"):
        load_rows(str(tmp_path / "d.txt"))
    with pytest.raises(DataError, match="is a folder"):
        load_rows(str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match="line 2"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(DataError, match="list of objects"):
        load_rows(str(tmp_path / "bad.json"))
    (tmp_path / "ragged.tsv").write_text("a\tb\n1\t2\n3\n")
    with pytest.raises(DataError, match="line 3"):
        load_rows(str(tmp_path / "ragged.tsv"))


def test_hub_names_go_to_datasets_lazily(monkeypatch):
    calls = []
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, split, **kw: calls.append((path, split, kw)) or [{"text": "a", "label": 1}]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_rows("glue", split="validation", name="sst2") == [{"text": "a", "label": 1}]
    assert calls == [("glue", "validation", {"name": "sst2"})]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_rows("some/dataset")


def test_hub_path_with_real_datasets_on_a_local_file(tmp_path):
    pytest.importorskip("datasets")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert load_rows("json", split="train", data_files=str(path)) == ROWS


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared benchmark data not present")
def test_shared_benchmark_files_load():
    sst2 = load_rows(str(SHARED_DATA / "sst2" / "dev.tsv"))
    assert len(sst2) == 872 and set(sst2[0]) == {"sentence", "label"}
    alpaca = load_rows(str(SHARED_DATA / "alpaca" / "alpaca_5000.json"))
    assert len(alpaca) == 5000 and set(alpaca[0]) == {"instruction", "input", "output"}
    assert len(load_rows(str(SHARED_DATA / "gsm8k" / "test.jsonl"))) == 1319


# ---------------------------------------------------------------------------------------------
# CausalLMData


def test_causal_lm_labels_cover_the_response_only():
    tok = tiny_tokenizer()
    data = CausalLMData(tok, ROWS, max_length=64)
    example = data[0]
    assert set(example) == {"input_ids", "attention_mask", "labels"}
    ids, labels = example["input_ids"], example["labels"]
    answer = labels != IGNORE_INDEX
    assert tok.decode(ids[~answer]) == "<s><|user|>hi<|end|>\n<|assistant|>"
    assert tok.decode(ids[answer]) == "yo<|end|>\n"  # the end-of-turn marker is learned too
    assert torch.equal(labels[answer], ids[answer])


def test_causal_lm_system_message_and_joined_prompt_columns():
    tok = tiny_tokenizer()
    rows = [{"instruction": "add", "input": "1 2", "output": "3"}, {"instruction": "hi", "input": "", "output": "yo"}]
    data = CausalLMData(tok, rows, prompt_key=("instruction", "input"), response_key="output", system="be brief")
    text = tok.decode(data[0]["input_ids"])
    assert text.startswith("<s><|system|>be brief<|end|>\n<|user|>add\n\n1 2<|end|>")
    assert "<|user|>hi<|end|>" in tok.decode(data[1]["input_ids"])  # empty input column skipped


def test_causal_lm_missing_column_lists_available_ones():
    with pytest.raises(DataError, match="no column 'answer'; available columns: prompt, response"):
        CausalLMData(tiny_tokenizer(), ROWS, response_key="answer")


def test_causal_lm_without_chat_template_falls_back_with_a_warning():
    tok = tiny_tokenizer(chat_template=False)
    with pytest.warns(UserWarning, match="no chat template"):
        data = CausalLMData(tok, ROWS)
    example = data[0]
    answer = example["labels"] != IGNORE_INDEX
    assert tok.decode(example["input_ids"][answer]) == "yo</s>"


def test_causal_lm_truncation_drops_rows_without_response():
    tok = tiny_tokenizer()
    rows = [{"prompt": "x" * 40, "response": "y"}, {"prompt": "a", "response": "b" * 40}]
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        data = CausalLMData(tok, rows, max_length=24)
    assert len(data) == 1 and len(data[0]["input_ids"]) == 24
    with pytest.raises(DataError, match="raise max_length"):
        CausalLMData(tok, rows[:1], max_length=24)


def test_collate_pads_to_the_longest_in_the_batch():
    tok = tiny_tokenizer()
    data = CausalLMData(tok, qa_rows(3) + [{"prompt": "a much longer question here", "response": "ok"}], max_length=128)
    short, long_ = data[0], data[3]
    batch = data.collate([short, long_])
    width = len(long_["input_ids"])
    assert batch["input_ids"].shape == (2, width) and batch["labels"].shape == (2, width)
    pad = width - len(short["input_ids"])
    assert (batch["input_ids"][0, -pad:] == tok.pad_token_id).all()
    assert (batch["labels"][0, -pad:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, -pad:] == 0).all() and batch["attention_mask"][1].all()
    assert len(data.collate([short])["input_ids"][0]) == len(short["input_ids"])  # no padding at all


def test_pad_collate_stacks_scalar_fields():
    batch = pad_collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 9]] and batch["labels"].tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# ClassificationData


def test_classification_with_integer_string_labels_as_csv_gives_them():
    tok = tiny_tokenizer()
    rows = [{"sentence": "good film", "label": "1"}, {"sentence": "bad", "label": "0"}]
    data = ClassificationData(tok, rows, text_key="sentence")
    assert data.label2id == {0: 0, 1: 1} and data.num_labels == 2
    assert data[0]["labels"].item() == 1 and tok.decode(data[0]["input_ids"]) == "good film"
    batch = data.collate([data[0], data[1]])
    assert batch["labels"].tolist() == [1, 0] and batch["input_ids"].shape == (2, 9)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 6


def test_classification_named_labels_and_text_pairs():
    tok = tiny_tokenizer()
    rows = [{"a": "x", "b": "y", "label": "neutral"}, {"a": "x", "b": "z", "label": "contradiction"}]
    data = ClassificationData(tok, rows, text_key=("a", "b"), max_length=16)
    assert data.label2id == {"contradiction": 0, "neutral": 1}
    assert data[0]["labels"].item() == 1 and len(data[0]["input_ids"]) == 2
    with pytest.raises(DataError, match="label 'neutral', which is not one of"):
        ClassificationData(tok, rows, text_key=("a", "b"), label2id={"contradiction": 0, "entailment": 1})
    with pytest.raises(DataError, match="no column 'text'; available columns: a, b, label"):
        ClassificationData(tok, rows)
