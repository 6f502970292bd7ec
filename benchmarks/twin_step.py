"""Training-step time of each method beside its HF PEFT twin, on the SST-2 task's model and batches.

    .venv/bin/python benchmarks/twin_step.py [--method oft --method hra ...] [--steps 8] [--rounds 3]

Issue 16 asks that each method HF PEFT shares trains in at most 1.05x the time of its ``hf:`` twin.
The benchmark's cells report ``train_seconds`` too, but they run one after another, minutes apart,
and on this shared machine the load changes in between. Here the two models take their steps in
alternation, in one process, on the same batches, so drift hits both alike: for each method, both
are built as ``peftlab bench`` builds them (peftlab's default spec with a new classification head;
the twin from ``bench/cell.py``'s ``hf_twin``), and each round times ``--steps`` AdamW steps of one,
then of the other (the order flips each round). A step is forward, loss, backward and the optimizer
step, the work the trainer repeats; data loading and evaluation are the same code for both and left
out. Prints one JSON line per method (median step seconds of each and their ratio) and a summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def batches(task, tokenizer, count: int, batch_size: int) -> list[dict]:
    from peftlab.train import ClassificationData
    from peftlab.train.data import infer_label2id

    rows, _ = task.rows(0)
    rows = rows[: count * batch_size]
    label2id = infer_label2id(row[task.label_key] for row in rows)
    data = ClassificationData(tokenizer, rows, text_key=task.text_key, label_key=task.label_key,
                              max_length=task.max_length, label2id=label2id)
    return [data.collate([data[i] for i in range(k * batch_size, (k + 1) * batch_size)]) for k in range(count)]


def build(method: str, task, twin: bool, token_rows=()):
    import peftlab
    from peftlab.bench.cell import hf_twin, task_spec
    from peftlab.core.adapters import build_configs, train_new_head
    from peftlab.models import load_model

    torch.manual_seed(0)
    model, _ = load_model(task.model, task="sequence-classification", num_labels=2, device="cpu")
    torch.manual_seed(0)
    spec = task_spec(method, token_rows)
    if twin:
        model = hf_twin(model, method, task, spec)
    else:
        peftlab.attach(model, train_new_head(build_configs(spec or method), model))
    model.train()
    from peftlab.bench.grid import learning_rate
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate(method, task))
    return model, optimizer


def timed_steps(model, optimizer, data: list[dict], steps: int, start: int) -> list[float]:
    times = []
    for k in range(steps):
        batch = data[(start + k) % len(data)]
        began = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
    return times


def measure(method: str, task, data: list[dict], steps: int, rounds: int) -> dict:
    rows = [ids[mask.bool()].tolist() for batch in data for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    ours, twin = build(method, task, twin=False, token_rows=rows), build(method, task, twin=True, token_rows=rows)
    for model, optimizer in (ours, twin):  # warm-up: allocator, oneDNN primitives, lazy state
        timed_steps(model, optimizer, data, 2, 0)
    times = {"peftlab": [], "hf_peft": []}
    for r in range(rounds):
        order = [("peftlab", ours), ("hf_peft", twin)]
        for name, (model, optimizer) in order if r % 2 == 0 else order[::-1]:
            times[name] += timed_steps(model, optimizer, data, steps, r * steps)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"method": method, "peftlab_step_s": round(medians["peftlab"], 4), "hf_peft_step_s": round(medians["hf_peft"], 4),
            "ratio": round(medians["peftlab"] / medians["hf_peft"], 3), "steps_each": len(times["peftlab"])}


def main() -> None:
    from peftlab.bench.grid import TWINS
    from peftlab.bench.tasks import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", help="a method with an hf: twin (repeatable; default: every twin that "
                        "runs on the SST-2 model)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from peftlab.methods import get_method

    task = TASKS["sst2"]
    methods = args.method or [m for m in TWINS if "bert" in getattr(get_method(m), "ARCHITECTURES", ("bert",))]
    unknown = sorted(set(methods) - set(TWINS))
    if unknown:
        parser.error(f"no hf: twin for {unknown}; methods with one: {', '.join(TWINS)}")
    from peftlab.models import load_model

    _, tokenizer = load_model(task.model, task="sequence-classification", num_labels=2, device="cpu")
    data = batches(task, tokenizer, count=8, batch_size=task.batch_size)
    results = []
    for method in methods:
        try:
            row = measure(method, task, data, args.steps, args.rounds)
        except Exception as error:  # one method's failure (e.g. peft refusing a setting) is a row, not the end
            row = {"method": method, "error": f"{type(error).__name__}: {error}"}
        results.append(row)
        print(json.dumps(row), flush=True)
    ratios = [r["ratio"] for r in results if "ratio" in r]
    print(json.dumps({"benchmark": "twin_step", "task": task.name, "model": task.model, "batch_size": task.batch_size,
                      "threads": torch.get_num_threads(), "methods": len(ratios),
                      "over_1.05": [r["method"] for r in results if r.get("ratio", 0) > 1.05],
                      "median_ratio": round(statistics.median(ratios), 3) if ratios else None}))


if __name__ == "__main__":
    sys.exit(main())
