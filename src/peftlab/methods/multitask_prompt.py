"""Multitask prompt tuning: Multitask Prompt Tuning Enables Parameter-Efficient Transfer Learning
(Wang et al., ICLR 2023, arXiv:2303.02861).

Why: a soft prompt learned for one task transfers poorly, and one prompt per task shares nothing.
MPT learns one prompt *shared* by many source tasks and gives each task only a rank-``r``
multiplicative correction, so what the tasks have in common lives in the shared prompt and each
task costs ``r * (length + hidden)`` numbers. A new (target) task starts from the source training's
shared prompt and the tasks' factors, and is tuned with the same few parameters.

What: task ``t``'s virtual tokens (length x hidden) are::

    P_t = P* ⊙ (u_t v_t^T)        u_t: length x r,  v_t: r x hidden

(HF PEFT's ``prompt_embeddings``, ``prefix_task_cols`` and ``prefix_task_rows``), prepended to the
input embeddings as prompt tuning does (``prompting.py``). Each batch row carries a task id and gets
its task's prompt, so rows of different tasks share one batch.

Task ids: ``with peftlab.task_ids(model, ids): model(...)`` (``core/tasks.py``, shared with Poly)
sets one id per batch row (a list, a tensor, or one int for every row) for every forward and
``generate`` inside the block; the trainer sets it from a batch's ``task_ids`` column. A context,
like ``peftlab.routing``, because transformers models (and ``generate``, which checks its keyword
inputs) have no ``task_ids`` argument, and peftlab never changes a model's forward signature.
Without ids every row is task 0, the only task when ``tasks=1`` (target-task tuning); with more
tasks a forward without ids is an error.

Initialisation (HF PEFT's ``prompt_tuning_init`` values): the factors start at N(0, 0.02) as in
PEFT; the shared prompt from ``init=random`` / ``vocab`` / ``text`` as in prompt tuning, or from a
source training's saved adapter (``source=`` its folder or ``.safetensors`` file):
``average_source_tasks`` (its shared prompt, every task's factors = the mean of the source tasks'),
``exact_source_task`` (its shared prompt and source task ``source_task``'s factors) or
``only_source_shared`` (its shared prompt; fresh factors).

Differences from HF PEFT (``MULTITASK_PROMPT_TUNING``, read and written exactly by
``formats/hf_multitask_prompt.py``):

- ``init=random`` draws the shared prompt at the embedding table's scale (as peftlab's prompt
  tuning); PEFT's ``RANDOM`` keeps ``nn.Embedding``'s N(0, 1);
- source files are safetensors only (no pickled ``.bin``: peftlab never unpickles);
- ``average_source_tasks`` / ``exact_source_task`` fill every target task with the chosen factors;
  PEFT loads them into a one-task prompt only (``num_tasks`` must be 1 there);
- rows without task ids are task 0 when there is one task; PEFT always requires ``task_ids``.

Mergeable: no. The prompt is extra input, not a change to any weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..core import model_adapters
from ..core.config import MethodConfig
from ..core.state import get_state
from ..core.tasks import row_tasks
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError
from .prompt_tuning import check_text_init, initial_prompt
from .prompting import SAVED_KEY, InputPrompt, check_length, input_embeddings
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Wang et al., 2023 (arXiv:2303.02861)"
MERGEABLE = False
IDENTITY_AT_INIT = False
# peftlab's prompt-tuning DEFAULT_LR (3e-2, AdamW; Lester et al. tune prompts at 0.3 with Adafactor),
# as a one-task MPT prompt is a soft prompt; Adam's per-parameter steps also lift the factors off their
# tiny N(0, 0.02) init within a few steps at this rate. Not yet measured for MPT itself
DEFAULT_LR = 3e-2
INVALID_SETTINGS = ("length=0", "tasks=0", "r=0", "init=zeros", "init=average_source_tasks", "source_task=-1",
                    "init=text")
INITS = ("random", "vocab", "text", "average_source_tasks", "exact_source_task", "only_source_shared")
SOURCE_INITS = INITS[3:]
FACTOR_STD = 0.02  # the factors' init, as HF PEFT
COLS, ROWS = "prefix_task_cols", "prefix_task_rows"  # HF PEFT's names for u (tasks x length x r) and v (tasks x r x hidden)


def _positive(config, key: str) -> None:
    value = getattr(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{config.method}: {key} must be a positive integer, got {value!r}")


@dataclass
class MultitaskPromptConfig(MethodConfig):
    """length: virtual tokens; tasks: how many tasks; r: rank of each task's factors; init: random,
    vocab, text (init_ids / init_text + tokenizer) or a source init (average_source_tasks,
    exact_source_task, only_source_shared) with source=<saved MPT adapter> and source_task."""

    method: ClassVar[str] = "multitask_prompt"
    length: int = 20
    tasks: int = 1
    r: int = 1
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_ids: list | None = None
    source: str | None = None
    source_task: int = 0

    def validate(self) -> None:
        super().validate()
        check_length(self)
        _positive(self, "tasks")
        _positive(self, "r")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)}, got {self.init!r}")
        check_text_init(self)
        if self.init in SOURCE_INITS and not self.source:
            raise ConfigError(f"{self.method}: init={self.init} starts from a source training's adapter; give "
                              "source=<its folder or adapter_model.safetensors>")
        if self.init not in SOURCE_INITS and self.source is not None:
            raise ConfigError(f"{self.method}: source only applies to the inits {', '.join(SOURCE_INITS)} (now init={self.init})")
        if not isinstance(self.source_task, int) or isinstance(self.source_task, bool) or self.source_task < 0:
            raise ConfigError(f"{self.method}: source_task (the source task whose factors exact_source_task takes) must be "
                              f"a non-negative integer, got {self.source_task!r}")


# ---- pure math -----------------------------------------------------------------------------------

def task_prompts(shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Every task's virtual tokens, (tasks x length x hidden): ``shared ⊙ (cols[t] @ rows[t])``."""
    return shared * torch.bmm(cols, rows)


