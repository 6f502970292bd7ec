"""``peftlab loadtest``: S-LoRA's multi-adapter workload against any OpenAI-compatible server.

The workload (S-LoRA, Sheng et al., 2023, section 7): ``n`` adapters whose popularity follows a
power law (adapter ``i`` is asked for with probability proportional to ``(i + 1) ** -alpha``),
arrivals with Gamma-distributed gaps (mean ``1 / rate``, coefficient of variation ``cv``; ``cv=1``
is a Poisson process, larger is burstier), prompt and output lengths drawn from uniform ranges
or taken from a file. Everything is drawn from one seed, so two systems get the same requests.

Every request is a streamed ``/v1/completions`` call with ``ignore_eos`` (so outputs have the
drawn length), timed at the client: time to first token (TTFT), time per output token after the
first (TPOT), end-to-end latency. The report: throughput (requests/s and output tokens/s over
the run), TTFT / TPOT / latency percentiles, SLO attainment (the share of requests whose first
token came within ``--slo`` seconds), and errors by kind; as JSON and a PNG.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing about rivers mountains "
         "cities gardens and old stories of kings queens sailors farmers with bright lanterns").split()


@dataclass
class Workload:
    adapters: list  # names, most popular first
    rate: float = 2.0  # requests per second
    cv: float = 1.0
    alpha: float = 1.0
    requests: int = 100
    prompt_tokens: tuple = (16, 64)
    output_tokens: tuple = (16, 64)
    base_share: float = 0.0  # share of requests for the base model itself
    base_name: str | None = None
    seed: int = 0
    prompts_file: str | None = None

    def validate(self) -> None:
        if not self.adapters and not self.base_share:
            raise ConfigError("the workload needs adapters (--adapters) or base requests (--base-share)")
        if self.rate <= 0 or self.cv <= 0 or self.alpha < 0 or self.requests < 1:
            raise ConfigError("--rate and --cv must be > 0, --alpha >= 0 and --requests >= 1")
        for name, (low, high) in (("prompt", self.prompt_tokens), ("output", self.output_tokens)):
            if not 1 <= low <= high:
                raise ConfigError(f"--{name}-tokens must be LOW,HIGH with 1 <= LOW <= HIGH")


@dataclass
class Planned:
    at: float  # seconds after the start
    model: str
    prompt: str
    max_tokens: int


def plan(workload: Workload, tokenizer=None) -> list:
    """The requests of a workload, in arrival order; the same seed gives the same list."""
    workload.validate()
    rng = random.Random(workload.seed)
    weights = [(i + 1) ** -workload.alpha for i in range(len(workload.adapters))]
    shape = 1.0 / workload.cv ** 2  # Gamma(k, theta) has cv = 1/sqrt(k) and mean k * theta
    scale = 1.0 / (workload.rate * shape)
    texts = _prompts_file(workload.prompts_file) if workload.prompts_file else None
    at, planned = 0.0, []
    for i in range(workload.requests):
        if i:
            at += rng.gammavariate(shape, scale)
        if workload.adapters and rng.random() >= workload.base_share:
            model = rng.choices(workload.adapters, weights)[0]
        else:
            model = workload.base_name
        if texts:
            prompt, max_tokens = texts[i % len(texts)]
            max_tokens = max_tokens or rng.randint(*workload.output_tokens)
        else:
            prompt = _prompt(rng, rng.randint(*workload.prompt_tokens), tokenizer)
            max_tokens = rng.randint(*workload.output_tokens)
        planned.append(Planned(at, model, prompt, max_tokens))
    return planned


def _prompt(rng: random.Random, tokens: int, tokenizer) -> str:
    words = [rng.choice(WORDS) for _ in range(tokens)]
    if tokenizer is None:
        return " ".join(words)  # about one token per word for these common words
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def _prompts_file(path: str) -> list:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row["prompt"], row.get("max_tokens")))
    if not rows:
        raise ConfigError(f"{path} holds no prompts (JSON lines with 'prompt' and optional 'max_tokens')")
    return rows


@dataclass
class Outcome:
    model: str
    sent: float
    status: int = 0
    error: str | None = None
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    text: str = ""


async def _one(client, url: str, headers: dict, item: Planned, start: float, outcome: Outcome, greedy: bool) -> None:
    body = {"model": item.model, "prompt": item.prompt, "max_tokens": item.max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    if greedy:
        body["temperature"] = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            outcome.status = response.status_code
            if response.status_code != 200:
                outcome.error = (await response.aread()).decode(errors="replace")[:300]
                outcome.done = time.perf_counter() - start
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    outcome.error = str(data["error"])[:300]
                    break
                for choice in data.get("choices") or []:  # the first chunk marks the first token, even
                    if outcome.first is None:                 # if its text is empty (a special token)
                        outcome.first = time.perf_counter() - start
                    outcome.text += choice.get("text") or ""
                if data.get("usage"):
                    outcome.tokens = data["usage"]["completion_tokens"]
    except Exception as error:  # a refused or dropped connection is an error of the run, not of the tool
        outcome.error = f"{type(error).__name__}: {error}"[:300]
    outcome.done = time.perf_counter() - start


async def run_load(url: str, planned: list, api_key: str | None = None, greedy: bool = True,
                   timeout: float = 600.0) -> tuple:
    """Send ``planned`` at their times; return (outcomes, seconds from the first send to the last answer)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(planned) + 8, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        outcomes, tasks = [], []
        for item in planned:
            delay = item.at - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            outcome = Outcome(item.model, time.perf_counter() - start)
            outcomes.append(outcome)
            tasks.append(asyncio.create_task(_one(client, url.rstrip("/"), headers, item, start, outcome, greedy)))
        await asyncio.gather(*tasks)
        return outcomes, time.perf_counter() - start


