"""One continual run: train the tasks one stage after another, test every task after every stage.

    result = peftlab.continual.run("agnews,amazon,yelp,dbpedia", "o-lora", train_rows=400, out="runs/cl")

The loop, readable top-down:

    load the tasks' rows; the label space is the union of their labels      (sequence.py)
    load the encoder; the head is the base encoder's label-word embeddings  (model.py)
    baseline: every task's test accuracy before any training (b_j)
    for each stage: the method attaches / freezes what it needs, the stage's rows are trained
        with peftlab.train (the same loop as ``peftlab train``), every task is tested: row i of R
    average accuracy, BWT, FWT                                              (metrics.py)
    JSONL (one line per stage), summary JSON, Markdown report, heatmap      (report.py)
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .. import models
from ..errors import ConfigError
from ..train import ClassificationData, TrainConfig, train
from .methods import get_method
from .metrics import summarize
from .model import LABEL_SPACES, build_classifier
from .sequence import DEFAULT_SEQUENCE, as_union_rows, label_space as union_labels, load_task, resolve_sequence


def run(tasks=DEFAULT_SEQUENCE, method: str = "o-lora", *, order=None, model: str = "minilm", options: dict | None = None,
        train_rows: int = 400, test_rows: int = 200, steps: int | None = None, epochs: float = 1.0,
        batch_size: int = 16, lr: float | None = None, max_length: int = 64, label_space: str = "union", seed: int = 0,
        out=None, device: str = "cpu", progress: bool = False, log=None) -> dict:
    """Run ``method`` over the task sequence; return the result (matrix, metrics, per-stage lines).

    Each stage trains ``steps`` optimizer steps (default: ``epochs`` passes over its rows) of
    ``batch_size`` rows; multitask's single stage trains ``steps`` per task, so every method sees
    the same number of updates. ``label_space``: ``union`` (every row scored over every task's
    labels, no task information at all) or ``task`` (each row over its own task's labels; see
    ``model.py``). ``lr`` overrides the method's default; ``options`` are the method's own settings
    (rank, lambda1, length, memory...). With ``out`` the files go there; ``log`` gets one line per
    stage."""
    options = dict(options or {})
    if lr is not None:
        options["lr"] = lr
    cl = get_method(method, options)  # an unknown method or option fails before any loading
    sequence = resolve_sequence(tasks, order)
    _check_budget(steps, epochs, batch_size, max_length)
    if label_space not in LABEL_SPACES:
        raise ConfigError(f"label_space must be one of {', '.join(LABEL_SPACES)} (union: every label of every task; "
                          f"task: each row's own task's labels), got {label_space!r}")
    say = log or (lambda message: None)
    started = time.perf_counter()
    datas = [load_task(task, train_rows, test_rows, seed) for task in sequence]
    labels = union_labels(datas)
    label2id = {label: i for i, label in enumerate(labels)}
    own = {d.task.name: set(d.labels) for d in datas}
    masks = {name: [int(label in own[name]) for label in labels] for name in own}
    encoder, tokenizer = models.load_model(model, task="feature-extraction", device=device)
    classifier = build_classifier(encoder, tokenizer, labels)

    def dataset(rows):
        data = ClassificationData(tokenizer, rows, text_key="text", label_key="label", max_length=max_length,
                                  label2id=label2id)
        if label_space == "task":  # each row's candidates: its own task's labels
            for example, row in zip(data.examples, rows):
                example["label_mask"] = masks[row["task"]]
        return data

    tests = [dataset(as_union_rows(d, "test")) for d in datas]
    names = [task.name for task in sequence]
    baseline = [evaluate(classifier, test, plain_logits) for test in tests]  # no adapter yet
    say(f"{cl.name}: baseline (no training) {_fmt(names, baseline)}")
    matrix, lines = [], []
    for stage, indices in enumerate(cl.stages(len(sequence))):
        stage_started = time.perf_counter()
        torch.manual_seed(seed + stage)  # the new adapter's random init
        cl.before_stage(classifier, stage)
        fresh = [row for i in indices for row in as_union_rows(datas[i])]
        rows = cl.training_rows(stage, fresh)
        stage_steps = steps * len(indices) if steps else max(1, math.ceil(epochs * len(rows) / batch_size))
        config = TrainConfig(lr=cl.lr, steps=stage_steps, batch_size=batch_size, warmup_steps=max(1, stage_steps // 10),
                             schedule="linear", seed=seed + stage, device=device, progress=progress,
                             group_by_length=True)
        result = train(classifier, dataset(rows), config)
        cl.after_stage(classifier, stage, fresh)
        row = [evaluate(classifier, test, cl.logits) for test in tests]
        matrix.append(row)
        line = {"method": cl.name, "stage": stage, "trained_on": [names[i] for i in indices], "rows": len(rows),
                "steps": stage_steps, "final_loss": result.final_loss, "accuracy": dict(zip(names, row)),
                "trainable_params": sum(p.numel() for p in classifier.parameters() if p.requires_grad),
                "seconds": round(time.perf_counter() - stage_started, 1)}
        lines.append(line)
        say(f"{cl.name}: stage {stage} ({'+'.join(line['trained_on'])}, {stage_steps} steps) {_fmt(names, row)}")
    summary = {**cl.describe(), "tasks": names, "labels": [str(label) for label in labels], "baseline": baseline,
               "matrix": matrix, **summarize(matrix, baseline), "stages": lines,
               "settings": {"model": model, "train_rows": train_rows, "test_rows": test_rows, "steps": steps,
                            "epochs": epochs, "batch_size": batch_size, "max_length": max_length, "label_space": label_space,
                            "seed": seed},
               "seconds": round(time.perf_counter() - started, 1)}
    if out is not None:
        from .report import write_run

        write_run(summary, Path(out))
    return summary


def plain_logits(model, batch: dict):
    return model(**batch).logits


def evaluate(model, data, logits_fn, batch_size: int = 64) -> float:
    """Accuracy of ``logits_fn(model, batch)`` over ``data`` (rows sorted by length: less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    correct = 0
    try:
        with torch.inference_mode():
            for first in range(0, len(order), batch_size):
                batch = data.collate([data[i] for i in order[first:first + batch_size]])
                labels = batch.pop("labels")
                logits = logits_fn(model, {k: v.to(device) for k, v in batch.items()})
                correct += int((logits.argmax(-1).cpu() == labels).sum())
    finally:
        model.train(was_training)
    return correct / max(len(data), 1)


def _check_budget(steps, epochs, batch_size, max_length) -> None:
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps must be a positive integer (optimizer steps per task), got {steps!r}")
    if not steps and not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ConfigError(f"epochs must be a positive number (passes over each task's rows), got {epochs!r}")
    for key, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")


def _fmt(names, row) -> str:
    return " ".join(f"{n}={a:.3f}" for n, a in zip(names, row))


def read_lines(path) -> list:
    """The stage lines of a JSONL file written by ``run``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
