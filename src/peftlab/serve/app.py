"""The HTTP API: OpenAI-compatible completions and chat completions over the engine.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models``, ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` (vLLM's names; only with ``--adapter-root``), ``GET /health`` and
``GET /metrics`` (Prometheus).

The request's ``model`` names the adapter; the base model's name runs the base. Errors use
OpenAI's shape (``{"error": {"message", "type", "code"}}``): 400 for bad input and limits, 401 for
a missing or wrong API key, 404 for a model the key cannot see (listing those it can), 429 with
``Retry-After`` when the queue is full, 503 while draining for shutdown.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import threading
import time
import uuid
import weakref
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import PeftlabError, StateError
from .engine import QueueFull, Request, ShuttingDown

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALL = "*"


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.headers, self.param = status, message, kind, headers, param


def error_response(error: ApiError) -> JSONResponse:
    body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


class Settings:
    """The server's limits and policy (the CLI fills it)."""

    def __init__(self, base_name: str, *, keys: dict | None = None, adapter_root: str | None = None,
                 max_prompt_tokens: int = 1024, max_tokens_limit: int = 512, default_max_tokens: int = 16,
                 drain_seconds: float = 60.0):
        self.base_name = base_name
        self.keys = keys  # None: no authentication; else {key: set of adapter names, or {"*"}}
        self.adapter_root = Path(adapter_root).resolve() if adapter_root else None
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.default_max_tokens, self.drain_seconds = default_max_tokens, drain_seconds


