"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023, arXiv:2303.10512).

LoRA gives every weight matrix the same rank, though some matrices matter far more than others.
AdaLoRA starts every module at rank ``r`` and moves a shrinking total rank budget to where it
matters, during training:

- SVD form: ``delta W = P diag(lambda) Q`` with ``P`` (out x r, HF PEFT's ``lora_B``), the
  singular values ``lambda`` (``lora_E``, r x 1, zero at init, so the output equals the base at
  step 0) and ``Q`` (r x in, ``lora_A``), scaled by ``alpha / r``. Pruning a triplet (P_i,
  lambda_i, Q_i) is setting ``lambda_i`` to zero, which keeps it revivable.
- ``P`` and ``Q`` are kept near-orthogonal by the regularizer
  ``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2``, averaged over the modules and weighted by
  ``orth_reg_weight`` (the ``regularization`` hook adds it to the loss).
- Importance: the sensitivity ``I = |w * dL/dw|`` of every entry is smoothed,
  ``I' = b1 I' + (1 - b1) I``, its uncertainty tracked, ``U' = b2 U' + (1 - b2) |I - I'|``,
  and scored ``s = I' U'``. A triplet's score is ``s(lambda_i)`` plus the mean score of ``Q``'s
  row i and of ``P``'s column i.
- Budget: the total rank stays at its initial value for ``init_warmup`` steps, then
  falls as a cubic to ``target_r`` times the number of modules, reached ``final_warmup`` steps
  before the end; every ``delta_t`` steps the lowest-scoring triplets over the whole model are
  masked down to the budget. The final allocation is kept fixed for the last ``final_warmup`` steps.

The schedule runs in the ``after_step`` hook (``peftlab.train`` calls it after each optimizer
step, gradients still present, with the run's length); ``ranks(model, name)`` reports the ranks
each module was given, and they are saved in HF PEFT's ADALORA format (``rank_pattern`` plus the
kept triplets, ``formats/hf_adalora.py``). Mergeable: ``delta W`` is one (out x in) matrix. The
scale divides by ``r + 1e-5`` as HF PEFT does, so outputs match it to the last bit that matters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapters as core
from ..core.config import MethodConfig
from ..core.state import require_state
from ..core.targets import is_linear
from ..errors import ConfigError
from .lora import MergesDelta, base_weight

CATEGORY = "reparameterized"
PAPER = "Zhang et al., 2023 (arXiv:2303.10512)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "target_r=0", "target_r=99", "beta1=1.5", "delta_t=0", "orth_reg_weight=-1")
EXAMPLE_SETTINGS = "r=4,target_r=2"  # ranks for a hidden size of 32
# P and Q start as 0.02-scale Gaussians and lambda at zero (the authors' init), so the update grows
# slowly at first; short runs need a larger rate than LoRA's.
DEFAULT_LR = 2e-2
FACTORS = ("lora_A", "lora_E", "lora_B")


@dataclass
class AdaLoraConfig(MethodConfig):
    """r: the initial rank of every module (HF PEFT's init_r); target_r: the average rank left at
    the end (total budget = target_r x modules); alpha: the scale numerator (scale alpha / r);
    dropout on the adapter input; init_warmup / final_warmup: steps at the start with the full
    budget and at the end with the final allocation fixed (HF PEFT's tinit / tfinal); delta_t:
    steps between two allocations; beta1 / beta2: EMA factors of the sensitivity and its
    uncertainty; orth_reg_weight: the weight of the orthogonality regularizer. Targets default to
    every linear layer, as the paper adapts every weight matrix. (Not a ``LoraConfig``: its rslora,
    init and per-module rank / alpha patterns mean nothing here, where the allocator sets the ranks.)"""

    method: ClassVar[str] = "adalora"
    r: int = 12
    target_r: int = 8
    alpha: float = 32
    dropout: float = 0.0
    init_warmup: int = 0
    final_warmup: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def validate(self) -> None:
        super().validate()
        for key, low in (("r", 1), ("target_r", 1), ("init_warmup", 0), ("final_warmup", 0), ("delta_t", 1)):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
                raise ConfigError(f"adalora: {key} must be an integer >= {low}, got {value!r}")
        if self.target_r > self.r:
            raise ConfigError(f"adalora: target_r={self.target_r} is larger than the initial rank r={self.r}; the budget "
                              "only shrinks, so choose target_r <= r")
        for key, ok, rule in (("alpha", lambda v: v > 0, "a positive number"),
                              ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
                              ("beta1", lambda v: 0 < v < 1, "in (0, 1)"),
                              ("beta2", lambda v: 0 < v < 1, "in (0, 1)"),
                              ("orth_reg_weight", lambda v: v >= 0, "a number >= 0")):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value)):
                raise ConfigError(f"adalora: {key} must be {rule}, got {value!r}")


