"""What pruning and 1-bit storage cost a trained adapter: LoRA rank pruning, BI-Adapter, SparseAdapter.

    .venv/bin/python benchmarks/prune.py [--task sst2|extract] [--steps N] [--threads 2]

``--task sst2`` (the default): all-MiniLM-L6-v2 with a new 2-label head on SST-2 (``../shared/data/sst2``:
``--train-rows`` shuffled training rows; the 872 dev rows held out; metric: accuracy).
``--task extract``: SmolLM2-135M-Instruct on peftlab's built-in extract task (metric: exact match on
``--eval-rows`` held-out rows, greedy generation).

1. A LoRA (``--lora``, every linear layer; on SST-2 the head trains in full) is trained with
   ``peftlab.train`` and evaluated.
2. On copies of it: ``prune_ranks`` at each ``--keep`` ratio by rank norm and by Taylor importance (the
   gradients of 8 training batches), and ``binarize`` per matrix and per output row (BI-Adapter); each
   is evaluated and saved (pruned: Hugging Face LoRA format; 1-bit: peftlab's format, 8 signs a byte).
3. SST-2 only (skip with ``--no-sparse``): a dense Houlsby adapter against SparseAdapters of the same
   training budget: the same width at 80% sparsity, and Large-Sparse (twice the width at 50%).

Prints one JSON object: for every variant the adapter's parameters (LoRA factors; kept weights for the
sparse adapters), the bytes of its saved weights file, the metric and its change from the trained LoRA.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

import peftlab
from peftlab.core.adapters import build_configs
from peftlab.methods import sparse_adapter
from peftlab.models import load_model
from peftlab.train import TrainConfig, load_rows, train
from peftlab.train.loss import training_loss

SST2 = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sst2").resolve()


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)  # progress; the JSON result goes to stdout


def sst2_task(args):
    model, tokenizer = load_model("minilm", task="sequence-classification", num_labels=2, device="cpu")
    from peftlab.tasks.classification import accuracy
    from peftlab.train import ClassificationData

    rows = load_rows(str(SST2 / "train.tsv"))
    random.Random(args.seed).shuffle(rows)
    label2id = {0: 0, 1: 1}
    data = ClassificationData(tokenizer, rows[: args.train_rows], text_key="sentence", label_key="label",
                              max_length=64, label2id=label2id)
    held_out = ClassificationData(tokenizer, load_rows(str(SST2 / "dev.tsv")), text_key="sentence", label_key="label",
                                  max_length=64, label2id=label2id)
    return model, data, lambda m: accuracy(m, held_out)["accuracy"], "accuracy"


def extract_task(args):
    from peftlab.tasks import extract
    from peftlab.tasks.generation import evaluate
    from peftlab.train import CausalLMData

    model, tokenizer = load_model("smollm2-135m", device="cpu")
    train_rows, eval_rows = extract.make_splits(args.train_rows, args.eval_rows, seed=args.seed)
    data = CausalLMData(tokenizer, train_rows, system=extract.SYSTEM, max_length=256)

    def metric(m):
        return evaluate(m, tokenizer, eval_rows, system=extract.SYSTEM, batch_size=32)["exact_match"]
    return model, data, metric, "exact_match"


def fit(model, data, spec: str, args, lr: float):
    torch.manual_seed(args.seed)
    configs = build_configs(spec)
    if args.task == "sst2":
        configs[0].modules_to_save = ["classifier"]  # the new head trains in full
    peftlab.attach(model, configs)
    config = TrainConfig(lr=lr, steps=args.steps, batch_size=args.batch_size, warmup_steps=args.steps // 10,
                         seed=args.seed, progress=False, device="cpu")
    result = train(model, data, config)
    log(f"trained {spec}: {args.steps} steps in {result.train_seconds:.0f} s, final loss {result.final_loss:.4f}")
    return model, round(result.train_seconds, 1)


def saved_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return (peftlab.save(model, folder) / "adapter_model.safetensors").stat().st_size


def calibration_batches(data, args, count: int = 8) -> list:
    order = list(range(len(data)))
    random.Random(args.seed + 1).shuffle(order)
    return [data.collate([data[i] for i in order[k * args.batch_size:(k + 1) * args.batch_size]]) for k in range(count)]


def lora_parameters(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)


def measured(label: str, model, evaluate, reference: float | None = None, **facts) -> dict:
    """``facts`` plus the saved file's size, the metric and its change from ``reference`` (None: this is the reference)."""
    value = evaluate(model)
    reference = value if reference is None else reference
    log(f"{label}: {value:.4f} ({value - reference:+.4f})")
    return {**facts, "saved_bytes": saved_bytes(model), "metric": round(value, 4), "change": round(value - reference, 4)}


