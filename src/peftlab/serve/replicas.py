"""Replicas on Ray Serve: ``peftlab serve --ray --replicas N [--address ADDR]``.

Where it sits: one process of ``peftlab serve`` is one engine (``engine.py``) behind the HTTP API
(``app.py``). Past one machine, Ray Serve does the engine work: it places N replica actors, each
running the same engine on its own copy of the base, restarts one that dies, and routes each
request to a replica. This module holds only the peftlab-specific glue:

- ``EngineReplica``, the deployment: ``build_engine`` in the replica's process, the engine's loop
  in a thread, and ``generate`` streaming one request's events back.
- Adapter affinity through Ray Serve's model multiplexing: a request's adapter is its multiplexed
  model id, so Ray's router sends it to a replica that already holds the adapter while that
  replica has room (``max_ongoing_requests`` = the engine's ``--max-batch``), and to another one
  otherwise, which then loads it (S-LoRA's and dLoRA's placement of adapters on replicas, done
  by the engine that already exists for it). A model id is the adapter's name and its
  registration (``name#n``), so an adapter unloaded and loaded again under its old name is never
  served from a stale copy.
- The ingress: the same FastAPI app as a single server (``create_app``: OpenAI-compatible
  routes, keys, limits, streaming), over ``RayEngine``, which forwards each request to a replica
  instead of running it.
- Losing a replica: a request whose replica died before it sent any text runs again on another
  replica (at most ``RETRIES`` times), so queued and starting requests are not lost; a request
  that had already streamed text ends with an error that says so, since its text cannot be
  taken back.

Ray is optional (``pip install 'peftlab[dist]'``) and imported only here.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import ConfigError, StateError
from .engine import QueueFull, QueueingEngine, Request, ShuttingDown

ENGINE_APP, INGRESS_APP = "peftlab-engine", "peftlab"
REPLICA = "EngineReplica"
RETRIES = 2  # runs of a request whose replica died before it sent any text


class AdapterDirectory:
    """The ingress's adapters: name -> folder, and the registration that makes a model id. What
    ``create_app`` asks of a bank (``names``, ``register``, ``unregister``, ``residency``); the
    replicas hold the weights. ``check(name, folder)`` reads a new adapter on a replica (it raises
    what ``LoraBank.register`` would)."""

    def __init__(self, adapters: dict, check=None):
        self.folders = {name: str(folder) for name, folder in adapters.items()}
        self.generation = dict.fromkeys(adapters, 0)  # adapters given at start are registration 0 on every replica
        self.counter = itertools.count(1)
        self.in_use = Counter()
        self.check = check
        self.lock = threading.Lock()

    def names(self) -> list:
        with self.lock:
            return list(self.folders)

    def register(self, name: str, folder) -> None:
        if self.check is not None:
            self.check(name, str(folder))
        with self.lock:
            if name in self.folders:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            self.folders[name], self.generation[name] = str(folder), next(self.counter)

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.folders:
                raise KeyError(name)
            if self.in_use[name]:
                raise StateError(f"adapter {name!r} is in use by {self.in_use[name]} running request(s); unload it when "
                                 "they finish")
            del self.folders[name], self.generation[name]

    def model_id(self, name: str) -> str:
        return f"{name}#{self.generation[name]}"

    def residency(self) -> dict:
        with self.lock:
            return {"registered": len(self.folders), "in_use": sum(1 for v in self.in_use.values() if v)}


class RayEngine(QueueingEngine):
    """The engine ``create_app`` drives in the ingress: ``submit`` hands each request to a replica
    (a task on the HTTP loop streaming its events) instead of queueing it here. ``--max-queue``
    bounds the requests in flight through this ingress; Ray's router holds those waiting for a
    replica with room."""

    def __init__(self, handle, directory: AdapterDirectory, tokenizer, *, max_queue: int, max_context: int, metrics,
                 base_name: str):
        super().__init__(tokenizer, (), max_queue=max_queue, max_context=max_context, metrics=metrics,
                         base_name=base_name)
        self.handle, self.bank = handle, directory
        self.in_flight = set()
        self.routed = defaultdict(Counter)  # adapter -> replica -> requests

    def start(self) -> "RayEngine":
        return self  # nothing runs here: each request is a task on the HTTP server's loop

    def submit(self, request: Request) -> None:
        with self.condition:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self.in_flight) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests in flight)")
            self.in_flight.add(request)
            if request.adapter:
                with self.bank.lock:
                    self.bank.in_use[request.adapter] += 1
        asyncio.get_running_loop().create_task(self._dispatch(request))

    def busy(self) -> bool:
        with self.condition:
            return bool(self.in_flight)

    def stop(self, timeout: float = 60.0) -> None:
        """Take no new requests and wait (up to ``timeout`` seconds) for those in flight."""
        with self.condition:
            self.accepting = False
        deadline = time.perf_counter() + timeout
        while self.busy() and time.perf_counter() < deadline:
            time.sleep(0.02)

    def load(self) -> dict:
        with self.condition:
            return {"running": len(self.in_flight), "routed": {a: dict(r) for a, r in self.routed.items()}}

    async def _dispatch(self, request: Request) -> None:
        label = request.adapter or self.base_name
        spec = {"prompt_ids": request.prompt_ids, "max_tokens": request.max_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "stop": list(request.stop), "seed": request.seed,
                "ignore_eos": request.ignore_eos}
        model_id = ""
        if request.adapter:
            with self.bank.lock:
                model_id, spec["folder"] = self.bank.model_id(request.adapter), self.bank.folders[request.adapter]
        outcome, done = "error", None
        try:
            for attempt in range(RETRIES + 1):
                sent = 0
                call = self.handle.options(multiplexed_model_id=model_id, stream=True).generate.remote(spec)
                try:
                    async for event in call:
                        if request.cancelled:
                            call.cancel()
                            outcome = "cancelled"
                            return
                        if "replica" in event:
                            self.routed[label][event["replica"]] += 1
                            continue
                        if "text" in event:
                            sent += 1
                            self._first_token(request)
                        request.on_event(event)
                        if "done" in event:
                            outcome, done = "ok", event
                        if "done" in event or "error" in event:
                            return
                    raise ConnectionError("the replica's stream ended before the request finished")
                except Exception as error:  # a replica that died, or Ray losing the call
                    if sent or attempt == RETRIES or not _lost_replica(error):
                        said = (f"after {sent} streamed piece(s) of text, which cannot be taken back; send the request "
                                "again" if sent else "; send the request again")
                        request.on_event({"error": f"the replica running this request stopped "
                                                   f"({type(error).__name__}) {said}"})
                        return
        finally:
            with self.condition:
                self.in_flight.discard(request)
            if request.adapter:
                with self.bank.lock:
                    self.bank.in_use[request.adapter] -= 1
            self._record(request, label, outcome, done)

    def _record(self, request: Request, label: str, outcome: str, done: dict | None) -> None:
        if not self.metrics:
            return
        self.metrics.requests.inc(adapter=label, outcome=outcome)
        if done is not None:
            tokens, now = done["completion_tokens"], time.perf_counter()
            self.metrics.output_tokens.inc(tokens, adapter=label)
            self.metrics.prompt_tokens.inc(done["prompt_tokens"], adapter=label)
            self.metrics.e2e.observe(now - request.arrived, adapter=label)
            if tokens > 1 and request.first_token is not None:
                self.metrics.tpot.observe((now - request.first_token) / (tokens - 1), adapter=label)


def _lost_replica(error: Exception) -> bool:
    """Whether ``error`` says the replica (or the stream from it) went away, rather than that the
    request itself failed there."""
    import ray.exceptions as failures

    return isinstance(error, (failures.RayActorError, failures.ActorUnavailableError, ConnectionError))


class EngineReplica:
    """One replica: peftlab's engine on its own copy of the base, its loop in a thread."""

    def __init__(self, base: str, adapters: dict, options: dict):
        from ray import serve

        from . import build_engine
        from .app import relay

        self.relay = relay
        self.engine = build_engine(base, {}, **options)
        for name, folder in adapters.items():  # registration 0: read and checked once, here
            self.engine.bank.register(f"{name}#0", folder)
        self.engine.start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self.folders = {}

        async def holding(model_id: str):
            return await self._hold(model_id)

        # the ids this replica reports as loaded, which Ray's router prefers for their requests
        self.load_adapter = serve.multiplexed(max_num_models_per_replica=max(1, options.get("max_cpu_loras", 64)))(holding)

    async def describe(self) -> dict:
        return {"max_context": self.engine.max_context, "base_name": self.engine.base_name}

    async def check(self, name: str, folder: str) -> str | None:
        """Read and check the adapter in ``folder`` as ``register`` would: what is wrong, or None."""
        from ..errors import PeftlabError
        from .lora_bank import read_lora

        bank = self.engine.bank
        try:
            read_lora(name, folder, bank.shapes, bank.max_rank, bank.base_fingerprint)
        except PeftlabError as error:
            return str(error)
        return None

    async def _hold(self, model_id: str) -> "_Held":
        bank = self.engine.bank
        if model_id not in bank.names():
            await asyncio.to_thread(bank.register, model_id, self.folders[model_id])
        return _Held(bank, model_id)

    async def generate(self, spec: dict):
        """Run one request here; yields ``{"replica": id}``, then the engine's events."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        if model_id:
            self.folders[model_id] = spec.pop("folder")
            await self.load_adapter(model_id)
        spec.pop("folder", None)
        events = asyncio.Queue()
        request = Request(adapter=model_id or None, on_event=self.relay(asyncio.get_running_loop(), events),
                          **{**spec, "stop": tuple(spec["stop"])})
        yield {"replica": self.id}
        try:
            self.engine.submit(request)
        except (QueueFull, ShuttingDown) as error:
            yield {"error": str(error)}
            return
        try:
            while True:
                event = await events.get()
                yield event
                if "done" in event or "error" in event:
                    return
        finally:
            if request.finish_reason is None:
                request.cancel()  # the caller went away: free the row

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=5)


class _Held:
    """An adapter Ray's multiplexing counts as loaded on this replica; when Ray lets it go (its
    least recently used first), the bank forgets it unless a running request still holds it (the
    bank's own CPU cache bounds the weights kept either way)."""

    def __init__(self, bank, model_id: str):
        self.bank, self.model_id, self.released = bank, model_id, False

    def __del__(self):
        if self.released:
            return
        self.released = True
        try:
            self.bank.unregister(self.model_id)
        except (KeyError, StateError):
            pass


def deploy(base: str, adapters: dict, *, replicas: int = 2, address: str | None = None, host: str = "127.0.0.1",
           port: int = 8000, replica_cpus: float = 1, keys: dict | None = None, adapter_root: str | None = None,
           max_prompt_tokens: int = 1024, max_tokens_limit: int = 512, drain_seconds: float = 60.0, **engine) -> str:
    """Start ``replicas`` engines and the ingress on Ray Serve (joining the Ray at ``address``, or a
    local one); the API's URL. Every replica reads and checks ``adapters`` (``{name: folder}``)
    before the API opens, so a bad adapter fails here."""
    from ..dist.cluster import connect
    from .app import ApiError, check_name

    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ConfigError(f"--replicas must be a positive integer, got {replicas!r}")
    for name in adapters:
        try:
            check_name(name, "")
        except ApiError as error:
            raise ConfigError(f"--adapter {name}: {error.message.replace(chr(39) + 'lora_name' + chr(39), 'the name')}") from None
    adapters = {name: str(Path(folder).resolve()) for name, folder in adapters.items()}  # replicas run elsewhere
    if Path(base).exists():
        base = str(Path(base).resolve())
    connect(address)
    try:
        from ray import serve
    except ImportError:
        raise ConfigError("Ray Serve is not installed: pip install 'peftlab[dist]'") from None
    serve.start(http_options={"host": host, "port": port})
    max_batch, max_queue = engine.get("max_batch", 32), engine.get("max_queue", 256)
    options = dict(engine, max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit)
    replica = serve.deployment(EngineReplica, name=REPLICA, num_replicas=replicas, max_ongoing_requests=max_batch,
                               ray_actor_options={"num_cpus": replica_cpus})
    serve.run(replica.bind(base, adapters, options), name=ENGINE_APP, route_prefix=None)
    described = serve.get_deployment_handle(REPLICA, app_name=ENGINE_APP).describe.remote().result()

    def build_app():  # runs in the ingress replica
        from ray import serve

        from ..models import load_tokenizer
        from .app import Settings, create_app
        from .metrics import ServerMetrics

        handle = serve.get_deployment_handle(REPLICA, app_name=ENGINE_APP)

        def check(name, folder):
            problem = handle.check.remote(name, folder).result()
            if problem:
                raise ConfigError(problem)

        tokenizer = load_tokenizer(base)
        directory = AdapterDirectory(adapters, check)
        metrics = ServerMetrics()
        server = RayEngine(handle, directory, tokenizer, max_queue=max_queue, max_context=described["max_context"],
                           metrics=metrics, base_name=described["base_name"])
        settings = Settings(described["base_name"], keys=keys, adapter_root=adapter_root,
                            max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                            drain_seconds=drain_seconds)
        return create_app(server, settings, metrics)

    ingress = serve.deployment(serve.ingress(build_app)(), name="Ingress", max_ongoing_requests=max_queue + 64,
                               ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(), name=INGRESS_APP, route_prefix="/")
    return f"http://{host}:{port}"
