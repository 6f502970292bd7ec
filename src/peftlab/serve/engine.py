"""The serving engine: continuous batching of requests for many adapters on one base model.

One thread runs the loop; HTTP handlers ``submit`` requests and receive their tokens through
each request's ``on_event`` callback. Every iteration (Orca's iteration-level scheduling):

1. requests whose client went away are dropped, freeing their cache slot and adapter;
2. waiting requests join, first come first served, while the batch has room, their adapter
   can have a bank slot (``--max-loras`` distinct adapters at a time) and the step's prompt
   tokens stay within ``max_step_tokens``;
3. one forward pass runs the running requests' next tokens and the joining requests' whole
   prompts together (packed, no padding; running requests are never recomputed), whatever
   their adapters (the bank groups the tokens once for all layers), and every request samples
   its own next token;
4. finished requests (end of text, ``max_tokens``, a stop sequence) leave, and their cache slot
   and adapter reference are freed at once.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import PeftlabError


class QueueFull(PeftlabError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(PeftlabError):
    """The server is draining for shutdown and takes no new requests (HTTP 503)."""


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation. ``on_event(event)`` is called from the engine thread with
    ``{"text": piece}`` for new text and finally ``{"done": finish_reason, ...}`` or ``{"error": message}``."""

    adapter: str | None
    prompt_ids: list
    max_tokens: int
    on_event: object
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple = ()
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever they are (load tests)
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token: float | None = None
    output_ids: list = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    lora_slot: int = 0
    length: int = 0  # positions in the cache
    cached: int = 0  # prompt positions taken from the prefix cache
    cached_blocks: list = field(default_factory=list)
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        self.cancelled = True