def lora_variants(trained, data, evaluate, args) -> dict:
    out = {"trained": measured("trained", trained, evaluate, parameters=lora_parameters(trained))}
    reference = out["trained"]["metric"]
    batches = calibration_batches(data, args)
    for criterion in ("norm", "taylor"):
        for keep in args.keep:
            model = copy.deepcopy(trained)
            extra = {"batches": batches, "loss_fn": training_loss} if criterion == "taylor" else {}
            report = peftlab.prune_ranks(model, keep=keep, criterion=criterion, **extra)
            label = f"prune_{criterion}_keep_{keep}"
            out[label] = measured(label, model, evaluate, reference, parameters=report["parameters_after"])
    for per in ("matrix", "row"):
        model = copy.deepcopy(trained)
        report = peftlab.binarize(model, per=per)
        label = f"binarize_per_{per}"
        out[label] = measured(label, model, evaluate, reference, parameters=lora_parameters(trained),
                              weight_bytes_before=report["bytes_before"], weight_bytes_after=report["bytes_after"])
    return out


def sparse_variants(base, data, evaluate, args) -> dict:
    """A dense Houlsby adapter, and SparseAdapters against it (their change is from the dense one's metric)."""
    specs = {"houlsby_dense": f"houlsby[bottleneck={args.bottleneck}]",
             "sparse_80": f"sparse_adapter[bottleneck={args.bottleneck},sparsity=0.8]",
             "large_sparse_50": f"sparse_adapter[bottleneck={2 * args.bottleneck},sparsity=0.5]"}
    out, reference = {}, None
    for label, spec in specs.items():
        model, seconds = fit(copy.deepcopy(base), data, spec, args, lr=args.adapter_lr)
        if label == "houlsby_dense":
            kept = sum(p.numel() for n, p in model.named_parameters() if ".adapters.default." in n and n.endswith("weight"))
        else:
            kept = sparse_adapter.sparsity(model)["kept"]
        out[label] = measured(label, model, evaluate, reference, spec=spec, projection_weights=kept, train_seconds=seconds)
        reference = out["houlsby_dense"]["metric"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("sst2", "extract"), default="sst2")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 300 sst2, 60 extract)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 sst2, 4 extract")
    parser.add_argument("--train-rows", type=int, default=4000)
    parser.add_argument("--eval-rows", type=int, default=40, help="extract: held-out rows")
    parser.add_argument("--lora", default="lora[r=16,alpha=32]")
    parser.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: 1e-3 sst2, 2e-3 extract)")
    parser.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--bottleneck", type=int, default=32, help="the dense Houlsby adapter's width (sst2)")
    parser.add_argument("--adapter-lr", type=float, default=1e-3)
    parser.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sst2 = args.task == "sst2"
    args.steps = args.steps or (300 if sst2 else 60)
    args.batch_size = args.batch_size or (32 if sst2 else 4)
    lr = args.lr or (1e-3 if sst2 else 2e-3)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    base, data, evaluate, metric = (sst2_task if sst2 else extract_task)(args)
    base_metric = evaluate(base)
    trained, seconds = fit(copy.deepcopy(base), data, args.lora, args, lr)
    result = {
        "task": "SST-2, all-MiniLM-L6-v2 (dev accuracy, 872 rows)" if sst2
        else f"extract, SmolLM2-135M-Instruct (exact match, {args.eval_rows} held-out rows)",
        "metric": metric, "base_model_metric": round(base_metric, 4),
        "training": {"lora": args.lora, "steps": args.steps, "batch_size": args.batch_size, "lr": lr,
                     "train_rows": args.train_rows, "seconds": seconds},
        "lora": lora_variants(trained, data, evaluate, args),
    }
    if sst2 and args.sparse:
        result["sparse_adapter"] = sparse_variants(base, data, evaluate, args)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
