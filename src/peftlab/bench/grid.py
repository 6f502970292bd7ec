"""What the benchmark runs: methods, their HF PEFT twins, presets, and the cells of a grid.

A cell is one (task, method, seed) run. Methods are:

- ``full``: full fine-tuning, every parameter trains (the reference);
- every registered peftlab method at its defaults, trained at its ``DEFAULT_LR`` (prompt methods
  want rates 10-100x LoRA's);
- ``hf:<method>``: HF PEFT's implementation of a method peftlab shares with it, built with the
  same settings and targets as peftlab's (the twin), trained by the same loop on the same data,
  seeds and step budget.

A cell that cannot run is not run, and the report says why (``skip_reason``): AdapterFusion
(it fuses adapters that must be trained first), or a method made for another architecture than
the task's model (LLaMA-Adapter on MiniLM).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ..errors import ConfigError
from ..methods import METHODS
from .tasks import TASKS, Task

FULL = "full"
HF = "hf:"
# Full fine-tuning's rates: 1e-4 for the 22M-parameter MiniLM at a one-epoch budget (it beat 5e-5 on
# SST-2: 0.798 vs 0.788 dev accuracy, seed 0); the usual 2e-5 for the 135M causal LM.
FULL_LR = {"classification": 1e-4, "causal-lm": 2e-5}
FALLBACK_LR = 1e-3  # a method file without DEFAULT_LR (the LoRA family: 1e-3 is the common choice)
TWINS = (  # methods with an HF PEFT twin (bench/cell.py hf_twin), one a line
    "lora",
    "dora",
    "ia3",
    "prompt",
    "prefix",
    "ptuning",
    "adalora",
    "ln_tuning",
    "loha",
    "lokr",
    "vera",
    "fourierft",
    "oft",
    "boft",
    "road",
    "delora",
    "gralora",
    "waveft",
    "shira",
    "c3a",
    "hra",
    "deft",
    "miss",
    "vblora",
    "randlora",
    "poly",
    "multitask_prompt",
    "cpt",
    "trainable_tokens",
    "beft",
    "osf",
    "pvera",
    "unilora",
    "glora",
    "lily",
    "peanut",
    "tinylora",
    "supertuning",
    "adamss",
    "hira",
    "cartridge",
    "frod",
    "psoft",
)
SKIPPED = {"fusion": "fuses adapters that must be trained first; benchmark it from trained adapters",
           "mera": "merges bottleneck adapters that must be trained first; benchmark it from trained adapters",
           "spot": "starts from a source task's trained prompt; benchmark it from trained source prompts"}
CHOICES = ("quick", "full")


def method_names(twins: bool = True) -> list:
    """Every method of a grid: full fine-tuning, each registered method, and the HF PEFT twins."""
    names = [FULL] + list(METHODS)
    return names + [HF + m for m in TWINS] if twins else names


def learning_rate(method: str, task: Task) -> float:
    if method == FULL:
        return FULL_LR[task.kind]
    base = method.removeprefix(HF)
    if base not in METHODS:
        raise ConfigError(f"unknown benchmark method {method!r}; choose from {', '.join(method_names())}")
    return getattr(METHODS[base], "DEFAULT_LR", FALLBACK_LR)


@dataclass(frozen=True)
class Cell:
    task: Task
    method: str
    seed: int

    @property
    def key(self) -> str:
        """Identifies the run: the same key in a results file means this cell is done. The task's
        settings and the method's learning rate are part of it, so changing the budget or a
        method's recommended rate runs those cells anew."""
        settings = json.dumps({**self.task.to_dict(), "lr": learning_rate(self.method, self.task)}, sort_keys=True)
        digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
        return f"{self.task.name}|{self.method}|{self.seed}|{digest}"

    def to_dict(self) -> dict:
        return {"task": self.task.to_dict(), "method": self.method, "seed": self.seed, "key": self.key}


def preset(name: str) -> tuple[list, list, list]:
    """(tasks, methods, seeds) of a preset: ``quick`` is the SST-2 grid (every method and every
    HF PEFT twin, 3 seeds; under an hour on a 2-core CPU); ``full`` is every task."""
    if name == "quick":
        return [TASKS["sst2"]], method_names(), [0, 1, 2]
    if name == "full":
        return list(TASKS.values()), method_names(), [0, 1, 2]
    raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(CHOICES)}")


def cells(tasks: list, methods: list, seeds: list) -> list:
    """The grid in run order: task by task, each seed of a method back to back."""
    return [Cell(task, method, seed) for task in tasks for method in methods for seed in seeds]


ARCHITECTURE_OF = {"minilm": "bert", "smollm2-135m": "llama"}  # the built-in models' families


def skip_reason(cell: Cell) -> str | None:
    """Why a cell cannot run at all (the report says so instead of showing a failure), or None."""
    base = cell.method.removeprefix(HF)
    if base in SKIPPED:
        return SKIPPED[base]
    supported = getattr(METHODS.get(base), "ARCHITECTURES", None)
    arch = ARCHITECTURE_OF.get(cell.task.model)
    if supported and arch and arch not in supported:
        return f"{base} supports {', '.join(supported)} models only; {cell.task.name} uses {cell.task.model} ({arch})"
    return None
