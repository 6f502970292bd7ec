"""Multi-adapter serving on SmolLM2-135M: peftlab's engine beside HF PEFT, measured in one run.

    python benchmarks/serve.py static            # 16 prompts x 32 tokens: one adapter vs 16 distinct, peftlab and HF PEFT
    python benchmarks/serve.py merged --alpha 2 --tokens 64   # 32 rows, power-law adapters: merged mode vs never merging
    python benchmarks/serve.py prefix --requests 24 --tokens 8 # a shared 256-token system prompt: TTFT with and without the prefix cache
    python benchmarks/serve.py load --adapters 16 --rate 20 --requests 256 --prompt-tokens 8 32 --output-tokens 16 128 --max-batch 64
                                                 # Poisson overload: peftlab, peft-mixed, peft-swap
    python benchmarks/serve.py soak --minutes 10 --rate 22 --max-queue 64 --max-batch 64   # twice saturation: no crash, 429s, memory

Adapters are LoRA r=16 on q/k/v/o with random non-zero weights (a trained adapter costs the same
to run), made once under /tmp/peftlab-bench. ``static`` runs the engine in-process (also with
its base layers left to torch's own ``F.linear``, to show what oneDNN's kernels add); ``load`` and
``soak`` start each system as its own ``peftlab serve`` process (``--engine peftlab | peft-mixed |
peft-swap``) and drive it over HTTP with ``peftlab loadtest``'s workload (the same seed, so every
system gets the same requests). Every script prints JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, cached_model_dir, load_cached_model  # noqa: E402

ADAPTERS = CACHE.parent / "serve-adapters-r16"
TARGETS = "[q_proj,k_proj,v_proj,o_proj]"


def make_adapters(count: int) -> dict:
    """{name: folder} of ``count`` LoRA r=16 adapters for SmolLM2 (made once, then reused)."""
    import peftlab

    paths = {f"a{i}": ADAPTERS / f"a{i}" for i in range(count)}
    missing = [n for n, p in paths.items() if not (p / "adapter_model.safetensors").exists()]
    if missing:
        model = load_cached_model()
        peftlab.attach(model, f"lora[r=16,alpha=32,targets={TARGETS}]")
        for name in missing:
            g = torch.Generator().manual_seed(int(name[1:]))
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if "lora_B" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                    elif "lora_A" in pname:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            peftlab.save(model, paths[name])
    return {n: str(p) for n, p in paths.items()}


def prompts(tokenizer, count: int) -> list:
    data = Path(os.environ.get("PEFTLAB_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    rows = json.loads((data / "alpaca" / "alpaca_5000.json").read_text())[:count] if (data / "alpaca").exists() else [
        {"instruction": f"Write a sentence about the number {i}."} for i in range(count)]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False,
                                           add_generation_prompt=True) for r in rows]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def run_batch(engine, adapters: list, batch: list, tokens: int) -> tuple[float, list]:
    """(seconds, greedy outputs) of one static batch through an in-process engine: ``batch[i]``
    under ``adapters[i]``, ``tokens`` new tokens each."""
    from peftlab.serve.engine import Request

    requests = [Request(adapter=a, prompt_ids=ids, max_tokens=tokens, on_event=lambda e: None, temperature=0,
                        ignore_eos=True) for a, ids in zip(adapters, batch)]
    start = time.perf_counter()
    for r in requests:
        engine.submit(r)
    while engine.busy():
        engine.step()
    return time.perf_counter() - start, [r.output_ids for r in requests]


# ---- static: one batch, one adapter vs many ---------------------------------------------------

def static(args) -> dict:
    from peftlab.formats.io import fingerprint
    from peftlab.models import load_tokenizer
    from peftlab.serve.engine import Engine
    from peftlab.serve.lora_bank import LoraBank
    from peftlab.serve.runner import DecoderRunner

    torch.set_num_threads(args.threads)
    paths = make_adapters(16)
    tokenizer = load_tokenizer(str(cached_model_dir()))
    batch = prompts(tokenizer, 16)
    names = list(paths)

    def make_engine(pack: bool):
        model = load_cached_model().eval()  # never merged here: the one-adapter row is the unmerged engine's
        bank = LoraBank(model, max_loras=16, max_rank=16, base_fingerprint=fingerprint(model), merge_share=2.0)
        for name, path in paths.items():
            bank.register(name, path)
        return Engine(DecoderRunner(model, max_sequences=16, pack=pack), bank, tokenizer, [], max_batch=16)

    engine, unpacked = make_engine(True), make_engine(False)  # unpacked: torch's own F.linear for the base layers

    def peftlab_run(adapters, engine=engine):
        return run_batch(engine, adapters, batch, args.tokens)

    from peft import PeftModel

    hf = PeftModel.from_pretrained(load_cached_model().eval(), paths["a0"], adapter_name="a0")
    for name in names[1:]:
        hf.load_adapter(paths[name], adapter_name=name)
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])

    def hf_run(adapters):
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens, eos_token_id=None,
                              do_sample=False, adapter_names=adapters, pad_token_id=pad)
        return time.perf_counter() - start, out[:, width:].tolist()

    cases = {"peftlab_one": lambda: peftlab_run(["a0"] * 16), "peftlab_mixed": lambda: peftlab_run(names),
             "peftlab_base": lambda: peftlab_run([None] * 16),
             "peftlab_mixed_unpacked": lambda: peftlab_run(names, unpacked),
             "hf_one": lambda: hf_run(["a0"] * 16), "hf_mixed": lambda: hf_run(names)}
    times = {k: [] for k in cases}
    outputs = {}
    for case in cases.values():  # warm-up
        case()
    for _ in range(args.repeats):  # interleaved, so drift hits every case alike
        for key, case in cases.items():
            seconds, outputs[key] = case()
            times[key].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    mismatched = sum(a != b for a, b in zip(outputs["peftlab_mixed"], outputs["hf_mixed"]))
    alone = single_adapter_outputs(paths, batch, args.tokens, pad)
    differing_from_alone = sum(a != b for a, b in zip(outputs["peftlab_mixed"], alone))
    return {"prompts": 16, "new_tokens": args.tokens, "threads": args.threads, "repeats": args.repeats,
            "seconds": median, "all_seconds": times,
            "tokens_per_second": {k: 16 * args.tokens / v for k, v in median.items()},
            "peftlab_mixed_over_one": median["peftlab_mixed"] / median["peftlab_one"],
            "hf_mixed_over_one": median["hf_mixed"] / median["hf_one"],
            "hf_mixed_over_peftlab_mixed": median["hf_mixed"] / median["peftlab_mixed"],
            "unpacked_over_packed": median["peftlab_mixed_unpacked"] / median["peftlab_mixed"],
            "rows_differing_unpacked_vs_packed": sum(a != b for a, b in zip(outputs["peftlab_mixed"],
                                                                            outputs["peftlab_mixed_unpacked"])),
            "rows_differing_from_hf_peft_mixed": mismatched,
            "rows_differing_from_each_adapter_alone": differing_from_alone}


# ---- merged: dLoRA's merged mode on a skewed batch -----------------------------------------------

def merged(args) -> dict:
    """One static batch whose adapters follow a power law (``--alpha``, 2 by default here: the most
    popular of 16 adapters holds about 60% of the rows), served by two engines side by side: one
    that merges the dominant adapter into the base (``--merge-share``) and one that never merges."""
    import random

    from peftlab.formats.io import fingerprint
    from peftlab.models import load_tokenizer
    from peftlab.serve.engine import Engine
    from peftlab.serve.lora_bank import LoraBank
    from peftlab.serve.runner import DecoderRunner

    torch.set_num_threads(args.threads)
    paths = make_adapters(16)
    tokenizer = load_tokenizer(str(cached_model_dir()))
    rows = args.rows
    batch = (prompts(tokenizer, rows) * 2)[:rows]
    names = list(paths)
    weights = [1 / (i + 1) ** args.alpha for i in range(len(names))]
    adapters = random.Random(0).choices(names, weights=weights, k=rows)

    def make_engine(share: float):
        model = load_cached_model().eval()
        bank = LoraBank(model, max_loras=16, max_rank=16, base_fingerprint=fingerprint(model), merge_share=share)
        for name, path in paths.items():
            bank.register(name, path)
        return Engine(DecoderRunner(model, max_sequences=rows), bank, tokenizer, [], max_batch=rows)

    engines = {"merging": make_engine(args.merge_share), "unmerged": make_engine(2.0)}

    def run(engine):
        return run_batch(engine, adapters, batch, args.tokens)

    times, outputs = {k: [] for k in engines}, {}
    for engine in engines.values():  # warm-up: the merging engine ends it merged, as a server would stay
        run(engine)
    for _ in range(args.repeats):
        for key, engine in engines.items():
            seconds, outputs[key] = run(engine)
            times[key].append(seconds)
    median = {k: statistics.median(v) for k, v in times.items()}
    top = max(set(adapters), key=adapters.count)
    return {"rows": rows, "new_tokens": args.tokens, "alpha": args.alpha, "threads": args.threads, "repeats": args.repeats,
            "dominant_share": adapters.count(top) / rows, "merge_share": args.merge_share,
            "merges": engines["merging"].bank.stats["merges"], "unmerges": engines["merging"].bank.stats["unmerges"],
            "seconds": median, "all_seconds": times,
            "tokens_per_second": {k: rows * args.tokens / v for k, v in median.items()},
            "merging_over_unmerged": median["merging"] / median["unmerged"],
            "rows_differing": sum(a != b for a, b in zip(outputs["merging"], outputs["unmerged"]))}


# ---- prefix: a shared system prompt, with and without the prefix cache -------------------------

def prefix(args) -> dict:
    """Requests that share one system prompt (``--system-tokens``, 256 by default) under one adapter,
    each with its own question, arriving one after another; two engines side by side, one with the
    prefix cache and one without. Time to first token is measured from submission."""
    from peftlab.formats.io import fingerprint
    from peftlab.models import load_tokenizer
    from peftlab.serve.engine import Engine, Request
    from peftlab.serve.lora_bank import LoraBank
    from peftlab.serve.prefix_cache import PrefixCache
    from peftlab.serve.runner import DecoderRunner

    torch.set_num_threads(args.threads)
    paths = make_adapters(1)
    tokenizer = load_tokenizer(str(cached_model_dir()))
    questions = prompts(tokenizer, args.requests)
    system = [t for ids in prompts(tokenizer, 64) for t in ids][:args.system_tokens]

    def make_engine(cache: bool):
        model = load_cached_model().eval()
        bank = LoraBank(model, max_loras=1, max_rank=16, base_fingerprint=fingerprint(model), merge_share=2.0)
        bank.register("a0", paths["a0"])
        return Engine(DecoderRunner(model, max_sequences=4), bank, tokenizer, [], max_batch=4,
                      prefix_cache=PrefixCache(max_tokens=4096) if cache else None)

    engines = {"prefix_cache": make_engine(True), "no_cache": make_engine(False)}
    ttft, outputs = {k: [] for k in engines}, {k: [] for k in engines}
    for i, question in enumerate(questions):
        for key, engine in engines.items():
            request = Request(adapter="a0", prompt_ids=system + question, max_tokens=args.tokens, on_event=lambda e: None,
                              temperature=0, ignore_eos=True)
            engine.submit(request)
            while engine.busy():
                engine.step()
            if i:  # the first request fills the cache; it is the same cold start for both
                ttft[key].append(request.first_token - request.arrived)
            outputs[key].append(request.output_ids)
    p50 = {k: statistics.median(v) for k, v in ttft.items()}
    return {"requests": args.requests, "system_tokens": len(system), "new_tokens": args.tokens, "threads": args.threads,
            "prompt_tokens_mean": statistics.mean(len(system) + len(q) for q in questions),
            "prefill_tokens_saved": engines["prefix_cache"].prefix.stats["hit_tokens"],
            "ttft_p50_seconds": p50, "ttft_seconds": ttft,
            "no_cache_over_prefix_cache_ttft_p50": p50["no_cache"] / p50["prefix_cache"],
            "rows_differing": sum(a != b for a, b in zip(outputs["prefix_cache"], outputs["no_cache"]))}


def single_adapter_outputs(paths: dict, batch: list, tokens: int, pad: int) -> list:
    """Row i through adapter i alone: peftlab's model with only that adapter active, HF generate."""
    import peftlab

    model = load_cached_model().eval()
    for name, path in paths.items():
        peftlab.load(model, path, name=name)
    outputs = []
    with torch.inference_mode():
        for name, ids in zip(paths, batch):
            peftlab.set_active(model, name)
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=tokens, eos_token_id=None,
                                 do_sample=False, pad_token_id=pad)
            outputs.append(out[0, len(ids):].tolist())
    return outputs


