"""Data-parallel training on SmolLM2-135M: 2 DDP ranks and 2 FSDP2 ranks against one process at the
same global batch.

    .venv/bin/python benchmarks/distributed.py [--steps 8] [--ranks 2] [--checkpointing]
    .venv/bin/python benchmarks/distributed.py --model tinyllama-shape --steps 4 --checkpointing

LoRA r=16, alpha=32, dropout 0 on every linear layer but the head; fp32; AdamW at lr 1e-3; the
global batch is 4 x 128 tokens of random ids (fixed seed): one process at batch 4, or R ranks at
batch 4/R each, started by torchrun on this machine (gloo), with DDP (every rank holds the whole
model) or FSDP2 (every weight sharded across the ranks). The torch threads are shared out: the
one process gets all the cores, each rank cores/R. Reports both runs' median step times (after
two warm-up steps), each process's peak resident memory while training (from the start, and in
the steady state after the first step: the whole model is loaded before FSDP shards it), its resident
memory between steps (what a rank holds when no block is gathered), and the largest
difference between the two adapters (they should agree to fp32 rounding). Prints one JSON object.

``--model tinyllama-shape`` trains a model of TinyLlama-1.1B's shape (22 layers, width 2048,
4.4 GB of fp32 weights), randomly initialised (the same seed on every rank, nothing downloaded),
DDP against FSDP only: at 135M parameters a rank's memory is mostly the Python/torch runtime and
activations, which sharding cannot touch; at 1.1B it is mostly weights, as for the models people
shard. ``--checkpointing`` recomputes activations in backward in every run.

On one machine with few cores data parallelism cannot be faster: the ranks split the same cores
and add an all-reduce. What DDP buys is more machines (or GPUs): each rank's step costs what one
process's step at batch b costs, and the all-reduce moves only the trainable parameters' gradients
(here 4.9M floats, 19.5 MB per step), so R machines train an R-times larger global batch in about
the time one machine trains batch b.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import PeakSampler, cached_model_dir, high_water_mark_bytes, load_cached_model, reset_high_water_mark, rss_bytes

GLOBAL_BATCH, LENGTH, SEED = 4, 128, 0


def tinyllama_shape():
    """TinyLlama-1.1B's architecture with random weights (seed 0: every rank builds the same)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).float()


