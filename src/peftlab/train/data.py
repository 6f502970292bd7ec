"""Training data: read rows from files or the Hugging Face hub, turn them into token tensors.

Three small pieces a reader can take one at a time:

- ``load_rows(source)`` -> ``list[dict]`` from a local JSONL / JSON / CSV / TSV file or a
  ``datasets`` name. Everything downstream sees plain dicts, so a new file format is one function.
- ``CausalLMData`` formats instruction rows with the tokenizer's chat template and puts the loss on
  the response only (prompt and padding labels are -100, the value torch's cross entropy ignores).
- ``ClassificationData`` tokenizes text (or text pairs) with an integer label per row.

Both datasets tokenize eagerly in ``__init__``: a missing column or an empty row fails before the
first training step, not an hour into it, and ``__getitem__`` is a cheap lookup.
"""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a classifier's forward takes


# ---------------------------------------------------------------------------------------------
# Reading rows


def load_rows(source, split: str = "train", **hub_kwargs) -> list[dict]:
    """Rows of a local file (by extension) or of a Hugging Face ``datasets`` name.

    A source that exists on disk, or that looks like a file path (a known extension, a folder
    separator), is read locally; anything else is taken as a hub dataset name. ``split`` and
    ``hub_kwargs`` (e.g. ``name=`` for a subset, ``data_files=``) only apply to ``datasets``: a
    local file is one split.
    """
    path = Path(source)
    if path.is_file():
        return _read_file(path)
    if path.exists():
        raise DataError(f"{path} is a folder; point at one data file ({', '.join(FILE_SUFFIXES)})")
    if _looks_like_path(str(source)):
        raise DataError(f"data file {path} does not exist (looked in {path.resolve().parent})")
    return _load_hub_rows(str(source), split, hub_kwargs)


def _looks_like_path(source: str) -> bool:
    return source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~")) or "\\" in source


def _read_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_tsv}
    if suffix not in readers:
        raise DataError(f"{path}: unknown data file extension {suffix or '(none)'!r}; use one of "
                        f"{', '.join(FILE_SUFFIXES)} (other formats through `datasets`, e.g. "
                        f"load_rows('parquet', data_files='{path}'))")
    rows = readers[suffix](path)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: each line should be a JSON object, found {type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error}); for one object per line name the file .jsonl") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f'{path}: expected a JSON list of objects or {{"data": [objects]}}')
    return data


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return _check_table(path, list(csv.DictReader(f)))


def _read_tsv(path: Path) -> list[dict]:
    # QUOTE_NONE: TSV corpora (GLUE among them) contain bare quote characters inside the text.
    with open(path, encoding="utf-8-sig", newline="") as f:
        return _check_table(path, list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)))


def _check_table(path: Path, rows: list[dict]) -> list[dict]:
    for number, row in enumerate(rows, 2):  # line 1 is the header
        if None in row or None in row.values():
            raise DataError(f"{path}, line {number}: the row has a different number of columns than the header")
    return rows