# ---- pure math -------------------------------------------------------------------------------

def delta_weight(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, scale) -> torch.Tensor:
    """``P diag(lambda) Q`` times the scale, in (out x in) layout (``A`` = Q, ``E`` = lambda, ``B`` = P)."""
    return (B @ (A * E)) * scale


def orthogonality(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``||P^T P - I||_F^2 + ||Q Q^T - I||_F^2`` with ``P = B`` (out x r) and ``Q = A`` (r x in)."""
    eye = torch.eye(A.shape[0], device=A.device, dtype=A.dtype)
    return ((B.t() @ B - eye) ** 2).sum() + ((A @ A.t() - eye) ** 2).sum()


def budget_at(step: int, total_steps: int, initial: int, target: int, init_warmup: int, final_warmup: int) -> int:
    """The total rank allowed after ``step`` (1-based): ``initial`` through the initial warmup,
    then a cubic fall that reaches ``target`` at ``total_steps - final_warmup``."""
    if step <= init_warmup:
        return initial
    end = total_steps - final_warmup
    if step >= end:
        return target
    remaining = 1 - (step - init_warmup) / (end - init_warmup)
    return int(target + (initial - target) * remaining ** 3)


def keep_top(scores: list, budget: int) -> list:
    """Boolean masks (one per module) keeping exactly the ``budget`` highest triplet scores overall."""
    flat = torch.cat(scores)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, min(budget, flat.numel())).indices] = True
    return list(keep.split([len(s) for s in scores]))


# ---- module ----------------------------------------------------------------------------------

class AdaLoraLinear(MergesDelta, nn.Module):
    """Returns ``alpha / r * P diag(lambda) Q dropout(x)`` for ``nn.Linear`` and ``Conv1D``; holds
    the triplet mask and the importance averages (buffers, so checkpoints resume them exactly)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        out_features, in_features = base_weight(base).shape
        w = base.weight
        options = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.alpha = r, alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # HF PEFT's init: lambda = 0, P and Q small Gaussians
        self.lora_A = nn.Parameter(torch.randn(r, in_features, **options) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, **options))
        self.lora_B = nn.Parameter(torch.randn(out_features, r, **options) * 0.02)
        self.register_buffer("ranknum", torch.full((1,), float(r), **options))  # the rank the scale divides by
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device))  # the triplets kept
        for key in FACTORS:
            zeros = torch.zeros_like(getattr(self, key))
            self.register_buffer(f"{key}_sensitivity", zeros, persistent=False)
            self.register_buffer(f"{key}_uncertainty", zeros.clone(), persistent=False)

    def scale(self) -> torch.Tensor:
        return self.alpha / (self.ranknum + 1e-5)

    def forward(self, x, base_out):
        return F.linear(F.linear(self.dropout(x), self.lora_A * self.lora_E), self.lora_B) * self.scale()

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A, self.lora_E, self.lora_B, self.scale())


    # importance and masking (called by the after_step hook, without gradients)

    def update_importance(self, beta1: float, beta2: float) -> None:
        for key in FACTORS:
            p = getattr(self, key)
            sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            smoothed, uncertainty = getattr(self, f"{key}_sensitivity"), getattr(self, f"{key}_uncertainty")
            smoothed.mul_(beta1).add_(sensitivity, alpha=1 - beta1)
            uncertainty.mul_(beta2).add_((sensitivity - smoothed).abs(), alpha=1 - beta2)

    def triplet_scores(self) -> torch.Tensor:
        """``s(lambda_i)`` + mean score of ``Q``'s row i + mean score of ``P``'s column i."""
        score = {key: getattr(self, f"{key}_sensitivity") * getattr(self, f"{key}_uncertainty") for key in FACTORS}
        return score["lora_E"][:, 0] + score["lora_A"].mean(1) + score["lora_B"].mean(0)

    def set_mask(self, keep: torch.Tensor) -> None:
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep[:, None], 0.0)

    # the kept triplets, as HF PEFT saves them

    def kept_triplets(self) -> dict:
        keep = self.rank_mask
        return {"lora_A": self.lora_A.detach()[keep], "lora_E": self.lora_E.detach()[keep],
                "lora_B": self.lora_B.detach()[:, keep]}

    def load_triplets(self, keep: torch.Tensor, tensors: dict) -> None:
        """Put saved triplets back at the positions ``keep`` marks; the others stay pruned (zero)."""
        with torch.no_grad():
            for key in FACTORS:
                getattr(self, key).zero_()
            self.lora_A[keep] = tensors["lora_A"].to(self.lora_A.dtype)
            self.lora_E[keep] = tensors["lora_E"].to(self.lora_E.dtype)
            self.lora_B[:, keep] = tensors["lora_B"].to(self.lora_B.dtype)
            if "ranknum" in tensors:
                self.ranknum.copy_(tensors["ranknum"].reshape(1))
            self.rank_mask.copy_(keep)


