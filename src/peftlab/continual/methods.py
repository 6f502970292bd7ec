"""What a continual method is, the two LoRA reference points, and the registry of all six.

A method is a small object the runner (``runner.py``) calls around each training stage:

    stages(T)                    which tasks each stage trains on (one per stage; multitask: all in one)
    before_stage(model, i)       attach / activate / freeze its adapters for stage i
    training_rows(i, rows)       what stage i trains on (experience replay mixes in its memory)
    after_stage(model, i, rows)  remember what it needs (replay: a sample of this stage's rows)
    logits(model, batch)         how it predicts at test time (AdapterCL chooses an adapter per row)

Every method predicts over the shared label space without being told a row's task (``model.py``).
Its options (rank, learning rate, penalty weights, prompt length...) are plain keyword settings,
checked against the defaults in ``OPTIONS``.

- ``seq-lora``: one LoRA trained on each task in turn, nothing done against forgetting: the
  lower bound every method should beat (as in O-LoRA's and Progressive Prompts' tables).
- ``multitask``: one LoRA trained once on all tasks' rows together: the usual upper bound.
- ``o-lora`` (``olora.py``), ``progressive`` (``progressive.py``), ``adaptercl`` (``adaptercl.py``),
  ``replay`` (``replay.py``).
"""
from __future__ import annotations

import difflib
import importlib

import peftlab

from ..errors import ConfigError

LORA_TARGETS = "[queries,values]"  # O-LoRA's choice (the attention's query and value projections), on any model


class ContinualMethod:
    name = ""
    paper = ""
    summary = ""
    OPTIONS: dict = {"lr": 5e-3}

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], list(self.OPTIONS), n=1)
            raise ConfigError(f"{self.name}: unknown option {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                              + f"; its options: {', '.join(f'{k}={v}' for k, v in self.OPTIONS.items())}")
        self.options = {key: _coerce(self.name, key, options.get(key, default), default)
                        for key, default in self.OPTIONS.items()}
        for key, value in self.options.items():  # self.lr, self.r, self.lambda1, ...
            setattr(self, key, value)

    # ---- the protocol ---------------------------------------------------------------------
    def stages(self, tasks: int) -> list:
        return [[i] for i in range(tasks)]

    def before_stage(self, model, stage: int) -> None:
        raise NotImplementedError

    def training_rows(self, stage: int, rows: list) -> list:
        return rows

    def after_stage(self, model, stage: int, rows: list) -> None:
        pass

    def logits(self, model, batch: dict):
        return model(**batch).logits

    def describe(self) -> dict:
        return {"method": self.name, "paper": self.paper, "summary": self.summary, "options": dict(self.options)}


def _coerce(method: str, key: str, value, default):
    kind = type(default)
    try:
        if kind is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{method}: option {key} should be a {kind.__name__} (like {default!r}), got {value!r}") from None


def lora_spec(method: ContinualMethod) -> str:
    return f"lora[r={method.r},alpha={method.alpha},targets={LORA_TARGETS}]"


class SeqLora(ContinualMethod):
    name = "seq-lora"
    paper = "sequential LoRA fine-tuning (the lower bound of O-LoRA's comparisons)"
    summary = "one LoRA trained on each task in turn; nothing against forgetting"
    OPTIONS = {"lr": 5e-3, "r": 8, "alpha": 16}

    def before_stage(self, model, stage: int) -> None:
        if stage == 0:
            peftlab.attach(model, lora_spec(self), name="lora")


class Multitask(SeqLora):
    name = "multitask"
    paper = "multitask training on all tasks at once (the upper bound)"
    summary = "one LoRA trained once on every task's rows together"

    def stages(self, tasks: int) -> list:
        return [list(range(tasks))]


# name -> (module, class); the modules import this one, so they are imported on first use
METHODS = {
    "seq-lora": ("methods", "SeqLora"),
    "o-lora": ("olora", "OLora"),
    "progressive": ("progressive", "ProgressivePrompts"),
    "adaptercl": ("adaptercl", "AdapterCL"),
    "replay": ("replay", "Replay"),
    "multitask": ("methods", "Multitask"),
}


def method_class(name: str):
    if name not in METHODS:
        hint = difflib.get_close_matches(str(name), list(METHODS), n=1)
        raise ConfigError(f"unknown continual method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                          + f"; choose one of {', '.join(METHODS)}")
    module, cls = METHODS[name]
    return getattr(importlib.import_module(f".{module}", __package__), cls)


def get_method(name: str, options: dict | None = None) -> ContinualMethod:
    """A continual method by name, with its options checked (``ConfigError`` naming the bad one)."""
    return method_class(name)(**(options or {}))