def percentiles(values: list) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def at(q):
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "mean": statistics.fmean(ordered)}


def summarize(outcomes: list, seconds: float, slo: float) -> dict:
    ok = [o for o in outcomes if o.status == 200 and o.error is None and o.first is not None]
    ttft = [o.first - o.sent for o in ok]
    tpot = [(o.done - o.first) / (o.tokens - 1) for o in ok if o.tokens > 1]
    e2e = [o.done - o.sent for o in ok]
    tokens = sum(o.tokens for o in ok)
    errors = {}
    for o in outcomes:
        if o not in ok:
            kind = str(o.status) if o.status and o.status != 200 else (o.error or "no tokens").split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    return {"requests": len(outcomes), "completed": len(ok), "seconds": round(seconds, 3),
            "requests_per_second": len(ok) / seconds if seconds else 0.0,
            "output_tokens_per_second": tokens / seconds if seconds else 0.0, "output_tokens": tokens,
            "ttft": percentiles(ttft), "tpot": percentiles(tpot), "latency": percentiles(e2e),
            "slo_seconds": slo, "slo_attainment": sum(t <= slo for t in ttft) / len(outcomes) if outcomes else 0.0,
            "errors": errors}


def plot(outcomes: list, summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [o for o in outcomes if o.first is not None and o.error is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for values, label in (([o.first - o.sent for o in ok], "time to first token"), ([o.done - o.sent for o in ok], "latency")):
        if values:
            ordered = sorted(values)
            left.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    left.axvline(summary["slo_seconds"], color="grey", linestyle=":", label="SLO")
    left.set_xlabel("seconds")
    left.set_ylabel("share of requests")
    left.legend()
    left.set_title(f"{summary['completed']}/{summary['requests']} done, {summary['output_tokens_per_second']:.1f} tok/s")
    right.scatter([o.sent for o in ok], [o.first - o.sent for o in ok], s=8, label="TTFT")
    bad = [o for o in outcomes if o not in ok]
    if bad:
        right.scatter([o.sent for o in bad], [0] * len(bad), s=12, marker="x", color="red", label="error / refused")
    right.set_xlabel("sent at (s)")
    right.set_ylabel("time to first token (s)")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def add_parser(commands) -> None:
    load = commands.add_parser(
        "loadtest", help="S-LoRA's multi-adapter workload against an OpenAI-compatible server; JSON + PNG report",
        description="Send a seeded multi-adapter workload (power-law adapter popularity, Gamma arrivals) to an "
                    "OpenAI-compatible server and report throughput, TTFT, TPOT, latency percentiles and SLO attainment.")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the server (its /v1 API)")
    load.add_argument("--adapters", help="adapter names, comma-separated, most popular first; or a number N to take "
                                         "the first N adapters /v1/models lists (default: all of them)")
    load.add_argument("--base-share", type=float, default=0.0, help="share of requests for the base model")
    load.add_argument("--rate", type=float, default=2.0, help="requests per second (mean)")
    load.add_argument("--cv", type=float, default=1.0, help="coefficient of variation of arrival gaps (1 = Poisson)")
    load.add_argument("--alpha", type=float, default=1.0, help="power-law exponent of adapter popularity")
    load.add_argument("--requests", type=int, default=100)
    load.add_argument("--duration", type=float, help="instead of --requests: rate x duration requests")
    load.add_argument("--prompt-tokens", default="16,64", help="LOW,HIGH prompt length in tokens")
    load.add_argument("--output-tokens", default="16,64", help="LOW,HIGH output length in tokens")
    load.add_argument("--prompts", help="JSON lines with 'prompt' (and optional 'max_tokens') instead of generated ones")
    load.add_argument("--tokenizer", default="smollm2-135m",
                      help="tokenizer to size generated prompts exactly ('none': one word per token, roughly)")
    load.add_argument("--slo", type=float, default=1.0, help="time-to-first-token objective, seconds")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--api-key", help="Authorization: Bearer key")
    load.add_argument("--out", default="runs/loadtest", help="folder for result.json and result.png")
    load.add_argument("--label", default="result", help="file name stem of the report")
    load.set_defaults(func=run_loadtest)


def _range(text: str, flag: str) -> tuple:
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} takes LOW,HIGH (two integers), got {text!r}") from None
    return low, high


def server_models(url: str, api_key: str | None) -> list:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as error:
        raise ConfigError(f"cannot reach {url}: {error}; is the server running?") from None
    if response.status_code != 200:
        raise ConfigError(f"{url}/v1/models answered {response.status_code}: {response.text[:200]}")
    return response.json()["data"]


def run_loadtest(args) -> int:
    from . import require_serving_packages

    require_serving_packages()
    models = server_models(args.url, args.api_key)
    base = next((m["id"] for m in models if not m.get("parent")), None)
    served = [m["id"] for m in models if m.get("parent")]
    if args.adapters and not args.adapters.isdigit():
        adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    else:
        adapters = served[: int(args.adapters)] if args.adapters else served
    requests = max(1, round(args.rate * args.duration)) if args.duration else args.requests
    workload = Workload(adapters=adapters, rate=args.rate, cv=args.cv, alpha=args.alpha, requests=requests,
                        prompt_tokens=_range(args.prompt_tokens, "--prompt-tokens"),
                        output_tokens=_range(args.output_tokens, "--output-tokens"), base_share=args.base_share,
                        base_name=base, seed=args.seed, prompts_file=args.prompts)
    tokenizer = None
    if args.tokenizer and args.tokenizer != "none":
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    planned = plan(workload, tokenizer)
    print(f"loadtest: {len(planned)} requests over {len(adapters)} adapters at {args.rate}/s (cv {args.cv}) "
          f"against {args.url}", flush=True)
    outcomes, seconds = asyncio.run(run_load(args.url, planned, args.api_key))
    summary = summarize(outcomes, seconds, args.slo)
    report = {"workload": {**asdict(workload), "url": args.url}, "summary": summary,
              "requests": [asdict(o) for o in outcomes]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.label}.json").write_text(json.dumps(report, indent=1))
    plot(outcomes, summary, out / f"{args.label}.png")
    print(json.dumps(summary, indent=1))
    return 0 if not summary["errors"] else 1