Config = AdaLoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: AdaLoraConfig, name: str) -> nn.Module:
    return AdaLoraLinear(module, config.r, config.alpha, config.dropout)


# ---- training hooks and report ---------------------------------------------------------------

def _modules(model: nn.Module, name: str) -> list:
    return [module for _, module in core.method_adapters(model, name, "adalora")]


def regularization(model: nn.Module, name: str, config: AdaLoraConfig):
    """``orth_reg_weight`` x the mean over modules of ``||P^T P - I||^2 + ||Q Q^T - I||^2``."""
    modules = _modules(model, name)
    if not config.orth_reg_weight or not modules:
        return None
    terms = torch.stack([orthogonality(m.lora_A, m.lora_B) for m in modules])
    return config.orth_reg_weight * terms.mean()


def after_step(model: nn.Module, name: str, config: AdaLoraConfig, step: int, total_steps: int) -> None:
    """Update the importance scores and mask the triplets down to this step's budget."""
    end = total_steps - config.final_warmup
    if config.init_warmup >= end:
        raise ConfigError(f"adalora: init_warmup={config.init_warmup} and final_warmup={config.final_warmup} leave no "
                          f"steps of a {total_steps}-step run to reduce the rank budget in; lower them or train longer")
    modules = _modules(model, name)
    with torch.no_grad():
        if step > end:  # the final allocation stays
            for module in modules:
                module.set_mask(module.rank_mask.clone())
            return
        for module in modules:
            module.update_importance(config.beta1, config.beta2)
        if step == end or (step > config.init_warmup and step % config.delta_t == 0):
            budget = budget_at(step, total_steps, sum(m.r for m in modules), config.target_r * len(modules),
                               config.init_warmup, config.final_warmup)
            for module, keep in zip(modules, keep_top([m.triplet_scores() for m in modules], budget)):
                module.set_mask(keep)


def ranks(model: nn.Module, name: str = "default") -> dict:
    """``{module name: rank}``: the triplets each module of adapter ``name`` keeps."""
    require_state(model).check_known([name])
    return {module_name: int(module.rank_mask.sum()) for module_name, module in core.method_adapters(model, name, "adalora")}
