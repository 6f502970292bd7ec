"""AdapterDrop's inference speed-up: SmolLM2-135M with Houlsby adapters, dropping the lowest n layers.

    .venv/bin/python benchmarks/adapterdrop.py [--batch 1] [--length 128] [--reps 30] [--threads 1]

Houlsby adapters (reduction 16: bottleneck 36, after the attention and the FFN output of all 30
layers) are attached once; ``set_drop_layers`` switches how many of the lowest layers skip their
adapters (0, 5, 10, ..., 30). The floor is the same model without any adapter (a separate copy,
so no wrapper is in its way). Every repetition runs every setting once, in a rotating order, so
drift in this shared machine's speed hits all of them alike; each setting's time is the median
of its repetitions, after one warm-up round. Prints one JSON object: median milliseconds per
forward pass (prefill of ``batch x length`` tokens, no gradients) and each one's ratio to the floor.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import peftlab
from peftlab.methods.bottleneck import set_drop_layers
from peftlab.models import load_model


def timed_forward(model, ids) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="one thread is steadier on a shared machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base, _ = load_model("smollm2-135m", device="cpu")
    base.eval()
    adapted = peftlab.attach(copy.deepcopy(base), "houlsby")
    with torch.no_grad():  # trained-looking adapters (the speed does not depend on the values)
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(std=0.01)
    layers = base.config.num_hidden_layers
    drops = list(range(0, layers + 1, 5))
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length))

    settings = ["base"] + [f"drop_{n}" for n in drops]
    times = {s: [] for s in settings}
    for rep in range(args.reps + 1):
        order = settings[rep % len(settings):] + settings[:rep % len(settings)]
        for setting in order:
            if setting == "base":
                seconds = timed_forward(base, ids)
            else:
                set_drop_layers(adapted, "default", int(setting.split("_")[1]))
                seconds = timed_forward(adapted, ids)
            if rep:  # round 0 warms up
                times[setting].append(seconds)

    median_ms = {s: round(1000 * statistics.median(t), 2) for s, t in times.items()}
    print(json.dumps({
        "model": "SmolLM2-135M-Instruct (fp32, CPU)",
        "method": "houlsby (reduction 16, attn-out and ffn-out of every layer)",
        "tokens_per_forward": [args.batch, args.length],
        "threads": args.threads,
        "repetitions": args.reps,
        "layers_with_adapters": {f"drop_{n}": layers - n for n in drops},
        "median_ms": median_ms,
        "ratio_to_base": {s: round(median_ms[s] / median_ms["base"], 3) for s in settings},
        "ratio_to_drop_0": {s: round(median_ms[s] / median_ms["drop_0"], 3) for s in settings},
    }, indent=2))


if __name__ == "__main__":
    main()
