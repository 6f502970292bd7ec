"""The baselines ``peftlab loadtest`` measures the engine against, behind the same HTTP API.

Both run HF PEFT's own multi-adapter inference the way a simple server would, with static
batches in arrival order (FIFO): a batch is formed from the queue, generated to the end of its
longest request, and only then is the next batch formed.

- ``peft-mixed``: up to ``max_batch`` requests of any adapters in one batch, through
  ``generate(adapter_names=[...])`` (PEFT's mixed-adapter batches).
- ``peft-swap``: the batch takes the first waiting request's adapter and the waiting requests
  of that same adapter; ``set_adapter`` switches between batches.

Tokens stream as ``generate`` produces them (a stopping criterion sees each step), so time to
first token is measured fairly; a request that reached its length waits, finished, for its batch.
"""
from __future__ import annotations

import threading
import time
from collections import deque

import torch

from ..errors import ConfigError, StateError
from .engine import QueueingEngine

BASE = "__base__"  # PEFT's name for base-model rows in adapter_names
MODES = ("peft-mixed", "peft-swap")


class PeftAdapters:
    """The bank interface of the app (names, register, unregister, residency) over a PeftModel."""

    def __init__(self, model):
        self.model = model
        self.lock = threading.RLock()
        self.paths = {}
        self.stats = {"slot_hits": 0, "cpu_hits": 0, "disk_loads": 0}
        self.in_use = {}

    def names(self) -> list:
        with self.lock:
            return list(self.paths)

    def register(self, name: str, path) -> None:
        from peft import PeftModel

        with self.lock:
            if name in self.paths:
                raise ConfigError(f"an adapter named {name!r} is already loaded")
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
            else:
                self.model.load_adapter(str(path), adapter_name=name)
            self.paths[name] = str(path)
            self.stats["disk_loads"] += 1

    def unregister(self, name: str) -> None:
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            if self.in_use.get(name):
                raise StateError(f"adapter {name!r} is in use")
            self.model.delete_adapter(name)
            del self.paths[name]

    def residency(self) -> dict:
        with self.lock:
            return {"slots": len(self.paths), "cpu": len(self.paths), "in_use": sum(1 for v in self.in_use.values() if v),
                    "registered": len(self.paths)}


class StaticBatchEngine(QueueingEngine):
    """The engine interface of the app (submit, start, stop, busy, load) with static FIFO batches."""

    def __init__(self, bank: PeftAdapters, tokenizer, stop_ids, mode: str, **options):
        if mode not in MODES:
            raise ConfigError(f"unknown baseline {mode!r}; choose from {', '.join(MODES)}")
        super().__init__(tokenizer, stop_ids, **options)
        self.bank, self.mode = bank, mode
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not (self.queue or self.stopping):
                    self.condition.wait()
                if self.stopping:
                    return
                self.running = self._next_batch()
            try:
                if self.running:
                    self._generate(self.running)
            except Exception as error:
                for request in self.running:
                    if request.finish_reason is None:
                        request.on_event({"error": f"{type(error).__name__}: {error}"})
            finally:
                for request in self.running:
                    self.bank.in_use[request.adapter] = self.bank.in_use.get(request.adapter, 1) - 1
                with self.condition:
                    self.running = []

    def _next_batch(self) -> list:
        live = [r for r in self.queue if not r.cancelled]
        if self.mode == "peft-mixed":
            batch = live[: self.max_batch]
        else:
            adapter = live[0].adapter if live else None
            batch = [r for r in live if r.adapter == adapter][: self.max_batch]
        chosen = set(map(id, batch))
        self.queue = deque(r for r in self.queue if id(r) not in chosen and not r.cancelled)
        for request in batch:
            self.bank.in_use[request.adapter] = self.bank.in_use.get(request.adapter, 0) + 1
        return batch

    @torch.inference_mode()
    def _generate(self, batch: list) -> None:
        from transformers import StoppingCriteria, StoppingCriteriaList

        model = self.bank.model
        now = time.perf_counter()
        for request in batch:
            request.admitted = now
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        engine = self

        class Stream(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor([engine._step(r, int(input_ids[i, -1])) for i, r in enumerate(batch)])

        options = dict(input_ids=ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                       do_sample=False, stopping_criteria=StoppingCriteriaList([Stream()]), pad_token_id=self.pad_id,
                       eos_token_id=None)
        if self.mode == "peft-mixed":
            options["adapter_names"] = [r.adapter or BASE for r in batch]
            model.generate(**options)
        else:
            adapter = batch[0].adapter
            if adapter is None:
                with model.disable_adapter():
                    model.generate(**options)
            else:
                model.set_adapter(adapter)
                model.generate(**options)
        for request in batch:
            if request.finish_reason is None:
                self._finish(request, "length")

    def _step(self, request, token: int) -> bool:
        """One new token of ``request``; True once the request is finished."""
        if request.finish_reason is not None:
            return True
        if request.cancelled:
            request.finish_reason = "cancelled"
            return True
        reason = self._next_token(request, token)
        if reason:
            self._finish(request, reason)
        return reason is not None

    def _finish(self, request, reason: str) -> None:
        request.finish_reason = reason
        self._flush(request)
        self._count(request, "ok")
