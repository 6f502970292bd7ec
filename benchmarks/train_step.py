"""One LoRA training step on SmolLM2-135M: peftlab vs HF PEFT vs the frozen floor.

    .venv/bin/python benchmarks/train_step.py [--steps 7] [--rounds 2]

Setup (the issue's): r=16, alpha=32, every linear layer but the head, batch 4 x 128 tokens,
fp32, AdamW. Configurations:

- floor: the frozen model's forward plus the backward to its inputs, no adapter, the model's own
  loss. No LoRA that computes the loss the same way can beat it.
- hf_peft: HF PEFT's LoRA, the model's own loss (what ``transformers.Trainer`` runs).
- peftlab_model_loss: peftlab's LoRA layers, the model's own loss: the adapter's cost alone.
- peftlab: the step peftlab's trainer runs: peftlab's LoRA layers and its blockwise loss, which
  never materializes the 4 x 128 x 49,152 logits (``peftlab/train/loss.py``).

Each configuration runs in its own process (so peak memory is its own), configurations alternate
round by round (so drift in this shared machine's speed hits all of them alike), and step times
are medians after two warm-up steps. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import PeakSampler, cached_model_dir, load_cached_model, rss_bytes

MODES = ("floor", "hf_peft", "peftlab_model_loss", "peftlab")


def run_mode(mode: str, steps: int, threads: int) -> dict:
    import resource

    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_cached_model()
    model.config.use_cache = False
    if mode == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    elif mode == "hf_peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    else:
        import peftlab

        peftlab.attach(model, "lora[r=16,alpha=32,targets=all-linear]")
    from peftlab.train.loss import training_loss

    chunked = mode == "peftlab"
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=generator)
    weights_rss = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    times, losses = [], []
    for _ in range(steps + 2):
        start = time.perf_counter()
        loss = training_loss(model, {"input_ids": ids, "labels": ids}, chunked)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    sampler.stop()
    return {
        "mode": mode,
        "step_seconds": times[2:],
        "trainable_params": trainable,
        "rss_after_load_gb": weights_rss / 1e9,
        "peak_rss_train_gb": sampler.peak / 1e9,
        "peak_rss_process_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "first_loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=7, help="timed steps per process (after 2 warm-up steps)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per configuration, alternating")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.steps, args.threads)))
        return
    cached_model_dir()
    runs = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    report = {"setup": {"model": "SmolLM2-135M-Instruct", "lora": "r=16 alpha=32 all-linear", "batch": "4x128",
                        "dtype": "float32", "threads": args.threads, "steps_per_process": args.steps, "rounds": args.rounds}}
    for mode, results in runs.items():
        report[mode] = {
            "median_step_s": round(statistics.median(t for r in results for t in r["step_seconds"]), 4),
            "peak_rss_train_gb": round(max(r["peak_rss_train_gb"] for r in results), 3),
            "peak_rss_process_gb": round(max(r["peak_rss_process_gb"] for r in results), 3),
            "trainable_params": results[0]["trainable_params"],
            "first_loss": round(results[0]["first_loss"], 5),
        }
    floor, hf = report["floor"]["median_step_s"], report["hf_peft"]["median_step_s"]
    hf_rss = report["hf_peft"]["peak_rss_train_gb"]
    report["ratios"] = {"hf_peft_vs_floor_time": round(hf / floor, 3)}
    for mode in ("peftlab_model_loss", "peftlab"):
        report["ratios"][mode] = {
            "vs_floor_time": round(report[mode]["median_step_s"] / floor, 3),
            "vs_hf_peft_time": round(report[mode]["median_step_s"] / hf, 3),
            "vs_hf_peft_peak_rss": round(report[mode]["peak_rss_train_gb"] / hf_rss, 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
