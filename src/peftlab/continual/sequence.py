"""Task sequences: which tasks, in which order, with which rows, over one shared label space.

The four text-classification tasks of the continual-learning literature (Zhang et al., 2015 data, as
LAMOL, Progressive Prompts and O-LoRA use them) are built in: ``agnews``, ``amazon``, ``yelp`` and
``dbpedia``, read from ``continual/`` under the benchmark data folder (``$PEFTLAB_DATA`` or
``../shared/data``; see its README). Any classification task the benchmark knows, built in
(``sst2``) or a task spec file (``peftlab.bench.tasks``), can be in a sequence too.

All tasks share one label space, the union of their label words: ``amazon`` and ``yelp`` both
answer "very negative" .. "very positive" and share those five classes, and the model never gets
told which task a row comes from (``model.py``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from ..bench.tasks import Task, get_task
from ..errors import ConfigError, DataError
from ..train.data import _label_key

_SOURCE = "the O-LoRA repository's CL_Benchmark (github.com/cmnfriend/O-LoRA)"


def _builtin(name: str) -> Task:
    return Task(name=name, kind="classification", model="minilm", metric="accuracy", train=f"continual/{name}_train.jsonl",
                eval=f"continual/{name}_test.jsonl", text_key="text", label_key="label", train_rows=400, batch_size=16,
                max_length=64, source=_SOURCE)


CONTINUAL_TASKS = {name: _builtin(name) for name in ("agnews", "amazon", "yelp", "dbpedia")}
DEFAULT_SEQUENCE = ("agnews", "amazon", "yelp", "dbpedia")


def resolve_task(name_or_spec) -> Task:
    """A continual task by name, else any benchmark task (built in or a spec file); classification only."""
    if isinstance(name_or_spec, str) and name_or_spec in CONTINUAL_TASKS:
        return CONTINUAL_TASKS[name_or_spec]
    try:
        task = get_task(name_or_spec)
    except ConfigError:
        raise ConfigError(f"unknown task {name_or_spec!r}; use {', '.join(CONTINUAL_TASKS)}, a built-in benchmark "
                          "classification task (sst2) or a task spec file (JSON/YAML)") from None
    if task.kind != "classification":
        raise ConfigError(f"task {task.name} is a {task.kind} task; continual learning here takes classification tasks "
                          f"(e.g. {', '.join(CONTINUAL_TASKS)})")
    return task


def resolve_sequence(tasks, order=None) -> list:
    """The tasks in training order. ``tasks``: names or specs (a list or a comma-separated string);
    ``order``: the same tasks listed again in another order (names or 0-based positions)."""
    names = _split(tasks)
    if not names:
        raise ConfigError("the task sequence is empty; give tasks, e.g. --tasks agnews,amazon,yelp,dbpedia")
    resolved = [resolve_task(n) for n in names]
    seen = [t.name for t in resolved]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"task sequence {seen} names a task twice; each task is one stage")
    if order is None or order == "" or order == []:
        return resolved
    wanted = _split(order)
    by_name = {t.name: t for t in resolved}
    positions = [str(i) for i in range(len(resolved))]
    if sorted(wanted) == sorted(positions):
        return [resolved[int(i)] for i in wanted]
    if sorted(wanted) != sorted(by_name):
        raise ConfigError(f"--order {','.join(wanted)} must list the same tasks as --tasks ({','.join(seen)}), by name "
                          f"or by position (0..{len(resolved) - 1}), each once")
    return [by_name[n] for n in wanted]


def _split(value) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for v in value]


@dataclass
class TaskData:
    """One task's sampled rows: ``train`` and ``test`` as dicts of text and label key."""

    task: Task
    train: list
    test: list

    @property
    def labels(self) -> list:
        return sorted({_label_key(r[self.task.label_key]) for r in self.train + self.test}, key=str)


def load_task(task: Task, train_rows: int, test_rows: int, seed: int = 0) -> TaskData:
    """A seeded sample of ``train_rows`` training and ``test_rows`` test rows (0: all of them)."""
    if train_rows < 0 or test_rows < 0:
        raise ConfigError(f"train_rows and test_rows must be >= 0, got {train_rows} and {test_rows}")
    train, test = task.with_settings(train_rows=0, eval_rows=0).rows(seed)
    for rows, name in ((train, "training"), (test, "test")):
        keys = [task.text_key] if isinstance(task.text_key, str) else list(task.text_key)
        missing = [k for k in keys + [task.label_key] if k not in rows[0]]
        if missing:
            raise DataError(f"task {task.name}: the {name} rows have no column {missing[0]!r}; "
                            f"columns: {', '.join(sorted(rows[0]))}")
    rng = random.Random(seed)
    if train_rows and len(train) > train_rows:
        train = rng.sample(train, train_rows)
    if test_rows and len(test) > test_rows:
        test = random.Random(seed + 1).sample(test, test_rows)
    return TaskData(task, train, test)


def label_space(datas: list) -> list:
    """The union of the tasks' labels, in order of first appearance along the sequence: a label
    word two tasks share (amazon's and yelp's ratings) is one class."""
    labels = []
    for data in datas:
        labels += [label for label in data.labels if label not in labels]
    return labels


def as_union_rows(data: TaskData, split: str = "train") -> list:
    """Rows as ``{"text", "label", "task"}``, the one shape every method trains and is tested on
    (a text pair, ``text_key=[a, b]``, is joined by a blank line)."""
    keys = [data.task.text_key] if isinstance(data.task.text_key, str) else list(data.task.text_key)
    return [{"text": "\n\n".join(str(r[k]) for k in keys), "label": _label_key(r[data.task.label_key]),
             "task": data.task.name} for r in getattr(data, split)]