def worker(out: Path, steps: int, batch: int, strategy: str, shape: str, checkpointing: bool) -> None:
    """One process of a run (rank 0 writes its adapter weights and figures)."""
    import torch
    from safetensors.torch import save_file

    import peftlab
    from peftlab.dist.fsdp import full
    from peftlab.train import TrainConfig, train

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", 1)))
    model = tinyllama_shape() if shape == "tinyllama-shape" else load_cached_model()
    model.config.use_cache = False
    torch.manual_seed(SEED)
    peftlab.attach(model, "lora[r=16,alpha=32,dropout=0,targets=all-linear]")
    ids = torch.randint(0, model.config.vocab_size, (GLOBAL_BATCH * steps, LENGTH),
                        generator=torch.Generator().manual_seed(SEED))
    rows = [{"input_ids": row, "labels": row} for row in ids]
    marks, resident = [], []
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=1e-3, warmup_steps=0, progress=False, device="cpu",
                      seed=SEED, strategy=strategy, gradient_checkpointing=checkpointing)
    def on_step(step):
        marks.append(time.perf_counter())
        resident.append(rss_bytes())  # between steps: what a rank holds, without the step's transients
        if step == 1:  # from here on: the steady state, the model sharded and the optimizer's moments made
            reset_high_water_mark()

    with PeakSampler() as sampler:
        result = train(model, rows, cfg, on_step=on_step)
    steady = high_water_mark_bytes()
    rank = int(os.environ.get("RANK", 0))
    figures = {"rank": rank, "peak_rss_mb": round(sampler.peak / 2**20, 1), "steady_peak_rss_mb": round(steady / 2**20, 1),
               "resident_between_steps_mb": round(max(resident[1:] or resident) / 2**20, 1),
               "step_seconds": [b - a for a, b in zip(marks, marks[1:])][1:], "losses": result.losses}
    (out / f"figures-{rank}.json").write_text(json.dumps(figures))
    adapter = {n: full(p.detach()).contiguous() for n, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        save_file(adapter, str(out / "adapter.safetensors"))


def launch(out: Path, steps: int, ranks: int, strategy: str, args) -> float:
    script = [str(Path(__file__).resolve()), "--worker", str(out), "--steps", str(steps),
              "--batch", str(GLOBAL_BATCH // ranks), "--strategy", strategy, "--model", args.model]
    if args.checkpointing:
        script.append("--checkpointing")
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "BENCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed tensors leave resident memory (as in memory.py)
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
               if ranks > 1 else [sys.executable]) + script
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return time.perf_counter() - started


def summary(out: Path, ranks: int, wall: float) -> dict:
    figures = [json.loads((out / f"figures-{r}.json").read_text()) for r in range(ranks)]
    return {"ranks": ranks, "batch_per_rank": GLOBAL_BATCH // ranks,
            "median_step_s": round(statistics.median(t for f in figures for t in f["step_seconds"]), 3),
            "peak_rss_mb_per_rank": [f["peak_rss_mb"] for f in figures],
            "steady_peak_rss_mb_per_rank": [f["steady_peak_rss_mb"] for f in figures],
            "resident_between_steps_mb_per_rank": [f["resident_between_steps_mb"] for f in figures], "wall_s": round(wall, 1),
            "losses": [round(x, 5) for x in figures[0]["losses"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", choices=("smollm2", "tinyllama-shape"), default="smollm2")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.steps, args.batch, args.strategy, args.model, args.checkpointing)
        return
    if GLOBAL_BATCH % args.ranks:
        parser.error(f"--ranks must divide the global batch ({GLOBAL_BATCH})")
    if args.model == "smollm2":
        cached_model_dir()
    from safetensors.torch import load_file

    runs = {"ddp": ("ddp", args.ranks), "fsdp": ("fsdp", args.ranks)}
    if args.model == "smollm2":
        runs = {"one_process": ("ddp", 1), **runs}
    with tempfile.TemporaryDirectory() as tmp:
        report, adapters = {}, {}
        for name, (strategy, ranks) in runs.items():
            folder = Path(tmp, name)
            folder.mkdir()
            report[name] = summary(folder, ranks, launch(folder, args.steps, ranks, strategy, args))
            adapters[name] = load_file(str(folder / "adapter.safetensors"))
    reference = "one_process" if "one_process" in report else "ddp"

    def difference(name):
        a, b = adapters[reference], adapters[name]
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    ddp, fsdp = report["ddp"], report["fsdp"]
    model = ("SmolLM2-135M-Instruct" if args.model == "smollm2" else "TinyLlama-1.1B shape, random weights") + " (fp32)"
    report = {
        "setup": {"model": model, "lora": "r=16 alpha=32 dropout=0 all-linear",
                  "global_batch": f"{GLOBAL_BATCH}x{LENGTH}", "steps": args.steps, "cores": os.cpu_count(),
                  "backend": "gloo", "gradient_checkpointing": args.checkpointing},
        **report,
        f"adapter_max_abs_difference_vs_{reference}": {n: difference(n) for n in report if n != reference},
        f"step_time_vs_{reference}": {n: round(report[n]["median_step_s"] / report[reference]["median_step_s"], 3)
                                      for n in report if n != reference},
        "fsdp_peak_per_rank_vs_ddp": round(max(fsdp["peak_rss_mb_per_rank"]) / max(ddp["peak_rss_mb_per_rank"]), 3),
        "fsdp_steady_peak_per_rank_vs_ddp": round(max(fsdp["steady_peak_rss_mb_per_rank"])
                                                  / max(ddp["steady_peak_rss_mb_per_rank"]), 3),
        "fsdp_resident_between_steps_vs_ddp": round(max(fsdp["resident_between_steps_mb_per_rank"])
                                                    / max(ddp["resident_between_steps_mb_per_rank"]), 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