# ---- load: each system as a server, the same workload ------------------------------------------

def start_server(engine: str, paths: dict, port: int, threads: int, extra=(), max_batch: int = 32) -> subprocess.Popen:
    command = [sys.executable, "-m", "peftlab", "serve", "--base", str(cached_model_dir()), "--port", str(port),
               "--engine", engine, "--threads", str(threads), "--max-batch", str(max_batch), "--max-loras", "32",
               "--max-cpu-loras", "64", *extra]
    for name, path in paths.items():
        command += ["--adapter", f"{name}={path}"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_ARENA_MAX": "2"})
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"{engine} server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    server.kill()
    raise RuntimeError(f"{engine} server did not start in 300 s")


def stop_server(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=120)
    except subprocess.TimeoutExpired:
        server.kill()


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def load(args) -> dict:
    from peftlab.models import load_tokenizer
    from peftlab.serve.loadtest import Workload, plan, run_load, summarize

    paths = make_adapters(args.adapters)
    tokenizer = load_tokenizer(str(cached_model_dir()))
    results = {}
    texts = {}
    for system in args.systems.split(","):
        server = start_server(system, paths, args.port, args.threads, max_batch=args.max_batch)
        try:
            base = "smollm2-135m-fp32"
            for rate in args.rate:
                workload = Workload(adapters=list(paths), rate=rate, cv=args.cv, alpha=args.alpha, requests=args.requests,
                                    prompt_tokens=tuple(args.prompt_tokens), output_tokens=tuple(args.output_tokens),
                                    base_name=base, seed=args.seed)
                planned = plan(workload, tokenizer)
                outcomes, seconds = asyncio.run(run_load(f"http://127.0.0.1:{args.port}", planned))
                summary = summarize(outcomes, seconds, args.slo)
                results.setdefault(system, {})[str(rate)] = summary
                texts[(system, rate)] = [o.text for o in outcomes]
                print(json.dumps({"system": system, "rate": rate, "summary": summary}), flush=True)
        finally:
            stop_server(server)
    # every system answered the same greedy requests: their texts must agree
    for rate in args.rate:
        systems = [s for s in args.systems.split(",")]
        reference = texts[(systems[0], rate)]
        for other in systems[1:]:
            results.setdefault("mismatches", {})[f"{systems[0]} vs {other} @ {rate}"] = sum(
                a != b for a, b in zip(reference, texts[(other, rate)]))
    return {"adapters": args.adapters, "requests": args.requests, "max_batch": args.max_batch, "cv": args.cv, "alpha": args.alpha,
            "prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens, "threads": args.threads,
            "results": results}


def soak(args) -> dict:
    import httpx

    from peftlab.models import load_tokenizer
    from peftlab.serve.loadtest import Workload, plan, run_load, summarize

    paths = make_adapters(args.adapters)
    tokenizer = load_tokenizer(str(cached_model_dir()))
    server = start_server("peftlab", paths, args.port, args.threads, extra=["--max-queue", str(args.max_queue)],
                          max_batch=args.max_batch)
    samples = []
    try:
        requests = int(args.rate * args.minutes * 60)
        workload = Workload(adapters=list(paths), rate=args.rate, cv=1.0, alpha=args.alpha, requests=requests,
                            prompt_tokens=tuple(args.prompt_tokens), output_tokens=tuple(args.output_tokens),
                            base_name="smollm2-135m-fp32", seed=args.seed)
        planned = plan(workload, tokenizer)
        stop = False

        async def sample_memory():
            start = time.perf_counter()
            while not stop:
                samples.append((time.perf_counter() - start, rss_of(server.pid)))
                await asyncio.sleep(5)

        async def main():
            nonlocal stop
            sampler = asyncio.create_task(sample_memory())
            result = await run_load(f"http://127.0.0.1:{args.port}", planned, timeout=1200)
            stop = True
            await sampler
            return result

        outcomes, seconds = asyncio.run(main())
        alive = server.poll() is None and httpx.get(f"http://127.0.0.1:{args.port}/health", timeout=10).status_code == 200
    finally:
        stop_server(server)
    summary = summarize(outcomes, seconds, args.slo)
    answered = sum(1 for o in outcomes if (o.status == 200 and o.error is None) or o.status == 429)
    warm = [m for t, m in samples if t >= 60] or [m for _, m in samples]
    return {"minutes": args.minutes, "rate": args.rate, "requests": len(outcomes), "server_alive_after": alive,
            "answered_or_429": answered, "status_counts": _statuses(outcomes), "summary": summary,
            "rss_after_first_minute_mb": warm[0] / 2**20, "rss_end_mb": warm[-1] / 2**20,
            "rss_max_mb": max(warm) / 2**20, "memory_growth": warm[-1] / warm[0] - 1,
            "rss_samples_mb": [(round(t), round(m / 2**20, 1)) for t, m in samples]}


def _statuses(outcomes) -> dict:
    counts = {}
    for o in outcomes:
        key = str(o.status) if o.status else (o.error or "?").split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("static", "merged", "prefix", "load", "soak"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--systems", default="peftlab,peft-mixed,peft-swap")
    parser.add_argument("--rate", type=float, nargs="+", default=[8.0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--output-tokens", type=int, nargs=2, default=[16, 48])
    parser.add_argument("--slo", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32, help="running batch of every system")
    parser.add_argument("--rows", type=int, default=32, help="merged: the static batch's rows")
    parser.add_argument("--merge-share", type=float, default=0.6, help="merged: the merging engine's --merge-share")
    parser.add_argument("--system-tokens", type=int, default=256, help="prefix: the shared system prompt's length")
    args = parser.parse_args()
    if args.mode == "soak":
        args.rate = args.rate[0]
    modes = {"static": static, "merged": merged, "prefix": prefix, "load": load, "soak": soak}
    print(json.dumps(modes[args.mode](args), indent=1))


if __name__ == "__main__":
    main()