def _load_hub_rows(name: str, split: str, kwargs: dict) -> list[dict]:
    try:
        import datasets  # optional: only needed for hub datasets
    except ImportError:
        raise DataError(f"{name!r} is not a local file, and reading it as a Hugging Face dataset needs the "
                        "`datasets` package (pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as error:  # datasets raises many types (network, missing split, bad name)
        raise DataError(f"could not load Hugging Face dataset {name!r} (split {split!r}): {error}") from None
    return [dict(row) for row in dataset]


def require_columns(rows: list[dict], columns) -> None:
    """Fail early, naming the columns the data does have, so a typo is a one-line fix."""
    available = sorted(rows[0]) if rows else []
    for number, row in enumerate(rows):
        missing = [c for c in columns if c not in row]
        if missing:
            where = "the data" if number == 0 else f"row {number}"
            raise DataError(f"{where} has no column {', '.join(map(repr, missing))}; "
                            f"available columns: {', '.join(available)}")


# ---------------------------------------------------------------------------------------------
# Batching


def pad_collate(batch: list[dict], pad_id: int = 0) -> dict:
    """Stack a list of examples (dicts of int lists, tensors or numbers) into a batch.

    Fields of one shape are stacked; 1-D fields of different lengths are right-padded to the longest
    in *this* batch (dynamic padding wastes far less compute than padding everything to max_length):
    ``labels`` with -100, so padding never counts in the loss, ``input_ids`` with ``pad_id``, others
    with 0. Padded rows with ``input_ids`` but no ``attention_mask`` get one (ones on their own
    tokens), so padding is never attended to and ``pad_id`` only shows in the ids. It fits a dataset's
    ``collate`` as it is, or with ``functools.partial(pad_collate, pad_id=...)``."""
    if not batch or not all(isinstance(example, dict) for example in batch):
        raise DataError("a training example must be a dict of model inputs (input_ids, attention_mask, labels, ...), "
                        f"got {type(batch[0]).__name__ if batch else 'an empty batch'}")
    keys = list(batch[0])
    for example in batch:
        if set(example) != set(keys):
            raise DataError(f"examples in one batch must have the same fields: {sorted(keys)} vs {sorted(example)}")
    if "attention_mask" not in keys and len({len(example.get("input_ids", ())) for example in batch}) > 1:
        batch = [{**example, "attention_mask": [1] * len(example["input_ids"])} for example in batch]
        keys.append("attention_mask")
    out = {}
    for key in keys:
        values = [_as_tensor(example[key], key) for example in batch]
        if all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
            continue
        if any(v.dim() != 1 for v in values):
            raise DataError(f"field '{key}' has shapes {sorted({tuple(v.shape) for v in values})} in one batch; "
                            "only 1-D fields (token sequences) can be padded to a common length")
        fill = IGNORE_INDEX if key == "labels" else pad_id if key == "input_ids" else 0
        padded = torch.full((len(values), max(v.shape[0] for v in values)), fill, dtype=values[0].dtype)
        for row, value in enumerate(values):
            padded[row, : value.shape[0]] = value
        out[key] = padded
    return out


def _as_tensor(value, key: str) -> torch.Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise DataError(f"field '{key}' holds {type(value).__name__} values ({str(value)[:40]!r}...), which are not "
                        "numbers: train() takes tokenized rows (input_ids, attention_mask, labels as int lists), or "
                        "text through CausalLMData(tokenizer, rows) / ClassificationData(tokenizer, rows)") from None


def pad_id_of(source) -> int:
    """The padding id of a tokenizer or a model config. Models without a pad token (most causal LMs)
    pad with EOS; the attention mask and -100 labels make the choice invisible to the loss."""
    for name in ("pad_token_id", "eos_token_id"):
        token_id = getattr(source, name, None)
        if isinstance(token_id, (list, tuple)):  # configs may list several end-of-sequence ids
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            return int(token_id)
    return 0


class _TokenizedData(Dataset):
    """A list of tokenized examples (dicts of int lists) with a padding collate."""

    def __init__(self, tokenizer, examples: list[dict]):
        self.tokenizer = tokenizer
        self.examples = examples
        self.pad_id = pad_id_of(tokenizer)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return {key: torch.tensor(value, dtype=torch.long) for key, value in self.examples[index].items()}

    def collate(self, batch: list[dict]) -> dict:
        return pad_collate(batch, self.pad_id)


def _text_of(row: dict, keys) -> str:
    """One string from one column, or several columns joined by blank lines (empty ones skipped),
    e.g. Alpaca's ``("instruction", "input")``."""
    if isinstance(keys, str):
        return str(row[keys])
    return "\n\n".join(str(row[k]) for k in keys if row[k] not in (None, ""))


def _as_keys(keys) -> list:
    return [keys] if isinstance(keys, str) else list(keys)


# ---------------------------------------------------------------------------------------------
# Causal LM instruction data


class CausalLMData(_TokenizedData):
    """Instruction rows -> ``input_ids`` / ``attention_mask`` / ``labels`` for a causal LM.

    Each row becomes a chat (optional system message, the prompt as the user message, the response
    as the assistant message) rendered by the tokenizer's own chat template, so training sees
    exactly the format the model is prompted with at inference. Labels are -100 on everything up to
    the assistant's reply, so the model learns to answer, not to repeat questions.

    ``prompt_key`` may be a list of columns joined by blank lines. A tokenizer without a chat
    template falls back to ``prompt + "\\n\\n" + response + eos`` (with a warning). Sequences are cut
    at ``max_length``; rows left with no response token are dropped (with a warning).
    """

    def __init__(self, tokenizer, rows: list[dict], prompt_key="prompt", response_key: str = "response",
                 system: str | None = None, max_length: int = 256):
        if max_length < 2:
            raise DataError(f"max_length must be at least 2, got {max_length}")
        require_columns(rows, _as_keys(prompt_key) + [response_key])
        if getattr(tokenizer, "chat_template", None) is None:
            warnings.warn("the tokenizer has no chat template; formatting rows as 'prompt\\n\\nresponse<eos>'",
                          stacklevel=2)
        examples = []
        for row in rows:
            example = self._encode(tokenizer, system, _text_of(row, prompt_key), str(row[response_key]), max_length)
            if any(label != IGNORE_INDEX for label in example["labels"]):
                examples.append(example)
        dropped = len(rows) - len(examples)
        if not examples:
            raise DataError(f"every row's prompt fills max_length={max_length} tokens, leaving no response to train "
                            "on; raise max_length or shorten the prompts")
        if dropped:
            warnings.warn(f"dropped {dropped} of {len(rows)} rows whose prompt fills max_length={max_length} tokens",
                          stacklevel=2)
        super().__init__(tokenizer, examples)

    @staticmethod
    def _encode(tokenizer, system, prompt: str, response: str, max_length: int) -> dict:
        prefix, full = render_chat(tokenizer, system, prompt, response)
        if not full.startswith(prefix):
            raise DataError("the chat template renders the prompt differently with and without the reply, so the "
                            "response tokens cannot be found; use a tokenizer with a standard chat template")
        if getattr(tokenizer, "is_fast", False):
            encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            # A token belongs to the response when it starts at or after the end of the prompt text.
            is_prompt = [start < len(prefix) for start, _ in encoded["offset_mapping"]]
        else:
            ids = tokenizer(full, add_special_tokens=False)["input_ids"]
            prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
            same = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
            is_prompt = [i < same for i in range(len(ids))]
        labels = [IGNORE_INDEX if masked else token for token, masked in zip(ids, is_prompt)]
        ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def render_chat(tokenizer, system: str | None, prompt: str, response: str) -> tuple[str, str]:
    """(text up to where the assistant's reply starts, full text), both as strings."""
    if getattr(tokenizer, "chat_template", None) is None:
        head = f"{system}\n\n" if system else ""
        prefix = f"{head}{prompt}\n\n"
        return prefix, prefix + response + (tokenizer.eos_token or "")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    prefix = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
    return prefix, full


# ---------------------------------------------------------------------------------------------
# Sequence classification data


class ClassificationData(_TokenizedData):
    """Text rows with a label -> ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``) / ``labels``.

    ``text_key`` is one column, or two columns encoded as a text pair (e.g. NLI premise and
    hypothesis). Labels may be integers, integer strings (as CSV/TSV give them) or names; names are
    numbered in sorted order unless ``label2id`` is given. ``self.label2id`` holds the mapping used,
    for the model config (``num_labels``) and for reading predictions back.
    """

    def __init__(self, tokenizer, rows: list[dict], text_key="text", label_key: str = "label",
                 max_length: int = 128, label2id: dict | None = None):
        keys = _as_keys(text_key)
        if not 1 <= len(keys) <= 2:
            raise DataError(f"text_key is one column or a pair of columns, got {keys}")
        require_columns(rows, keys + [label_key])
        if label2id is None:
            self.label2id = infer_label2id(row[label_key] for row in rows)
        else:
            self.label2id = {_label_key(k): v for k, v in label2id.items()}
        texts = [str(row[keys[0]]) for row in rows]
        pairs = [str(row[keys[1]]) for row in rows] if len(keys) == 2 else None
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
        examples = []
        for index, row in enumerate(rows):
            example = {key: values[index] for key, values in encoded.items() if key in MODEL_INPUTS}
            example["labels"] = self._label_id(row[label_key], index)
            examples.append(example)
        super().__init__(tokenizer, examples)

    def _label_id(self, label, index: int) -> int:
        key = _label_key(label)
        if key not in self.label2id:
            raise DataError(f"row {index} has label {label!r}, which is not one of {sorted(self.label2id)}")
        return self.label2id[key]

    @property
    def num_labels(self) -> int:
        return len(self.label2id)


def _label_key(label):
    """Integer-like labels (1, "1", 1.0) all become the int 1; anything else stays a string."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    if isinstance(label, float) and label.is_integer():
        return int(label)
    text = str(label).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def infer_label2id(labels) -> dict:
    """Integer labels map to themselves (0..n-1 as the data has them); names are numbered in sorted order."""
    keys = {_label_key(label) for label in labels}
    if all(isinstance(k, int) for k in keys):
        if min(keys) < 0:
            raise DataError(f"integer labels must be >= 0, found {min(keys)}")
        return {k: k for k in range(max(keys) + 1)}
    return {k: i for i, k in enumerate(sorted(keys, key=str))}
