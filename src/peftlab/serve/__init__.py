"""``peftlab serve``: one base model, many LoRA adapters, mixed in every batch, behind an
OpenAI-compatible HTTP API; and ``peftlab loadtest`` to measure it (or any OpenAI-compatible server).

    peftlab serve --base smollm2 --adapter sql=runs/sql --adapter json=runs/json --port 8000
    curl localhost:8000/v1/completions -d '{"model": "sql", "prompt": "...", "max_tokens": 32}'
    peftlab loadtest --url http://localhost:8000 --adapters 16 --rate 4 --duration 60

Pieces: ``runner.py`` (the decoder, stepped with a per-sequence KV cache), ``lora_bank.py``
(adapter slots, the CPU cache, the mixed-batch LoRA delta), ``engine.py`` (continuous batching),
``app.py`` (the HTTP API), ``metrics.py`` (Prometheus), ``loadtest.py`` (the load generator).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def build_server(base: str, adapters: dict, *, keys: dict | None = None, adapter_root: str | None = None,
                 max_prompt_tokens: int = 1024, max_tokens_limit: int = 512, drain_seconds: float = 60.0, **engine):
    """(app, engine): the FastAPI app and its engine (``build_engine``, started by the app's
    lifespan), with the API's keys and limits."""
    from .app import Settings, create_app

    server = build_engine(base, adapters, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit, **engine)
    settings = Settings(server.base_name, keys=keys, adapter_root=adapter_root, max_prompt_tokens=max_prompt_tokens,
                        max_tokens_limit=max_tokens_limit, drain_seconds=drain_seconds)
    return create_app(server, settings, server.metrics), server


def build_engine(base: str, adapters: dict, *, max_loras: int = 16, max_cpu_loras: int = 64, max_lora_rank: int = 16,
                 max_batch: int = 32, max_step_tokens: int = 2048, max_queue: int = 256, max_prompt_tokens: int = 1024,
                 max_tokens_limit: int = 512, device: str = "cpu", model=None, tokenizer=None, engine: str = "peftlab",
                 quantize: str | None = None, merge_share: float = 0.6, prefix_cache_tokens: int = 2048):
    """The engine, not started, with ``adapters`` (``{name: folder}``) registered and checked up
    front. ``engine`` is peftlab's continuous-batching engine, or a baseline over HF PEFT
    (``peft-mixed``, ``peft-swap``; ``baselines.py``) behind the same API, for ``peftlab loadtest``
    to compare. ``quantize`` (nf4, fp4, int8, int4) stores the decoder's linear layers so (QLoRA's
    base); adapters are checked against the full-precision base they were trained on."""
    from ..formats.io import fingerprint
    from ..models import load_model
    from ..tasks.generation import stop_token_ids
    from .app import ApiError, check_name
    from .engine import Engine
    from .lora_bank import LoraBank
    from .metrics import ServerMetrics
    from .prefix_cache import PrefixCache
    from .runner import DecoderRunner

    for flag, value in (("max-batch", max_batch), ("max-step-tokens", max_step_tokens), ("max-queue", max_queue),
                        ("max-prompt-tokens", max_prompt_tokens), ("max-tokens-limit", max_tokens_limit)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"--{flag} must be a positive integer, got {value!r}")
    if model is None:
        model, tokenizer = load_model(base, device=device)
    base_fingerprint = fingerprint(model)  # of the weights the adapters were trained on, before any quantization
    if quantize is not None:
        from ..quant import FORMATS, quantize as quantize_model

        if quantize not in FORMATS:
            raise ConfigError(f"--quantize must be one of {', '.join(FORMATS)}, got {quantize!r}")
        quantize_model(model, quantize)
    base_name = Path(base).name if Path(base).exists() else base
    for name in adapters:
        try:
            check_name(name, base_name)
        except ApiError as error:
            raise ConfigError(f"--adapter {name}: {error.message.replace(chr(39) + 'lora_name' + chr(39), 'the name')}") from None
    context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    metrics = ServerMetrics()
    stop_ids = stop_token_ids(model, tokenizer)
    if engine != "peftlab":
        from .baselines import PeftAdapters, StaticBatchEngine

        bank = PeftAdapters(model)
        for name, folder in adapters.items():
            bank.register(name, folder)
        server = StaticBatchEngine(bank, tokenizer, stop_ids, engine, max_batch=max_batch, max_queue=max_queue,
                                   max_context=context, metrics=metrics, base_name=base_name)
    else:
        bank = LoraBank(model, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_rank=max_lora_rank,
                        base_fingerprint=base_fingerprint, merge_share=merge_share)
        for name, folder in adapters.items():
            bank.register(name, folder)
        runner = DecoderRunner(model, max_sequences=max_batch, capacity=min(256, context))
        prefix = PrefixCache(max_tokens=prefix_cache_tokens) if prefix_cache_tokens else None
        server = Engine(runner, bank, tokenizer, stop_ids, max_batch=max_batch, max_step_tokens=max_step_tokens,
                        max_queue=max_queue, max_context=context, metrics=metrics, base_name=base_name,
                        prefix_cache=prefix)
    return server


def require_serving_packages() -> None:
    import importlib.util

    missing = [p for p in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"serving needs {', '.join(missing)}: pip install 'peftlab[serve]'")


