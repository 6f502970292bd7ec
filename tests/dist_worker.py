"""One rank of a data-parallel test run (started by test_distributed.py through torchrun), or the
single-process reference (started directly).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT [options]

Trains a tiny Llama with LoRA on fixed token rows of equal length and writes, on rank 0,
``OUT/weights.safetensors`` (the trainable parameters) and ``OUT/result.json`` (losses, tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_helpers import tiny_llama  # noqa: E402

from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.train import TrainConfig, train  # noqa: E402

ROWS, LENGTH = 16, 12


def rows() -> list[dict]:
    ids = torch.randint(3, 64, (ROWS, LENGTH), generator=torch.Generator().manual_seed(7))
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--die-at", type=int, default=0, help="rank 1 exits hard after this step")
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
        if args.die_at and rank == 1 and step == args.die_at:
            os._exit(17)

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, grad_accum=args.grad_accum, lr=1e-2, warmup_steps=0,
                      progress=False, device="cpu", out_dir=str(out), save_every=args.save_every, resume=args.resume,
                      max_grad_norm=1.0, gradient_checkpointing=args.checkpointing)
    try:
        result = train(model, rows(), cfg, on_step=on_step)
    except PeftlabError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        weights = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(out / "weights.safetensors"))
        (out / "result.json").write_text(json.dumps({"losses": result.losses, "tokens": result.tokens}))


if __name__ == "__main__":
    main()