class QueueingEngine:
    """What every engine behind the API shares: the bounded waiting queue, the loop's thread,
    and draining on stop. A subclass's ``_loop`` runs the requests."""

    def __init__(self, tokenizer, stop_ids, *, max_batch: int = 32, max_queue: int = 256, max_context: int = 2048,
                 metrics=None, base_name: str = "base"):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)
        self.max_batch, self.max_queue, self.max_context = max_batch, max_queue, max_context
        self.metrics, self.base_name = metrics, base_name
        self.queue = deque()
        self.running = []
        self.condition = threading.Condition()
        self.accepting, self.stopping = True, False
        self.thread = None
        self.external = False  # True: the owner calls run() in a thread of its own (peftlab serve: the main thread)
        self.looping = False

    def start(self) -> "QueueingEngine":
        """Run the loop in a new thread."""
        self.thread = threading.Thread(target=self.run, name=f"{type(self).__name__}-loop", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        """Run the loop in the calling thread until ``stop``. ``peftlab serve`` runs it in the main
        thread and the HTTP server beside it: torch's CPU kernels ran ~1.35x slower when the
        loop ran in a second thread (264 vs 195 tok/s on the same workload, in-process)."""
        self.looping = True
        try:
            self._loop()
        finally:
            self.looping = False

    def submit(self, request: Request) -> None:
        with self.condition:
            if not self.accepting:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            if request.seed is not None:
                request.generator = torch.Generator().manual_seed(request.seed)
            self.queue.append(request)
            self.condition.notify()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking requests, let the queued and running ones finish (up to ``timeout``
        seconds), then end the loop."""
        with self.condition:
            self.accepting = False
            self.condition.notify()
        deadline = time.perf_counter() + timeout
        while self.busy() and time.perf_counter() < deadline and self.looping:
            time.sleep(0.02)
        with self.condition:
            self.stopping = True
            self.condition.notify()
        if self.thread:
            self.thread.join(timeout=10)
        for request in list(self.queue) + self.running:  # what the deadline cut off
            if request.finish_reason is None:
                request.on_event({"error": "the server shut down before this request finished"})

    def busy(self) -> bool:
        with self.condition:
            return bool(self.queue or self.running)

    def load(self) -> dict:
        with self.condition:
            return {"waiting": len(self.queue), "running": len(self.running)}

    def _loop(self) -> None:
        raise NotImplementedError

    # ---- what every engine does with a new token --------------------------------------------

    def _first_token(self, request: Request) -> None:
        if request.first_token is None:
            request.first_token = time.perf_counter()
            if self.metrics:
                self.metrics.ttft.observe(request.first_token - request.arrived, adapter=request.adapter or self.base_name)

    def _next_token(self, request: Request, token: int) -> str | None:
        """Take ``token`` as ``request``'s next one and stream its text; the finish reason, if
        this token ends the request."""
        self._first_token(request)
        if token in self.stop_ids and not request.ignore_eos:
            return "stop"
        request.output_ids.append(token)
        reason = self._stream(request)
        if reason is None and (len(request.output_ids) >= request.max_tokens
                               or len(request.prompt_ids) + len(request.output_ids) >= self.max_context):
            reason = "length"
        return reason

    def _stream(self, request: Request) -> str | None:
        """Decode the request's text so far and send what is safe to send: text that cannot be the
        start of a stop sequence, and no half of a multi-byte character. Returns "stop" when a
        stop sequence appeared (the text is cut before it)."""
        text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        for stop in request.stop:
            at = text.find(stop, max(0, request.emitted - len(stop)))
            if at >= 0:
                request.text = text[:at]
                return "stop"
        request.text = text
        hold = max((len(s) - 1 for s in request.stop), default=0)
        safe = len(text) - hold
        while safe > request.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > request.emitted:
            request.on_event({"text": text[request.emitted:safe]})
            request.emitted = safe
        return None

    def _flush(self, request: Request) -> None:
        text = request.text.rstrip("\ufffd") if request.finish_reason != "stop" else request.text
        if len(text) > request.emitted:
            request.on_event({"text": text[request.emitted:]})
            request.emitted = len(text)
        request.on_event({"done": request.finish_reason, "prompt_tokens": len(request.prompt_ids),
                          "completion_tokens": len(request.output_ids)})

    def _count(self, request: Request, outcome: str) -> None:
        if not self.metrics:
            return
        label = request.adapter or self.base_name
        self.metrics.requests.inc(adapter=label, outcome=outcome)
        self.metrics.output_tokens.inc(len(request.output_ids), adapter=label)
        if outcome == "ok" and request.first_token is not None:
            now = time.perf_counter()
            self.metrics.e2e.observe(now - request.arrived, adapter=label)
            if len(request.output_ids) > 1:
                self.metrics.tpot.observe((now - request.first_token) / (len(request.output_ids) - 1), adapter=label)


class Engine(QueueingEngine):
    def __init__(self, runner, bank, tokenizer, stop_ids, max_step_tokens: int = 2048, prefix_cache=None, **options):
        super().__init__(tokenizer, stop_ids, **options)
        self.runner, self.bank = runner, bank
        self.max_step_tokens = max_step_tokens
        self.prefix = prefix_cache  # a PrefixCache, or None

    # ---- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not (self.queue or self.running or self.stopping):
                    self.condition.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a failed step fails its requests, never the server
                self._fail_all(f"{type(error).__name__}: {error}")

    def step(self) -> None:
        self._drop_cancelled()
        joining = self._admit()
        if self.running:
            logits = self._forward(joining)
            if logits is not None:
                self._advance(logits)
        if self.metrics:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.queue))

    def _drop_cancelled(self) -> None:
        with self.condition:
            for request in [r for r in self.queue if r.cancelled]:
                self.queue.remove(request)
                self._count(request, "cancelled")
        for i in reversed(range(len(self.running))):
            if self.running[i].cancelled:
                request = self.running[i]
                self._leave(i)
                self._count(request, "cancelled")

    def _admit(self) -> list:
        """Move waiting requests into the batch, first come first served, while the batch has
        room, the step's prompt tokens stay within ``max_step_tokens`` (the first one always
        joins) and the adapter can have a bank slot. Returns the joining requests."""
        joining, tokens = [], 0
        with self.condition:
            while self.queue and len(self.running) + len(joining) < self.max_batch:
                request = self.queue[0]
                if self.prefix is not None:
                    request.cached, request.cached_blocks = self.prefix.lookup(self.bank.key(request.adapter),
                                                                               request.prompt_ids)
                if joining and tokens + len(request.prompt_ids) - request.cached > self.max_step_tokens:
                    break
                try:
                    slot = self.bank.acquire(request.adapter)
                except KeyError:  # unloaded while it waited
                    self.queue.popleft()
                    request.on_event({"error": f"adapter {request.adapter!r} was unloaded"})
                    self._count(request, "error")
                    continue
                if slot is None:  # every adapter slot is held by running requests: wait, in order
                    break
                self.queue.popleft()
                request.lora_slot, request.admitted = slot, time.perf_counter()
                tokens += len(request.prompt_ids) - request.cached
                joining.append(request)
                if request.cached:
                    self.prefix.stats["hit_tokens"] += request.cached
        for request in joining if self.metrics else ():
            label = request.adapter or self.base_name
            self.metrics.queue_time.observe(request.admitted - request.arrived, adapter=label)
            self.metrics.prompt_tokens.inc(len(request.prompt_ids) - request.cached, adapter=label)
            if request.cached:
                self.metrics.prefix_hits.inc(request.cached, adapter=label)
        self.running.extend(joining)
        return joining

    def _forward(self, joining: list) -> torch.Tensor | None:
        """One forward pass: a decode step of the running requests and the prefill of the
        joining ones (the last ``len(joining)`` of ``running``), each token routed to its
        request's adapter; the next-token logits of every running request.

        If a pass with new prompts fails, the new requests leave with the error and the running
        ones go on (nothing of theirs advanced, so the next step redoes their token; if they were
        the cause, that step fails them too): None."""
        decoding = self.running[:len(self.running) - len(joining)]
        first = len(decoding)
        try:
            for j, r in enumerate(joining):
                if r.cached:  # the cached prefix goes into the slot; only the rest of the prompt is computed
                    self.runner.write(first + j, 0, torch.cat(r.cached_blocks, dim=3))
                r.cached_blocks = []
            rows = [r.lora_slot for r in decoding] + [r.lora_slot for r in joining for _ in r.prompt_ids[r.cached:]]
            self.bank.plan(rows)
            self.bank.set_rows(rows)
            logits = self.runner.step([r.output_ids[-1] for r in decoding], [r.length for r in decoding],
                                      [r.prompt_ids[r.cached:] for r in joining], [r.cached for r in joining])
        except Exception as error:
            if not joining:
                raise
            self._turn_away(len(decoding), error)
            return None
        for r in decoding:
            r.length += 1
        for j, r in enumerate(joining):
            r.length = len(r.prompt_ids)
            if self.prefix is not None:
                self.prefix.store(self.bank.key(r.adapter), r.prompt_ids, r.cached,
                                  lambda start, stop, slot=first + j: self.runner.read(slot, start, stop))
        return logits

    def _turn_away(self, first: int, error: Exception) -> None:
        """Take ``running[first:]`` out of the batch with ``error``."""
        for i in reversed(range(first, len(self.running))):
            request = self.running[i]
            self._leave(i)
            request.on_event({"error": f"{type(error).__name__}: {error}"})
            self._count(request, "error")

    def _advance(self, logits: torch.Tensor) -> None:
        """Sample one token for each running request (row i of ``logits``), stream it, and retire
        the requests that finished."""
        greedy = logits.argmax(-1).tolist()
        finished = []
        for i, request in enumerate(self.running):
            reason = self._next_token(request, greedy[i] if request.temperature == 0 else sample(logits[i], request))
            if reason:
                request.finish_reason = reason
                finished.append(i)
        for i in sorted(finished, reverse=True):
            request = self.running[i]
            self._leave(i)
            self._flush(request)
            self._count(request, "ok")

    def _leave(self, i: int) -> None:
        """Take running[i] out of the batch: the last running row moves into its cache slot."""
        request, last = self.running[i], len(self.running) - 1
        self.runner.release(i, last, self.running[last].length)
        self.running[i] = self.running[last]
        self.running.pop()
        self.bank.release(request.adapter)

    def _fail_all(self, message: str) -> None:
        for i in reversed(range(len(self.running))):
            request = self.running[i]
            try:
                self._leave(i)
            except Exception:
                self.running.pop(i)
            request.on_event({"error": message})
            self._count(request, "error")


def sample(logits: torch.Tensor, request: Request) -> int:
    """Temperature and nucleus (top-p; Holtzman et al., 2020) sampling, seeded per request."""
    probs = torch.softmax(logits.float() / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each
        sorted_probs[before >= request.top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=request.generator))
