"""Poly (Polytropon): Combining Parameter-Efficient Modules for Task-Level Generalisation (Ponti et
al., EACL 2023, arXiv:2202.13914), with Multi-Head Routing (Caccia et al., 2023, arXiv:2211.03831).

Multi-task training usually gives each task its own adapter (no transfer between tasks) or one
adapter for all of them (interference). Poly assumes each task draws on a few latent *skills*:
every adapted layer holds an inventory of ``n_skills`` LoRA pairs ``(A_s, B_s)``, and a trained
task-skill allocation matrix ``Z`` (``n_tasks x n_skills`` logits, one per layer, as in HF PEFT)
says which skills a task uses. The adapter of task ``t`` is the weighted average of the skills'
*parameters* (not of their outputs)::

    w = sigmoid(Z[t]) / sum(sigmoid(Z[t]))            (eval: deterministic)
    A_t = sum_s w_s A_s,   B_t = sum_s w_s B_s,   delta(x) = x A_t B_t / r

In training ``sigmoid(Z[t])`` is replaced by a relaxed-Bernoulli sample at temperature 1 (the
paper's discrete skill selection made differentiable), so the forward is stochastic there. With
``n_splits > 1`` (Multi-Head Routing) the input and output features are cut into ``n_splits``
blocks and each block has its own routing row: ``Z`` is ``n_tasks x (n_splits * n_skills)``,
``A_s`` is ``n_splits`` blocks of ``in / n_splits`` rows, ``B_s`` of ``out / n_splits`` columns.
``B`` starts at zero, so the model is the base model at step 0.

Task ids per row. The update depends on each row's task, so the model needs one task id per
batch row: ``with peftlab.task_ids(model, ids): ...`` (``core/tasks.py``, shared with multitask
prompt tuning), set once for the whole forward (and every decoding step of ``generate``) and read
by every Poly layer; the trainer sets it from a batch's ``task_ids`` column. HF PEFT instead takes
``task_ids=`` as a forward keyword, which transformers' ``forward`` and ``generate`` reject. It
composes with ``peftlab.routing``: a Poly adapter given some rows of a routed batch picks those
rows' task ids. With ``n_tasks=1`` (the default) no ids are needed: every row is task 0; with more
tasks a forward without ids is a clear error.

Reads and writes HF PEFT's ``POLY`` format exactly (``formats/hf_poly.py``): ``poly_lora_A``
(n_splits, n_skills, in / n_splits, r), ``poly_lora_B`` (n_splits, n_skills, r, out / n_splits),
``poly_router.module_logits`` (n_tasks, n_splits * n_skills). Differences from HF PEFT:
- defaults are PEFT's (r=8, n_tasks=1, n_skills=4, n_splits=1, B at zero) except ``targets``
  (peftlab's ``all-linear``; PEFT maps only T5 by default); ``init=kaiming`` is PEFT's
  ``init_weights=False`` (B drawn like A, not the base at step 0);
- ``nn.Linear`` only, as PEFT (GPT-2's Conv1D is refused clearly); widths that ``n_splits`` does
  not divide are refused at attach (PEFT fails in its forward);
- not mergeable (each row's update depends on its task; PEFT has no merge for Poly either);
- any input shape works here; PEFT's Poly layer takes 3-D inputs only (batch, tokens, features),
  so a file adapting a layer fed 2-D inputs (BERT's pooler, picked by ``all-linear``) loads in
  PEFT but fails in its forward: name the targets (``targets=[query,value]``) for such files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from ..core.config import MethodConfig
from ..core.tasks import row_tasks
from ..errors import ConfigError
from .lora import base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Ponti et al., 2023 (arXiv:2202.13914)"
MERGEABLE = False
# no rate in the paper for this setting; the skills are LoRA pairs scaled by 1/r (LoRA's alpha/r is 2 at
# peftlab's defaults), a 16x smaller update for the same B, so the LoRA family's 1e-3 is raised to 5e-3
DEFAULT_LR = 5e-3
INVALID_SETTINGS = ("r=0", "n_tasks=0", "n_skills=0", "n_splits=0", "init=ones", "poly_type=mhr")
INITS = ("zeros", "kaiming")
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
EPS = 1e-12  # keeps the normalisation finite when every skill's weight is zero (PEFT's value)


@dataclass
class PolyConfig(MethodConfig):
    """r: rank of each skill's LoRA pair; n_tasks: rows of the routing matrix Z (task ids 0..n_tasks-1);
    n_skills: LoRA pairs in each layer's inventory; n_splits: routing blocks per layer (1: Poly,
    >1: Multi-Head Routing); init: zeros (B = 0, the base at step 0) or kaiming (PEFT's
    init_weights=False); poly_type: "poly", the only router PEFT has."""

    method: ClassVar[str] = "poly"
    r: int = 8
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1
    init: str = "zeros"
    poly_type: str = "poly"

    def validate(self) -> None:
        super().validate()
        for key in ("r", "n_tasks", "n_skills", "n_splits"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"poly: {key} must be a positive integer, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"poly: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.poly_type != "poly":
            raise ConfigError(f"poly: poly_type must be 'poly' (the only router, as in HF PEFT), got {self.poly_type!r}")


# ---- pure math -------------------------------------------------------------------------------

def mixing_weights(logits: torch.Tensor, n_splits: int, n_skills: int, sample: bool) -> torch.Tensor:
    """(rows, n_splits, n_skills) skill weights from each row's routing logits: sigmoid (or, in
    training, a relaxed-Bernoulli sample at temperature 1), normalised to sum to one per split."""
    logits = logits.view(-1, n_splits, n_skills)
    p = RelaxedBernoulli(temperature=torch.tensor(1.0, device=logits.device), logits=logits).rsample() \
        if sample else torch.sigmoid(logits)
    return p / (p.sum(-1, keepdim=True) + EPS)


def mixed_pair(weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (in x r) and (r x out) LoRA pair: the weighted average of the skills' pairs,
    split block q taking its rows of A and its columns of B from its own weights."""
    rows, (n_splits, _, d_in, r), d_out = weights.shape[0], A.shape, B.shape[-1]
    A_t = torch.einsum("bqs,qsdr->bqdr", weights, A).reshape(rows, n_splits * d_in, r)
    B_t = torch.einsum("bqs,qsrd->brqd", weights, B).reshape(rows, r, n_splits * d_out)
    return A_t, B_t