def add_parsers(commands) -> None:
    serve = commands.add_parser(
        "serve", help="serve a base model and many LoRA adapters behind an OpenAI-compatible API",
        description="Serve one base model with many LoRA adapters, mixed in every batch (continuous batching). "
                    "The request's 'model' names the adapter; the base model's name means no adapter.")
    serve.add_argument("--base", default="smollm2-135m", help="base model: a built-in name, a folder or a hub name")
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to serve; repeatable")
    serve.add_argument("--adapter-root", help="allow POST /v1/load_lora_adapter, for folders under this one only")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-loras", type=int, default=16, help="distinct adapters in one batch (resident slots)")
    serve.add_argument("--max-cpu-loras", type=int, default=64, help="adapters kept in memory; the rest load from disk")
    serve.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted")
    serve.add_argument("--max-batch", type=int, default=32, help="requests in the running batch")
    serve.add_argument("--max-step-tokens", type=int, default=2048,
                       help="prompt tokens prefilled in one step, beside the running requests' next tokens")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    serve.add_argument("--max-prompt-tokens", type=int, default=1024)
    serve.add_argument("--max-tokens-limit", type=int, default=512, help="the largest max_tokens a request may ask")
    serve.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) for every adapter; "
                                         "or set PEFTLAB_API_KEY")
    serve.add_argument("--api-keys", metavar="FILE", help="JSON/YAML file mapping each key to the adapters it may use")
    serve.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--prefix-cache-tokens", type=int, default=2048,
                       help="prompt positions whose keys and values are kept for requests that start alike (0: none)")
    serve.add_argument("--merge-share", type=float, default=0.6,
                       help="merge an adapter into the base while it holds this share of the batch's tokens (dLoRA); "
                            "above 1: never")
    serve.add_argument("--quantize", choices=("nf4", "fp4", "int8", "int4"),
                       help="serve on a quantized base: the decoder's linear layers in this format (the head stays fp32)")
    serve.add_argument("--engine", default="peftlab", choices=("peftlab", "peft-mixed", "peft-swap"),
                       help="peftlab's continuous batching, or a static-batch HF PEFT baseline (for loadtest)")
    serve.add_argument("--ray", action="store_true",
                       help="run the engine as replicas on Ray Serve (requests go to a replica holding their adapter)")
    serve.add_argument("--replicas", type=int, default=2, help="with --ray: how many engines")
    serve.add_argument("--address", help="with --ray: the Ray cluster to join (default: RAY_ADDRESS, or a local Ray)")
    serve.add_argument("--replica-cpus", type=float, default=1, help="with --ray: CPUs Ray reserves for each replica")
    serve.set_defaults(func=run_serve)

    from .loadtest import add_parser as add_loadtest_parser
    add_loadtest_parser(commands)


def run_serve(args) -> int:
    import torch

    require_serving_packages()
    import uvicorn

    from .app import read_keys

    if args.threads:
        torch.set_num_threads(args.threads)
    from ..cli import named_values

    adapters = named_values(args.adapter, "--adapter", "DIR")
    options = dict(max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
                   max_batch=args.max_batch, max_step_tokens=args.max_step_tokens, max_queue=args.max_queue,
                   max_prompt_tokens=args.max_prompt_tokens, max_tokens_limit=args.max_tokens_limit,
                   keys=read_keys(args.api_keys, args.api_key), adapter_root=args.adapter_root, device=args.device,
                   quantize=args.quantize, merge_share=args.merge_share, prefix_cache_tokens=args.prefix_cache_tokens)
    if args.ray:
        return serve_on_ray(args, adapters, options)
    app, engine = build_server(args.base, adapters, engine=args.engine, **options)
    serve_in_main_thread(app, engine, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                                    log_level="warning", timeout_graceful_shutdown=60)))
    return 0


def serve_on_ray(args, adapters: dict, options: dict) -> int:
    """``--ray``: the replicas and the ingress on Ray Serve, until SIGINT / SIGTERM."""
    import signal
    import threading

    from .replicas import deploy

    if args.engine != "peftlab":
        raise ConfigError(f"--ray runs peftlab's engine; --engine {args.engine} is a single-process baseline")
    url = deploy(args.base, adapters, replicas=args.replicas, address=args.address, host=args.host, port=args.port,
                 replica_cpus=args.replica_cpus, **options)
    print(f"serving on {url}/v1 ({args.replicas} replicas on Ray Serve)", flush=True)
    stop = threading.Event()
    for sign in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sign, lambda *_: stop.set())
    stop.wait()
    from ray import serve

    serve.shutdown()
    return 0


def serve_in_main_thread(app, engine, server) -> None:
    """The engine's loop in this (main) thread, uvicorn in a second one: the loop's torch kernels
    run faster in the main thread (``QueueingEngine.run``). SIGINT / SIGTERM shut uvicorn down,
    whose shutdown drains and stops the engine; if uvicorn ends any other way (say, the port is
    taken), the engine stops too."""
    import signal
    import threading

    def http():
        try:
            server.run()
        finally:
            engine.stop(timeout=0)

    def shut_down(signum, frame):
        server.should_exit = True

    engine.external = True
    thread = threading.Thread(target=http, name="http", daemon=True)
    signal.signal(signal.SIGINT, shut_down)
    signal.signal(signal.SIGTERM, shut_down)
    thread.start()
    config = server.config
    print(f"serving on http://{config.host}:{config.port}/v1", flush=True)
    engine.run()
    thread.join(timeout=30)
