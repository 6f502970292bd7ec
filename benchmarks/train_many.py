"""Many LoRA jobs in one pass on SmolLM2-135M: ``train_many`` against one process per job.

    .venv/bin/python benchmarks/train_many.py [--steps 6] [--jobs 1,2,4]

Each job: LoRA r=16, alpha=32, dropout 0 on every linear layer but the head, batch 4 x 128 tokens
of its own random ids, AdamW at its own learning rate, ``--steps`` steps. Every run is its own
process, with glibc's mmap threshold fixed so freed tensors leave resident memory:

- ``alone``: one job trained by ``train()`` in one process: the baseline a job costs by itself.
- ``fused K``: K jobs trained together by ``train_many`` in one process.
- both again with gradient checkpointing (``--checkpointing``, on by default; ``--no-checkpointing``).

Against K separate processes (each holding its own copy of the base) the fused run's memory is
compared with K times ``alone``'s peak; against running the K jobs one after another its time is
compared with K times ``alone``'s training time. A checkpointed fused run is compared with both the
plain baselines (what K ordinary runs cost) and the checkpointed ones (the same settings). Memory
is the whole process's peak resident memory while training (VmHWM, reset after the model is
loaded). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import PeakSampler, cached_model_dir, load_cached_model

BATCH, LENGTH, METHOD = 4, 128, "lora[r=16,alpha=32,dropout=0,targets=all-linear]"


def job_rows(index: int, steps: int, vocab: int) -> list:
    import torch

    ids = torch.randint(0, vocab, (BATCH * steps, LENGTH), generator=torch.Generator().manual_seed(100 + index))
    return [{"input_ids": row, "labels": row} for row in ids]


def run(kind: str, jobs: int, steps: int, checkpointing: bool) -> dict:
    import torch

    import peftlab
    from peftlab.train import TrainConfig, train

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_cached_model()
    model.config.use_cache = False
    configs = [TrainConfig(steps=steps, batch_size=BATCH, lr=1e-3 * (1 + i), warmup_steps=0, seed=i, progress=False,
                           device="cpu", gradient_checkpointing=checkpointing) for i in range(jobs)]
    data = [job_rows(i, steps, model.config.vocab_size) for i in range(jobs)]
    with PeakSampler() as sampler:
        started = time.perf_counter()
        if kind == "alone":
            peftlab.attach(model, METHOD, name="job0")
            losses = [train(model, data[0], configs[0]).losses]
        else:
            outcomes = peftlab.train_many(model, [peftlab.Job(f"job{i}", data[i], configs[i], METHOD)
                                                  for i in range(jobs)], progress=False)
            losses = [outcomes[f"job{i}"].result.losses for i in range(jobs)]
        seconds = time.perf_counter() - started
    return {"kind": kind, "jobs": jobs, "checkpointing": checkpointing, "train_s": round(seconds, 2), "peak_rss_mb": round(sampler.peak / 2**20, 1),
            "tokens_per_s": round(jobs * steps * BATCH * LENGTH / seconds, 1),
            "last_losses": [round(job[-1], 4) for job in losses]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--jobs", default="1,2,4")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="skip the gradient-checkpointing rows")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        kind, jobs, checkpointing = args.run.split(":")
        print(json.dumps(run(kind, int(jobs), args.steps, checkpointing == "1")))
        return
    cached_model_dir()

    def measure(kind: str, jobs: int, checkpointing: bool) -> dict:
        done = subprocess.run([sys.executable, __file__, "--run", f"{kind}:{jobs}:{int(checkpointing)}",
                               "--steps", str(args.steps)], check=True, capture_output=True, text=True,
                              env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
        return json.loads(done.stdout.strip().splitlines()[-1])

    def compare(fused: dict, alone: dict, suffix: str = "") -> None:
        jobs = fused["jobs"]
        fused["memory_vs_separate_processes" + suffix] = round(fused["peak_rss_mb"] / (jobs * alone["peak_rss_mb"]), 3)
        fused["time_vs_sequential" + suffix] = round(fused["train_s"] / (jobs * alone["train_s"]), 3)

    modes = [False, True] if args.checkpointing else [False]
    alone = {mode: measure("alone", 1, mode) for mode in modes}
    rows = []
    for mode in modes:
        for jobs in [int(k) for k in args.jobs.split(",")]:
            fused = measure("fused", jobs, mode)
            compare(fused, alone[False])  # against K ordinary runs
            if mode:
                compare(fused, alone[True], "_checkpointed")  # against K runs with the same setting
            rows.append(fused)
    print(json.dumps({"setup": {"model": "SmolLM2-135M-Instruct (fp32)", "lora": METHOD, "batch": f"{BATCH}x{LENGTH}",
                                "steps_per_job": args.steps, "cores": os.cpu_count()},
                      "alone": alone[False], "alone_checkpointed": alone.get(True), "fused": rows}, indent=2))


if __name__ == "__main__":
    main()