def create_app(engine, settings: Settings, metrics) -> FastAPI:
    bank, tokenizer = engine.bank, engine.tokenizer

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine.thread is None and not engine.external:
            engine.start()
        yield
        await asyncio.to_thread(engine.stop, settings.drain_seconds)  # finish what is queued and running

    app = FastAPI(title="peftlab serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def _api_error(request, error: ApiError):
        return error_response(error)

    # ---- access ----------------------------------------------------------------------------

    def scope(http: HttpRequest):
        """The adapters the caller's key may use (None: every one)."""
        if settings.keys is None:
            return None
        header = http.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if key not in settings.keys:
            raise ApiError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'", "authentication_error")
        allowed = settings.keys[key]
        return None if ALL in allowed else allowed

    def visible(allowed) -> list:
        names = [settings.base_name] + bank.names()
        return [n for n in names if allowed is None or n in allowed or n == settings.base_name]

    def resolve_model(name, allowed) -> str | None:
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required: the base model's name or an adapter's", param="model")
        if name == settings.base_name:
            return None
        if name not in bank.names() or (allowed is not None and name not in allowed):
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(visible(allowed))}",
                           "not_found_error", param="model")
        return name

    # ---- reading requests ------------------------------------------------------------------

    async def body_of(http: HttpRequest) -> dict:
        try:
            body = json.loads(await http.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def number(body, key, default, low, high, kind=float):
        value = default if body.get(key) is None else body[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ApiError(400, f"'{key}' must be a {'whole ' if kind is int else ''}number", param=key)
        if not low <= value <= high:
            raise ApiError(400, f"'{key}' must be between {low} and {high}, got {value}", param=key)
        return kind(value)

    def make_request(body, adapter, prompt_ids, on_event) -> Request:
        if len(prompt_ids) == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; this server takes at most "
                                f"{settings.max_prompt_tokens} (--max-prompt-tokens)", param="prompt")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(body, key, settings.default_max_tokens, 1, 1 << 30, int)
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"'{key}' is {max_tokens}; this server generates at most {settings.max_tokens_limit} "
                                "tokens per request (--max-tokens-limit)", param=key)
        if len(prompt_ids) + max_tokens > engine.max_context:
            raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) + {key} ({max_tokens}) exceeds the context of "
                                f"{engine.max_context} tokens", param=key)
        if body.get("n", 1) not in (1, None):
            raise ApiError(400, "only n=1 is supported", param="n")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, "'seed' must be an integer", param="seed")
        return Request(adapter=adapter, prompt_ids=prompt_ids, max_tokens=max_tokens, on_event=on_event,
                       temperature=number(body, "temperature", 1.0, 0.0, 2.0), top_p=number(body, "top_p", 1.0, 1e-6, 1.0),
                       stop=tuple(stop), seed=seed, ignore_eos=bool(body.get("ignore_eos", False)))

    def encode(text: str) -> list:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    async def run(http, body, adapter, prompt_ids, shape):
        """Submit and answer, streamed or whole; ``shape`` builds the response objects."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request = make_request(body, adapter, prompt_ids, relay(loop, events))
        try:
            engine.submit(request)
        except QueueFull as error:
            metrics.rejected.inc(reason="queue_full")
            raise ApiError(429, f"{error}; retry later", "rate_limit_error", headers={"Retry-After": "1"}) from None
        except ShuttingDown as error:
            metrics.rejected.inc(reason="shutting_down")
            raise ApiError(503, str(error), "server_error") from None
        ident, created, model = f"{shape.prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), body["model"]
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream(request, events, shape, ident, created, model, include_usage),
                                     media_type="text/event-stream")
        pieces = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return PlainTextResponse("", status_code=499)
                    continue
                if "text" in event:
                    pieces.append(event["text"])
                elif "error" in event:
                    raise ApiError(500, event["error"], "server_error")
                else:
                    return JSONResponse(shape.whole(ident, created, model, "".join(pieces), event))
        except asyncio.CancelledError:
            request.cancel()
            raise

    async def stream(request, events, shape, ident, created, model, include_usage):
        try:
            first = True
            while True:
                event = await events.get()
                if "text" in event:
                    yield sse(shape.chunk(ident, created, model, event["text"], None, first))
                    first = False
                elif "error" in event:
                    yield sse({"error": {"message": event["error"], "type": "server_error", "code": 500}})
                    break
                else:
                    yield sse(shape.chunk(ident, created, model, "", event["done"], first))
                    if include_usage:
                        yield sse({"id": ident, "object": shape.chunk_object, "created": created, "model": model,
                                   "choices": [], "usage": usage(event)})
                    break
            yield "data: [DONE]\n\n"
        finally:
            if request.finish_reason is None:
                request.cancel()  # the client went away: free the batch row

    # ---- endpoints -------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        allowed = scope(http)
        body = await body_of(http)
        adapter = resolve_model(body.get("model"), allowed)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            if max(ids) >= len(tokenizer) or min(ids) < 0:
                raise ApiError(400, "'prompt' holds token ids outside the vocabulary", param="prompt")
        else:
            raise ApiError(400, "'prompt' must be a string (or one list of token ids); send one prompt per request",
                           param="prompt")
        return await run(http, body, adapter, ids, COMPLETION)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        allowed = scope(http)
        body = await body_of(http)
        adapter = resolve_model(body.get("model"), allowed)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with text content",
                           param="messages")
        try:
            text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                 tokenize=False, add_generation_prompt=True)
        except Exception as error:
            raise ApiError(400, f"the messages do not fit the model's chat template: {error}", param="messages") from None
        return await run(http, body, adapter, encode(text), CHAT)

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        allowed = scope(http)
        created = int(time.time())
        data = [{"id": settings.base_name, "object": "model", "created": created, "owned_by": "peftlab",
                 "root": settings.base_name, "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "peftlab", "root": n,
                  "parent": settings.base_name} for n in visible(allowed) if n != settings.base_name]
        return {"object": "list", "data": data}

    def runtime_loading(http) -> None:
        allowed = scope(http)
        if settings.adapter_root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapter-root DIR to "
                                "allow loading adapters from under DIR", "permission_error")
        if allowed is not None:
            raise ApiError(403, "this API key may not load or unload adapters (it needs access to '*')", "permission_error")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(http: HttpRequest):
        runtime_loading(http)
        body = await body_of(http)
        name, path = body.get("lora_name"), body.get("lora_path")
        check_name(name, settings.base_name)
        folder = inside_root(path, settings.adapter_root)
        try:
            await asyncio.to_thread(bank.register, name, folder)
        except PeftlabError as error:
            raise ApiError(400, str(error), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(http: HttpRequest):
        runtime_loading(http)
        body = await body_of(http)
        name = body.get("lora_name")
        try:
            bank.unregister(name)
        except KeyError:
            raise ApiError(404, f"no adapter named {name!r} is loaded", "not_found_error", param="lora_name") from None
        except StateError as error:
            raise ApiError(409, str(error), "conflict_error", param="lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/health")
    async def health():
        if not engine.accepting:
            raise ApiError(503, "shutting down", "server_error")
        return {"status": "ok", **engine.load()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(bank, getattr(engine, "prefix", None)), media_type="text/plain; version=0.0.4")

    return app


class _Relay:
    """Hands engine events to the HTTP loop with one wake-up per batch of events, not one per
    token: a step of 32 rows makes 32 events, and each ``call_soon_threadsafe`` writes to the
    loop's wake-up pipe."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def send(self, queue, event) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, event in pending:
            queue.put_nowait(event)