def poly_delta(x: torch.Tensor, weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x A_t B_t / r`` with each row's own mixed pair; ``x`` is (rows, ..., in)."""
    A_t, B_t = mixed_pair(weights.to(A.dtype), A, B)
    h = x.reshape(x.shape[0], -1, x.shape[-1]).to(A.dtype)
    return (h @ A_t @ B_t / A.shape[-1]).reshape(*x.shape[:-1], B_t.shape[-1])


# ---- module ----------------------------------------------------------------------------------

class PolyRouter(nn.Module):
    """Z: one row of routing logits per task (n_tasks x n_splits * n_skills), drawn in +-1e-3 (PEFT's init)."""

    def __init__(self, n_tasks: int, n_splits: int, n_skills: int, like: torch.Tensor):
        super().__init__()
        self.n_splits, self.n_skills = n_splits, n_skills
        self.module_logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills).uniform_(-1e-3, 1e-3).to(like))

    def forward(self, task_ids: torch.Tensor) -> torch.Tensor:
        return mixing_weights(self.module_logits[task_ids], self.n_splits, self.n_skills, self.training)


class PolyLinear(nn.Module):
    """Poly for ``nn.Linear``: returns ``x A_t B_t / r`` with row t's mixture of the skills."""

    def __init__(self, base: nn.Module, config: PolyConfig, name: str = ""):
        super().__init__()
        out_features, in_features = base_weight(base).shape
        q = config.n_splits
        if in_features % q or out_features % q:
            raise ConfigError(f"poly: n_splits={q} must divide the input ({in_features}) and output ({out_features}) "
                              f"features of '{name}'; choose a divisor of both, or exclude the layer")
        w = base.weight
        like = torch.zeros((), device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.n_tasks = config.r, config.n_tasks
        self.poly_lora_A = nn.Parameter(_kaiming_blocks(q, config.n_skills, in_features // q, config.r).to(like))
        B = _kaiming_blocks(q, config.n_skills, config.r, out_features // q) \
            if config.init == "kaiming" else torch.zeros(q, config.n_skills, config.r, out_features // q)
        self.poly_lora_B = nn.Parameter(B.to(like))
        self.poly_router = PolyRouter(config.n_tasks, q, config.n_skills, like)

    def task_rows(self, rows: int, device) -> torch.Tensor:
        """The task id of each of the ``rows`` rows this layer is given (``peftlab.task_ids``)."""
        return row_tasks(self.__dict__.get("state"), rows, device, n_tasks=self.n_tasks, method="poly",
                         adapter_name=self.__dict__.get("adapter_name"))

    def forward(self, x, base_out):
        weights = self.poly_router(self.task_rows(x.shape[0], x.device))
        return poly_delta(x, weights, self.poly_lora_A, self.poly_lora_B).to(x.dtype)

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


def _kaiming_blocks(n_splits: int, n_skills: int, rows: int, cols: int) -> torch.Tensor:
    """(n_splits, n_skills, rows, cols) blocks, each nn.Linear's default init of a (cols x rows)
    weight, transposed (PEFT's init of A, and of B under init_weights=False)."""
    out = torch.empty(n_splits, n_skills, rows, cols)
    for q in range(n_splits):
        for s in range(n_skills):
            block = torch.empty(cols, rows)
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            out[q, s] = block.T
    return out


# ---- method protocol -------------------------------------------------------------------------

Config = PolyConfig


def make_adapter(module: nn.Module, config: PolyConfig, name: str) -> PolyLinear:
    refuse_non_linear("poly", module, name)
    return PolyLinear(module, config, name)


def after_attach(model: nn.Module, name: str, config: PolyConfig) -> None:
    """Give every Poly layer the model's state, where ``peftlab.task_ids`` puts the rows' tasks."""
    from ..core.adapters import method_adapters
    from ..core.state import get_state

    for _, adapter in method_adapters(model, name, config.method):
        adapter.__dict__["state"] = get_state(model)
        adapter.__dict__["adapter_name"] = name
