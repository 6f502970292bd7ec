"""The benchmark's tasks: each is data + model + metric, with the budget it is run at.

Built in:

- ``sst2``: GLUE SST-2 (binary sentiment) with all-MiniLM-L6-v2 and a classification head;
  accuracy on the 872-row dev set.
- ``extract``: peftlab's generated sentence-to-JSON task with SmolLM2-135M-Instruct; exact match.
- ``gsm8k``: grade-school math with SmolLM2-135M-Instruct; exact match of the final number.
- ``alpaca``: instruction following (the Alpaca subset) with SmolLM2-135M-Instruct; held-out
  loss and perplexity of the responses.

A user's own data is a task spec (a JSON or YAML file or a dict): ``{"name", "kind":
"classification" | "causal-lm", "model", "train", "eval", "text_key", "label_key" (or
"prompt_key", "response_key"), "metric"}``; ``train`` and ``eval`` are local files or Hugging Face
``datasets`` names, read by ``peftlab.train.load_rows``.

Data paths are settings (``data_dir``); the defaults read ``../shared/data`` next to the checkout
when it exists and otherwise explain where to get the files.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ..errors import ConfigError, DataError

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc")
GENERATION_METRICS = ("exact_match", "number_match")
METRICS = CLASSIFICATION_METRICS + GENERATION_METRICS + ("perplexity",)
# Where the benchmark data lives unless a task says otherwise: $PEFTLAB_DATA, or the shared
# folder beside this checkout.
DEFAULT_DATA_DIR = Path(os.environ.get("PEFTLAB_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))


@dataclass
class Task:
    """One benchmark task. ``train`` / ``eval`` are files (or hub names); the keys name their columns."""

    name: str
    kind: str  # "classification" or "causal-lm"
    model: str
    metric: str
    train: str = ""
    eval: str = ""
    text_key: str = "text"
    label_key: str = "label"
    prompt_key: str = "prompt"
    response_key: str = "response"
    system: str | None = None
    train_rows: int = 2000
    eval_rows: int = 0  # 0: the whole eval set
    steps: int = 0  # 0: one pass over train_rows
    batch_size: int = 32
    max_length: int = 128
    max_new_tokens: int | None = None
    group_by_length: bool = True  # batches of rows of similar length: SST-2 pads ~3x less
    source: str = ""  # where to get the data, for the error when it is missing

    def validate(self) -> None:
        if self.kind not in ("classification", "causal-lm"):
            raise ConfigError(f"task {self.name}: kind must be classification or causal-lm, got {self.kind!r}")
        allowed = CLASSIFICATION_METRICS if self.kind == "classification" else GENERATION_METRICS + ("perplexity",)
        if self.metric not in allowed:
            raise ConfigError(f"task {self.name}: metric {self.metric!r} does not fit a {self.kind} task; "
                              f"choose one of {', '.join(allowed)}")
        for key in ("train_rows", "eval_rows", "steps", "batch_size", "max_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (key in ("batch_size", "max_length")
                                                                                     and value == 0):
                raise ConfigError(f"task {self.name}: {key} must be a non-negative integer, got {value!r}")

    @property
    def total_steps(self) -> int:
        return self.steps or max(1, -(-self.train_rows // self.batch_size))

    def with_settings(self, **settings) -> "Task":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ConfigError(f"task {self.name}: unknown settings {unknown}; known: {', '.join(sorted(known))}")
        task = replace(self, **settings)
        task.validate()
        return task

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- data ----------------------------------------------------------------------------

    def rows(self, seed: int = 0) -> tuple[list, list]:
        """(training rows, evaluation rows); the training rows are a seeded sample of ``train_rows``."""
        reader = BUILTIN_READERS.get(self.name)
        train, held_out = reader(self) if reader else (_read(self, self.train), _read(self, self.eval))
        if self.train_rows and len(train) > self.train_rows:
            train = random.Random(seed).sample(train, self.train_rows)
        if self.eval_rows:
            held_out = held_out[: self.eval_rows]
        if not train or not held_out:
            raise DataError(f"task {self.name}: no {'training' if not train else 'evaluation'} rows")
        return train, held_out


def _read(task: Task, source: str) -> list:
    from ..train import load_rows

    if not source:
        raise ConfigError(f"task {task.name}: give both 'train' and 'eval' (files or datasets names)")
    path = Path(source)
    if not path.is_absolute() and not path.exists() and (DEFAULT_DATA_DIR / source).exists():
        path = DEFAULT_DATA_DIR / source
    if not path.exists() and ("/" in source or path.suffix):
        hint = f" Get it from {task.source}." if task.source else ""
        raise DataError(f"task {task.name}: data file {path} does not exist.{hint} Point the task at your copy "
                        f"(e.g. --set train=PATH) or set PEFTLAB_DATA to the folder holding {Path(source).parent}/")
    return load_rows(str(path) if path.exists() else source)


# ---- the built-in tasks ----------------------------------------------------------------------

def _extract_rows(task: Task) -> tuple[list, list]:
    from ..tasks import extract

    return extract.make_splits(task.train_rows, task.eval_rows or 100, seed=0)


def _alpaca_rows(task: Task) -> tuple[list, list]:
    rows = [{"prompt": (r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")).strip(), "response": r["output"]}
            for r in _read(task, task.train)]
    held_out = task.eval_rows or 200
    return rows[:-held_out], rows[-held_out:]  # the last rows are the held-out split, whatever the sample


BUILTIN_READERS = {"extract": _extract_rows, "alpaca": _alpaca_rows}

TASKS = {
    "sst2": Task(name="sst2", kind="classification", model="minilm", metric="accuracy", train="sst2/train.tsv",
                 eval="sst2/dev.tsv", text_key="sentence", label_key="label", train_rows=2000, batch_size=16,
                 max_length=64, source="GLUE (https://gluebenchmark.com/tasks) or datasets 'glue', 'sst2'"),
    "extract": Task(name="extract", kind="causal-lm", model="smollm2-135m", metric="exact_match", train_rows=200,
                    eval_rows=50, batch_size=4, steps=50, max_length=128, system="JSON only."),
    "gsm8k": Task(name="gsm8k", kind="causal-lm", model="smollm2-135m", metric="number_match", train="gsm8k/train.jsonl",
                  eval="gsm8k/test.jsonl", prompt_key="question", response_key="answer", train_rows=400, eval_rows=50,
                  batch_size=4, steps=100, max_length=320, max_new_tokens=256,
                  source="https://github.com/openai/grade-school-math (grade_school_math/data/)"),
    "alpaca": Task(name="alpaca", kind="causal-lm", model="smollm2-135m", metric="perplexity",
                   train="alpaca/alpaca_5000.json", train_rows=800, eval_rows=200, batch_size=4, steps=100,
                   max_length=256, source="https://github.com/tatsu-lab/stanford_alpaca"),
}


def get_task(name_or_spec) -> Task:
    """A built-in task by name, or a user's task from a spec dict or a JSON/YAML file."""
    if isinstance(name_or_spec, Task):
        return name_or_spec
    if isinstance(name_or_spec, dict):
        spec = dict(name_or_spec)
    elif str(name_or_spec) in TASKS:
        return TASKS[str(name_or_spec)]
    elif Path(str(name_or_spec)).is_file():
        spec = _read_spec(Path(str(name_or_spec)))
    else:
        raise ConfigError(f"unknown task {name_or_spec!r}; built in: {', '.join(TASKS)}, or a task spec file (JSON/YAML)")
    known = {f.name for f in fields(Task)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"task spec: unknown keys {unknown}; known: {', '.join(sorted(known))}")
    for key in ("name", "kind", "model", "metric"):
        if key not in spec:
            raise ConfigError(f"task spec: '{key}' is required (e.g. name: mydata, kind: classification, "
                              "model: minilm, metric: accuracy)")
    task = Task(**spec)
    task.validate()
    return task