_relays = weakref.WeakKeyDictionary()  # one relay per event loop


def relay(loop, queue):
    """The on_event callback of a request whose answer goes to ``queue`` on ``loop``."""
    hub = _relays.get(loop)
    if hub is None:
        hub = _relays[loop] = _Relay(loop)
    return lambda event: hub.send(queue, event)


def check_name(name, base_name: str) -> None:
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(400, "'lora_name' must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                       param="lora_name")
    if name == base_name:
        raise ApiError(400, f"'lora_name' {name!r} is the base model's name", param="lora_name")


def inside_root(path, root: Path) -> Path:
    """The adapter folder ``path`` (relative to ``root`` or absolute), refused unless it lies
    under ``root`` after resolving links, and holds safetensors weights."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ApiError(400, "'lora_path' must be a folder under the server's adapter root", param="lora_path")
    folder = (root / path).resolve()
    if folder != root and root not in folder.parents:
        raise ApiError(400, "'lora_path' is outside the server's adapter root; adapters load only from under it",
                       param="lora_path")
    if not folder.is_dir():
        raise ApiError(400, f"'lora_path' {path!r} is not a folder under the adapter root", param="lora_path")
    if not (folder / "adapter_model.safetensors").is_file():
        raise ApiError(400, f"'lora_path' {path!r} has no adapter_model.safetensors (only safetensors adapters load)",
                       param="lora_path")
    return folder


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def usage(event: dict) -> dict:
    return {"prompt_tokens": event["prompt_tokens"], "completion_tokens": event["completion_tokens"],
            "total_tokens": event["prompt_tokens"] + event["completion_tokens"]}


class _Completion:
    prefix, chunk_object = "cmpl", "text_completion"

    def whole(self, ident, created, model, text, event):
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": event["done"], "logprobs": None}],
                "usage": usage(event)}

    def chunk(self, ident, created, model, text, finish, first):
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}


class _Chat:
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def whole(self, ident, created, model, text, event):
        return {"id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": event["done"], "logprobs": None}],
                "usage": usage(event)}

    def chunk(self, ident, created, model, text, finish, first):
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


COMPLETION, CHAT = _Completion(), _Chat()


def read_keys(path=None, key=None) -> dict | None:
    """API keys: ``--api-key KEY`` (every adapter) and/or a keys file, JSON or YAML
    ``{key: [adapter names] or "*"}``. None when neither is given (no authentication)."""
    keys = {}
    if key:
        keys[key] = {ALL}
    if path:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(k, str) and k for k in data):
            raise PeftlabError(f"{path}: the keys file maps each API key to a list of adapter names (or \"*\")")
        for k, names in data.items():
            names = [names] if isinstance(names, str) else names
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise PeftlabError(f"{path}: key {k[:4]}...: give a list of adapter names or \"*\"")
            keys[k] = set(names)
    env = os.environ.get("PEFTLAB_API_KEY")
    if env and env not in keys:
        keys[env] = {ALL}
    return keys or None
