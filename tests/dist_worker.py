"""One rank of a data-parallel test run (started by test_distributed.py through torchrun), or the
single-process reference (started directly).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT [options]

Trains a tiny Llama with LoRA on fixed token rows of equal length and writes, on rank 0,
``OUT/weights.safetensors`` (the trainable parameters) and ``OUT/result.json`` (losses, tokens).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_helpers import tiny_llama  # noqa: E402

import peftlab  # noqa: E402
from peftlab.dist.fsdp import full, is_sharded  # noqa: E402
from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.train import TrainConfig, train  # noqa: E402

ROWS, LENGTH = 16, 12
faulthandler.enable()  # a native abort prints the Python stack it happened under
torch._C._set_print_stack_traces_on_fatal_signal(True)  # ... and the native one


def rows() -> list[dict]:
    ids = torch.randint(3, 64, (ROWS, LENGTH), generator=torch.Generator().manual_seed(7))
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def fill_shards_and_save(model, out: Path, rank: int) -> None:
    """Every rank's part of every trainable tensor set to rank + 1, then peftlab.save on every rank:
    the file must hold every rank's part, not rank 0's alone (accelerate PR #4206's bug)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                (p.to_local() if is_sharded(p) else p).fill_(rank + 1)
    peftlab.save(model, out / "filled")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at", type=int, default=0, help="rank --dying-rank exits hard after this step")
    parser.add_argument("--dying-rank", type=int, default=1)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--shard-fill", action="store_true",
                        help="after training, fill each rank's shard of the adapter with rank + 1 and save it")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--stray", action="store_true", help="a trainable parameter the loss never reaches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    model = tiny_llama(spec="lora[r=4,alpha=8,targets=all-linear]")
    if args.stray:
        model.register_parameter("stray", nn.Parameter(torch.zeros(3)))
    rank = int(os.environ.get("RANK", 0))

    def on_step(step):
        if args.die_at and rank == args.dying_rank and step == args.die_at:
            os._exit(17)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum, lr=1e-2, warmup_steps=0,
                      progress=False, device="cpu", out_dir=str(out), save_every=args.save_every, resume=args.resume,
                      max_grad_norm=1.0, gradient_checkpointing=args.checkpointing, strategy=args.strategy)
    try:
        result = train(model, rows(), cfg, on_step=on_step)
    except PeftlabError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if rank == 0 and args.strategy == "fsdp":  # how much of the sharded weights this rank holds
        sharded = [p for p in model.parameters() if is_sharded(p)]
        local = sum(p.to_local().numel() for p in sharded)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards.json").write_text(json.dumps({"local": local, "whole": sum(p.numel() for p in sharded),
                                                     "frozen_sharded": sum(not p.requires_grad for p in sharded)}))
    if args.shard_fill:
        fill_shards_and_save(model, out, rank)
    weights = {name: full(p.detach()).contiguous() for name, p in model.named_parameters() if p.requires_grad}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps({"losses": result.losses, "tokens": result.tokens}))


if __name__ == "__main__":
    main()