# ---- initialisation --------------------------------------------------------------------------------

def read_source(path: str, shape: tuple, config: MultitaskPromptConfig) -> dict:
    """The source training's tensors (shared prompt and the source tasks' factors), checked."""
    from safetensors.torch import load_file

    file = Path(path)
    if file.is_dir():
        file = file / "adapter_model.safetensors"
    if file.suffix != ".safetensors" or not file.is_file():
        raise ConfigError(f"{config.method}: source {path!r} is not a safetensors file or a folder holding "
                          "adapter_model.safetensors (peftlab reads no pickled .bin files)")
    tensors = load_file(str(file))
    missing = [k for k in (SAVED_KEY, COLS, ROWS) if k not in tensors]
    if missing or tensors[COLS].dim() != 3 or tensors[ROWS].dim() != 3:
        raise AdapterFormatError(f"{file}: a multitask prompt source needs {SAVED_KEY}, {COLS} (tasks x length x r) and "
                                 f"{ROWS} (tasks x r x hidden); missing {missing}" if missing else
                                 f"{file}: {COLS} and {ROWS} must be 3D (tasks first)")
    length, hidden = shape
    cols, rows = tensors[COLS], tensors[ROWS]
    found = (tuple(tensors[SAVED_KEY].shape), tuple(cols.shape[1:]), tuple(rows.shape[1:]))
    if found != ((length, hidden), (length, config.r), (config.r, hidden)):
        raise IncompatibleBaseError(f"{file}: the source prompt is {found[0]} with factors {found[1]} / {found[2]}, but "
                                    f"this adapter needs ({length}, {hidden}) with r={config.r}: set length and r as "
                                    "in the source training, on the same base model")
    if config.init == "exact_source_task" and config.source_task >= cols.shape[0]:
        raise ConfigError(f"{config.method}: source_task={config.source_task}, but the source has {cols.shape[0]} tasks")
    return tensors


def initial_state(table: torch.Tensor, config: MultitaskPromptConfig) -> tuple:
    """(shared prompt, cols, rows) at step 0, from the embedding table (vocab x hidden) and the config."""
    shape = (config.length, table.shape[1])
    factory = dict(device=table.device, dtype=table.dtype)
    cols = torch.randn(config.tasks, config.length, config.r, **factory) * FACTOR_STD
    rows = torch.randn(config.tasks, config.r, table.shape[1], **factory) * FACTOR_STD
    if config.init not in SOURCE_INITS:
        return initial_prompt(table, config), cols, rows
    source = {k: v.to(**factory) for k, v in read_source(config.source, shape, config).items()}
    if config.init == "average_source_tasks":
        cols[:], rows[:] = source[COLS].mean(0), source[ROWS].mean(0)
    elif config.init == "exact_source_task":
        cols[:], rows[:] = source[COLS][config.source_task], source[ROWS][config.source_task]
    return source[SAVED_KEY].clone(), cols, rows


# ---- module ----------------------------------------------------------------------------------------

class MultitaskPrompt(InputPrompt):
    """The shared prompt and every task's factors; each row gets its task's prompt."""

    def __init__(self, backbone: nn.Module, shared: torch.Tensor, cols: torch.Tensor, rows: torch.Tensor):
        super().__init__(backbone, shared.shape[0])
        self.prompt_embeddings = nn.Parameter(shared)
        self.prefix_task_cols = nn.Parameter(cols)
        self.prefix_task_rows = nn.Parameter(rows)

    @property
    def tasks(self) -> int:
        return self.prefix_task_cols.shape[0]

    def prompt(self) -> torch.Tensor:
        """Task 0's virtual tokens (the only task when there is one)."""
        return task_prompts(self.prompt_embeddings, self.prefix_task_cols[:1], self.prefix_task_rows[:1])[0]

    def batch_prompt(self, batch: int) -> torch.Tensor:
        ids = self.row_tasks(batch)
        return task_prompts(self.prompt_embeddings, self.prefix_task_cols, self.prefix_task_rows)[ids]

    def row_tasks(self, batch: int) -> torch.Tensor:
        """The task id of each of ``batch`` rows (``peftlab.task_ids``), checked."""
        return row_tasks(self.__dict__.get("state"), batch, self.prompt_embeddings.device, n_tasks=self.tasks,
                         method="multitask_prompt")


Config = MultitaskPromptConfig


def make_model_adapter(model: nn.Module, config: MultitaskPromptConfig) -> MultitaskPrompt:
    stack = model_adapters.backbone(model)
    prompt = MultitaskPrompt(stack, *initial_state(input_embeddings(stack, config.method).weight, config))
    prompt.__dict__["state"] = get_state(model, create=True)  # where peftlab.task_ids puts the rows' tasks
    return prompt