def _read_spec(path: Path) -> dict:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        spec = yaml.safe_load(text)
    else:
        spec = json.loads(text)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a task spec is a mapping of settings")
    base = path.parent
    for key in ("train", "eval"):  # relative data paths are relative to the spec file
        if spec.get(key) and not Path(spec[key]).is_absolute() and (base / spec[key]).exists():
            spec[key] = str(base / spec[key])
    return spec


# ---- metrics -------------------------------------------------------------------------------

def majority_share(labels: list) -> float:
    """The share of the most common label: the accuracy of always answering it."""
    return max(labels.count(label) for label in set(labels)) / len(labels)


def classification_metric(name: str, predictions: list, labels: list) -> float:
    """Accuracy, F1 (binary for two classes, macro otherwise) or Matthews correlation."""
    if name == "accuracy":
        return sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1)
    classes = sorted(set(labels) | set(predictions))
    if name == "f1":
        scores = []
        for c in (classes[-1:] if len(classes) == 2 else classes):
            tp = sum(p == c and y == c for p, y in zip(predictions, labels))
            fp = sum(p == c and y != c for p, y in zip(predictions, labels))
            fn = sum(p != c and y == c for p, y in zip(predictions, labels))
            scores.append(2 * tp / max(2 * tp + fp + fn, 1))
        return sum(scores) / len(scores)
    if name == "mcc":  # the multi-class form (Gorodkin, 2004); the binary formula when there are two classes
        n = len(labels)
        correct = sum(p == y for p, y in zip(predictions, labels))
        true_counts = [sum(y == c for y in labels) for c in classes]
        pred_counts = [sum(p == c for p in predictions) for c in classes]
        cov = correct * n - sum(t * p for t, p in zip(true_counts, pred_counts))
        denominator = ((n * n - sum(p * p for p in pred_counts)) * (n * n - sum(t * t for t in true_counts))) ** 0.5
        return cov / denominator if denominator else 0.0
    raise ConfigError(f"unknown classification metric {name!r}")


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: the number after '####', else the last number."""
    marked = "####" in text
    found = _NUMBER.findall(text.split("####", 1)[1] if marked else text)
    if not found:
        return None
    number = (found[0] if marked else found[-1]).replace(",", "")
    return number[:-2] if number.endswith(".0") else number

