"""Training memory on SmolLM2-135M: what each of peftlab's memory-lean options saves, beside HF PEFT.

    .venv/bin/python benchmarks/memory.py [--steps 30] [--threads 2] [--rows lora,mezo,...]

One fine-tuning job, run once per configuration, each in its own process: SmolLM2-135M-Instruct in
fp32, batch 4 x 256 tokens of Alpaca text (``../shared/data/alpaca``, packed; random tokens if it is
absent), 30 steps, seed 0, AdamW at lr 1e-3 with 3 warm-up steps and cosine decay, gradient clipping
at 1.0. Every backprop row runs in ``peftlab.train``, so the data order, optimizer and schedule are
the same for all of them; only the model, its adapter, checkpointing and the loss differ. LoRA is
r=16, alpha=32 on every linear layer but the head (the same for HF PEFT's twin).

Rows:

- floor: the base model's forward only (no gradient), the same loss: inference, the least any
  training job can need.
- hf_lora, hf_lora_gc: HF PEFT's LoRA with the model's own loss (full logits), without and with
  ``transformers``' gradient checkpointing (``gradient_checkpointing_enable``).
- lora: peftlab's LoRA with the model's own loss (like for like with hf_lora); lora_gc: + peftlab's
  gradient checkpointing; lora_gc_chunked: + the blockwise loss (``train/loss.py``).
- meft: MEFT (reversible blocks: the backward computes each block's inputs back from its outputs and
  recomputes the block, keeping no activations per layer), lam=0.01 and the exact inputs of every
  second block kept (``anchor_every=2``): at the paper's lam=0.1 this 30-block pre-norm model starts
  far from the pretrained one and its fp32 inverse overflows (``methods/meft.py``); blockwise loss.
- lora_fa: LoRA-FA (A frozen), blockwise loss.
- qlora_nf4: QLoRA, LoRA on an NF4 base (every linear layer but the head, double quantization),
  blockwise loss; qlora_nf4_loftq: the same with LoftQ's init; qlora_nf4_gc: + checkpointing;
  qlora_nf4_emb: the embeddings and the tied head in NF4 too; qlora_nf4_emb_gc: + checkpointing.
- mezo: LoRA trained by MeZO (two forward passes a step, lr 1e-4, eps 1e-2 as in the paper's LoRA
  grid), blockwise loss.
- ladder: ladder side tuning (the backbone runs without a graph), blockwise loss.

Memory is resident memory (the machine has no GPU), in two definitions. ``peak_process_mb`` is the
whole process's peak while training: the kernel's high-water mark (VmHWM), reset once the model is
built, so it is what ``top`` shows at the worst moment of the run. ``peak_mb`` is that minus the
process's memory before the model was loaded (Python, torch and transformers themselves, the same
in every process): the CPU counterpart of ``torch.cuda.max_memory_allocated``. Each process runs
with glibc's mmap threshold fixed, so freed tensors leave resident memory (see ``ALLOCATOR``). ``base_weights_mb``
is what the base model's weights take (quantized ones as stored). Step time is the median step.
Prints one JSON object, with the issue's targets checked under ``targets``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import PeakSampler, cached_model_dir, load_cached_model, rss_bytes

LORA = "lora[r=16,alpha=32,targets=all-linear]"
ROWS = {
    "floor": {},
    "hf_lora": {"hf": True, "chunked": False},
    "hf_lora_gc": {"hf": True, "chunked": False, "gc": True},
    "lora": {"method": LORA, "chunked": False},
    "lora_gc": {"method": LORA, "chunked": False, "gc": True},
    "lora_gc_chunked": {"method": LORA, "gc": True},
    "meft": {"method": "meft[lam=0.01,anchor_every=2]"},
    "lora_fa": {"method": "lora_fa[r=16,alpha=32,targets=all-linear]"},
    "qlora_nf4": {"method": LORA, "quantize": "nf4"},
    "qlora_nf4_loftq": {"method": "lora[r=16,alpha=32,targets=all-linear,init=loftq]", "quantize": "nf4", "loftq": 16},
    "qlora_nf4_emb": {"method": LORA, "quantize": "nf4", "embeddings": True},
    "qlora_nf4_emb_gc": {"method": LORA, "quantize": "nf4", "embeddings": True, "gc": True},
    "qlora_nf4_gc": {"method": LORA, "quantize": "nf4", "gc": True},
    "mezo": {"method": LORA, "optimizer": "mezo"},
    "ladder": {"method": "ladder"},
}
BATCH, LENGTH, SEED = 4, 256, 0
# glibc raises its mmap threshold as large blocks are freed, up to 32 MB, and then keeps freed
# blocks below it in its heap: resident memory would measure the allocator's high-water mark, not
# the job's. A fixed threshold hands every block of 128 KB or more back to the system when freed.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"


def token_windows(count: int) -> "torch.Tensor":
    """``count`` windows of LENGTH tokens: Alpaca examples rendered as text and packed end to end."""
    import torch
    from transformers import AutoTokenizer

    if not ALPACA.exists():
        print(f"note: {ALPACA} not found; training on random tokens", file=sys.stderr)
        return torch.randint(0, 49152, (count, LENGTH), generator=torch.Generator().manual_seed(SEED))
    tokenizer = AutoTokenizer.from_pretrained(cached_model_dir())
    stream = []
    for row in json.loads(ALPACA.read_text()):
        text = f"{row['instruction']}\n{row.get('input', '')}\n{row['output']}".replace("\n\n", "\n")
        stream += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= count * LENGTH:
            break
    return torch.tensor(stream[:count * LENGTH]).view(count, LENGTH)


def build(row: dict):
    """The model of a row, ready to train (its base weights' bytes, for the report)."""
    import peftlab
    from peftlab.quant import weight_bytes

    model = load_cached_model()
    model.config.use_cache = False
    if row.get("quantize"):
        peftlab.quantize(model, row["quantize"], double_quant=True, embeddings=bool(row.get("embeddings")),
                         loftq_rank=row.get("loftq"))
    weights = weight_bytes(model)["total"]
    if row.get("hf"):
        from peft import LoraConfig, get_peft_model

        if row.get("gc"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    elif row.get("method"):
        peftlab.attach(model, row["method"])
    else:
        model.requires_grad_(False)
    return model, weights


def run_row(name: str, steps: int, threads: int) -> dict:
    import torch

    from peftlab.train import TrainConfig, train
    from peftlab.train.loss import training_loss

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    windows = token_windows(steps * BATCH)
    runtime = rss_bytes()
    row = ROWS[name]
    model, weights = build(row)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    marks = []
    setup = rss_bytes()
    with PeakSampler() as sampler:
        if name == "floor":
            losses = []
            model.eval()
            with torch.no_grad():
                for step in range(steps):
                    batch = windows[step * BATCH:(step + 1) * BATCH]
                    losses.append(training_loss(model, {"input_ids": batch, "labels": batch}).item())
                    marks.append(time.perf_counter())
        else:
            data = [{"input_ids": w, "labels": w} for w in windows]
            optimizer = row.get("optimizer", "adamw")
            cfg = TrainConfig(steps=steps, batch_size=BATCH, lr=1e-4 if optimizer == "mezo" else 1e-3,
                              mezo_eps=1e-2, optimizer=optimizer, warmup_steps=3, seed=SEED, progress=False,
                              chunked_loss=row.get("chunked", True),
                              gradient_checkpointing=bool(row.get("gc")) and not row.get("hf"))
            losses = train(model, data, cfg, on_step=lambda step: marks.append(time.perf_counter())).losses
    step_times = [b - a for a, b in zip(marks, marks[1:])]
    return {
        "row": name,
        "peak_mb": round((sampler.peak - runtime) / 2**20, 1),
        "peak_process_mb": round(sampler.peak / 2**20, 1),
        "setup_mb": round((setup - runtime) / 2**20, 1),
        "base_weights_mb": round(weights / 2**20, 1),
        "step_s": round(statistics.median(step_times), 3),
        "trainable_params": trainable,
        "loss": {f"step_{s}": round(losses[s - 1], 4) for s in (10, 20, 30) if s <= len(losses)},
    }


def targets(rows: dict) -> dict:
    """The issue's targets, each with the figures it compares. The leanest backprop configuration
    is the one with the lowest peak among those whose loss at the last step is within 2% of HF PEFT
    LoRA's; every backprop row's ratios are listed too."""
    checks = {}
    fp32 = rows.get("floor", {}).get("base_weights_mb")
    nf4 = [r for r in rows.values() if r["row"].startswith("qlora_nf4")]
    if fp32 and nf4:
        best = min(nf4, key=lambda r: r["base_weights_mb"])
        ratio = best["base_weights_mb"] / fp32
        checks["nf4_weights_vs_fp32 <= 0.20"] = {"row": best["row"], "value": round(ratio, 3), "met": ratio <= 0.20}
    if "floor" in rows and "mezo" in rows:
        ratio = rows["mezo"]["peak_mb"] / rows["floor"]["peak_mb"]
        checks["mezo_peak_vs_inference <= 1.15"] = {"value": round(ratio, 3), "met": ratio <= 1.15}
    hf, hf_gc = rows.get("hf_lora"), rows.get("hf_lora_gc")
    if not hf or not hf_gc or "step_30" not in hf["loss"]:
        return checks
    candidates = {}
    for r in rows.values():
        if r["row"] in ("floor", "mezo") or r["row"].startswith("hf_") or "step_30" not in r["loss"]:
            continue
        candidates[r["row"]] = {"peak_vs_hf_lora": round(r["peak_mb"] / hf["peak_mb"], 3),
                                "peak_vs_hf_lora_gc": round(r["peak_mb"] / hf_gc["peak_mb"], 3),
                                "process_peak_vs_hf_lora": round(r["peak_process_mb"] / hf["peak_process_mb"], 3),
                                "process_peak_vs_hf_lora_gc": round(r["peak_process_mb"] / hf_gc["peak_process_mb"], 3),
                                "loss_at_30_vs_hf_pct": round(100 * (r["loss"]["step_30"] / hf["loss"]["step_30"] - 1), 2)}
    close = [name for name, c in candidates.items() if abs(c["loss_at_30_vs_hf_pct"]) <= 2]
    if close:
        lean = min(close, key=lambda name: rows[name]["peak_mb"])
        c = candidates[lean]
        checks["leanest_backprop (<= 0.50x hf_lora, <= 0.80x hf_lora_gc, loss within 2%)"] = {
            "row": lean, **c, "met": c["peak_vs_hf_lora"] <= 0.5 and c["peak_vs_hf_lora_gc"] <= 0.8}
    checks["backprop_rows"] = candidates
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.steps, args.threads)))
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    cached_model_dir()
    rows = {}
    for name in names:
        cmd = [sys.executable, __file__, "--row", name, "--steps", str(args.steps), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
        if done.returncode:
            rows[name] = {"row": name, "error": done.stderr.strip().splitlines()[-1:]}
        else:
            rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[name]), file=sys.stderr, flush=True)
    report = {"setup": {"model": "SmolLM2-135M-Instruct (fp32)", "batch": f"{BATCH}x{LENGTH}", "steps": args.steps,
                        "threads": args.threads, "lora": "r=16 alpha=32 all-linear"},
              "rows": rows, "targets": targets({k: v for k, v in rows.items() if "error" not in v})}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
