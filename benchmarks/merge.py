"""Merge time on SmolLM2-135M: ``peftlab.combine(method="svd")`` against HF PEFT's
``add_weighted_adapter(combination_type="svd")`` on the same adapters, at the same rank.

    .venv/bin/python benchmarks/merge.py [--rank 16] [--adapters 3] [--repeats 3]

The adapters: ``--adapters`` random LoRAs (r=16, alpha=32, every linear layer but the head: 210
projections), saved in HF PEFT's format and loaded into both libraries. peftlab's low-rank path
never forms a layer's dense update: QR of the stacked factors and the SVD of a small core
(``compose/algebra.compress``). HF PEFT forms each dense ``ΔW_i``, sums them and takes a full SVD
of every layer's sum. Both truncate to ``--rank``; the results are checked to be the same update
(relative Frobenius difference per layer), and the share of the sum's energy kept is reported.
``space="factor"`` (peftlab reproducing HF's numbers, with a dense SVD as HF does) is timed too.
Each timing is the median of ``--repeats`` runs (HF's once: it is the slow one), on ``--threads``
torch threads for both. Prints one JSON object and writes it to runs/bench/merge.json.

    .venv/bin/python benchmarks/merge.py --part quality [--steps 150] [--eval-rows 400]

Merge quality on all-MiniLM-L6-v2: three LoRAs (r=8, every linear layer of the encoder), each
trained with its own classification head on one task (SST-2 sentiment, AG News topics, DBpedia
classes; ``--steps`` steps of 16 rows), then combined by ``linear`` and ``svd`` (the mean, and its
best approximation at rank 8), ``cat`` (the mean as stacked factors), ``ties`` (weights 1, density
0.2, TIES's disjoint mean), ``dare_linear`` (the mean after DARE at density 0.5), and a multitask
LoRA trained on the three tasks in turn (one batch of each per step, each through its own head) as
the upper bound. Every adapter is evaluated on all three tasks through that task's head (accuracy
on ``--eval-rows`` held-out rows). Writes runs/bench/merge_quality.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from common import load_cached_model

RUNS = Path(__file__).resolve().parent.parent / "runs" / "bench"


def random_adapters(model, count: int, rank: int) -> list[str]:
    import torch

    import peftlab

    names = []
    for i in range(count):
        name = f"task{i}"
        peftlab.attach(model, f"lora[r={rank},alpha={2 * rank},dropout=0,targets=all-linear]", name=name)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        names.append(name)
    return names


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    value = call()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["time", "quality"], default="time")
    parser.add_argument("--rank", type=int, default=16, help="time: rank of the inputs and of the result")
    parser.add_argument("--adapters", type=int, default=3, help="time: how many adapters")
    parser.add_argument("--repeats", type=int, default=3, help="time: runs of peftlab's merges (median taken)")
    parser.add_argument("--steps", type=int, default=150, help="quality: training steps per task")
    parser.add_argument("--eval-rows", type=int, default=400, help="quality: held-out rows per task")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a machine whose cores are busy, threaded LAPACK spin-waits "
                             "and a 1536 x 48 QR takes 40 ms on 2 threads instead of 2 ms on one)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    merge_time(args) if args.part == "time" else merge_quality(args)


def merge_time(args) -> None:
    import peft
    import torch

    import peftlab
    from peftlab.compose import combine
    from peftlab.compose.combining import updates_of


    ours = load_cached_model()
    names = random_adapters(ours, args.adapters, args.rank)
    weights = [1.0 / args.adapters] * args.adapters
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = None
        for name in names:
            path = str(peftlab.save(ours, Path(folder) / name, name=name))
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(load_cached_model(), path, adapter_name=name)
            else:
                theirs.load_adapter(path, adapter_name=name)

    runs = [timed(lambda i=i: combine(ours, names, weights, method="svd", rank=args.rank, name=f"svd{i}"))
            for i in range(args.repeats)]
    low_rank_s, result = statistics.median(t for t, _ in runs), runs[0][1]
    factor_runs = [timed(lambda i=i: combine(ours, names, weights, method="svd", rank=args.rank, name=f"factor{i}",
                                             space="factor")) for i in range(args.repeats)]
    factor_s = statistics.median(t for t, _ in factor_runs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_s, _ = timed(lambda: theirs.add_weighted_adapter(names, weights, "hf_svd", combination_type="svd",
                                                             svd_rank=args.rank))

    # the same update? compare every layer's result (ours: scale 1; HF's new adapter: alpha = r, scale 1)
    made = updates_of(ours, "svd0")
    differences = []
    for module_name, module in theirs.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "hf_svd" in module.lora_A:
            hf_delta = module.get_delta_weight("hf_svd")
            differences.append(float((made[module_name].dense() - hf_delta).norm() / hf_delta.norm()))
    kept = [1 - d for d in result.energy_dropped.values()]
    report = {
        "setup": {"model": "SmolLM2-135M-Instruct (fp32)", "adapters": args.adapters,
                  "lora": f"r={args.rank}, alpha={2 * args.rank}, all linear layers but the head", "weights": weights,
                  "result_rank": args.rank, "layers": len(result.ranks), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                  "load_average": round(os.getloadavg()[0], 1),
                  "torch": torch.__version__, "peft": peft.__version__},
        "peftlab_svd_s": round(low_rank_s, 3),
        "peftlab_factor_space_svd_s": round(factor_s, 3),
        "hf_peft_svd_s": round(hf_s, 3),
        "speedup_vs_hf": round(hf_s / low_rank_s, 1),
        "energy_kept": {"mean": round(statistics.fmean(kept), 4), "min": round(min(kept), 4)},
        "max_relative_difference_vs_hf": float(f"{max(differences):.2e}"),
    }
    write(report, "merge.json")


def write(report: dict, file: str) -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    (RUNS / file).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


# ---- merge quality ---------------------------------------------------------------------------

def quality_tasks(steps: int):
    from peftlab.bench.tasks import get_task

    rows = steps * 16

    def continual(name: str):
        return get_task({"name": name, "kind": "classification", "model": "minilm", "metric": "accuracy",
                         "train": f"continual/{name}_train.jsonl", "eval": f"continual/{name}_test.jsonl",
                         "train_rows": rows, "batch_size": 16, "max_length": 64})

    return [get_task("sst2").with_settings(train_rows=rows, max_length=64), continual("agnews"), continual("dbpedia")]


def merge_quality(args) -> None:
    import random

    import torch
    from torch import nn

    import peftlab
    from peftlab.compose import combine
    from peftlab.models import load_model
    from peftlab.train import ClassificationData, TrainConfig, train
    from peftlab.train.data import infer_label2id

    started = time.perf_counter()
    tasks = quality_tasks(args.steps)
    model, tokenizer = load_model("minilm", task="sequence-classification", num_labels=2, device="cpu")
    model.config.problem_type = "single_label_classification"
    train_sets, held_out, heads = [], [], {}
    for task in tasks:
        train_rows, eval_rows = task.rows(seed=0)
        eval_rows = random.Random(1).sample(eval_rows, min(args.eval_rows, len(eval_rows)))  # test files come sorted
        label2id = infer_label2id(r[task.label_key] for r in train_rows + eval_rows)
        train_sets.append(ClassificationData(tokenizer, train_rows, task.text_key, task.label_key, 64, label2id))
        held_out.append(ClassificationData(tokenizer, eval_rows, task.text_key, task.label_key, 64, label2id))
    spec = "lora[r=8,alpha=16,dropout=0,targets=all-linear]"
    config = TrainConfig(lr=1e-3, steps=args.steps, batch_size=16, warmup_steps=max(1, args.steps // 10), schedule="linear",
                         seed=0, progress=False, device="cpu")

    def use_head(name: str, task: int) -> None:
        key = (name, task)
        if key not in heads:
            torch.manual_seed(task)
            heads[key] = nn.Linear(model.config.hidden_size, len(train_sets[task].label2id))
        model.classifier = heads[key]
        model.num_labels = heads[key].out_features  # BERT's loss reshapes the logits by it

    names = [task.name for task in tasks]
    for i, name in enumerate(names):
        torch.manual_seed(i)
        peftlab.attach(model, spec, name=name)
        peftlab.set_active(model, name)
        use_head(name, i)
        train(model, train_sets[i], config)
    peftlab.attach(model, spec, name="multitask")
    peftlab.set_active(model, "multitask")
    train_multitask(model, train_sets, use_head, config)

    merged = {"linear": dict(weights=[1 / 3] * 3), "svd": dict(weights=[1 / 3] * 3, method="svd", rank=8),
              "cat": dict(weights=[1 / 3] * 3, method="cat"), "ties": dict(method="ties", density=0.2),
              "dare_linear": dict(weights=[1 / 3] * 3, method="dare_linear", density=0.5)}
    for method, settings in merged.items():
        combine(model, names, name=method, **{"method": method, **settings})
    results = {}
    for adapter in [*names, *merged, "multitask"]:
        peftlab.set_active(model, adapter)
        results[adapter] = {}
        for j, task in enumerate(names):
            use_head("multitask" if adapter == "multitask" else task, j)  # a task's adapters share its head
            results[adapter][task] = round(accuracy(model, held_out[j]), 4)
        results[adapter]["mean"] = round(sum(results[adapter][t] for t in names) / len(names), 4)
    write({"setup": {"model": "all-MiniLM-L6-v2", "lora": spec, "tasks": names, "steps_per_task": args.steps,
                     "batch": 16, "eval_rows": args.eval_rows, "heads": "one per task, trained with its adapter; merged "
                     "adapters are evaluated through each task's own head", "settings": merged,
                     "seconds": round(time.perf_counter() - started, 1)},
           "accuracy": results}, "merge_quality.json")


def train_multitask(model, train_sets: list, use_head, config) -> None:
    """One LoRA (the active adapter) on all the tasks: each step, one batch of each task through
    that task's own head, one AdamW over the LoRA and the heads at the tasks' learning rate."""
    import torch

    params = [p for n, p in model.named_parameters() if ".multitask." in n]
    for i in range(len(train_sets)):
        use_head("multitask", i)
        params += list(model.classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    generator = torch.Generator().manual_seed(0)
    orders = [torch.randperm(len(data), generator=generator).tolist() for data in train_sets]
    model.train()
    for step in range(config.steps):
        for i, data in enumerate(train_sets):
            use_head("multitask", i)
            rows = [data[orders[i][(step * 16 + k) % len(data)]] for k in range(16)]
            loss = model(**data.collate(rows)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def accuracy(model, data) -> float:
    import torch

    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            batch = data.collate([data[k] for k in range(start, min(start + 64, len(data)))])
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(data)


if __name__ == "__main__":
    main()
