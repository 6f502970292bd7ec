"""DyLoRA: Dynamic Search-Free Low-Rank Adaptation (Valipour et al., EACL 2023, arXiv:2210.07558).

A LoRA block is trained for a fixed rank, and a different rank means training again. DyLoRA
trains one block for every rank up to ``r`` at once, so the rank can be chosen after training
without a search. At each training step a rank ``b`` is drawn uniformly from {1, ..., r} and the
block runs truncated to it: only the first ``b`` rows of ``A`` and columns of ``B``, with the
scale ``alpha / b``::

    h = W x + (alpha / b) * B[:, :b] A[:b] x

In the paper's "frozen" mode (``frozen=true``, the default) that step updates only the ``b``-th
row of ``A`` and column of ``B``; the lower ranks take part in the forward but get no gradient,
so what rank ``b`` learns is layered on top of ranks 1..b-1 (nested dropout's ordering).
``frozen=false`` updates all ``b`` leading ranks (the paper's ablation). One ``b`` is drawn per
optimizer step for the whole adapter (``after_step``, which ``peftlab.train`` calls; a
hand-written loop calls ``peftlab.core.adapters.after_step``); a module with a smaller ``r``
(``rank_pattern``) uses ``min(b, r)``.

At inference the block runs at rank ``r``, or at the rank chosen with
``set_rank(model, name, b)``; that rank is saved with the adapter. Mergeable: the merged update
is the one of the chosen rank, ``(alpha / b) B[:, :b] A[:b]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import is_linear
from ..errors import ConfigError, StateError
from .lora import LoraConfig, base_weight, scaling
from .lowrank import FactoredUpdate, reject_weight_inits

CATEGORY = "reparameterized"
PAPER = "Valipour et al., 2022 (arXiv:2210.07558)"
MERGEABLE = True
# each step trains one rank of r, so each rank sees 1/r of the updates: at LoRA's 1e-3 it stays at the
# majority class on SST-2 at the bench budget; 5e-3 reaches 0.752 (seed 0), 2e-2 collapses
DEFAULT_LR = 5e-3
INVALID_SETTINGS = ("r=0", "alpha=0", "frozen=maybe", "init=pissa")
EXAMPLE_SETTINGS = "r=2"  # each step trains one rank: a small r lets 12 test steps reach all of them


@dataclass
class DyLoraConfig(LoraConfig):
    """The LoRA settings, ``r`` being the largest rank trained; frozen: update only the sampled
    rank's row and column each step (the paper's mode) instead of all ranks up to it."""

    method: ClassVar[str] = "dylora"
    frozen: bool = True

    def validate(self) -> None:
        super().validate()
        reject_weight_inits(self)
        if not isinstance(self.frozen, bool):
            raise ConfigError(f"dylora: frozen must be true or false, got {self.frozen!r}")


# ---- pure math -------------------------------------------------------------------------------

def truncated_factors(A_rows, B_cols, b: int, frozen: bool):
    """``A[:b]`` and ``B[:, :b]`` from one row of ``A`` / column of ``B`` per rank; with
    ``frozen`` the ranks below ``b`` are detached, so only rank ``b`` gets a gradient."""
    A_rows, B_cols = list(A_rows[:b]), list(B_cols[:b])
    if frozen:
        A_rows[:b - 1] = [row.detach() for row in A_rows[:b - 1]]
        B_cols[:b - 1] = [col.detach() for col in B_cols[:b - 1]]
    return torch.cat(A_rows, 0), torch.cat(B_cols, 1)


# ---- module ----------------------------------------------------------------------------------

class DyLoraLinear(FactoredUpdate, nn.Module):
    """LoRA for ``nn.Linear`` and ``Conv1D``, truncated to rank ``train_rank`` in training and to
    the buffer ``rank`` otherwise. Each rank is its own parameter (``lora_A.i``: 1 x in,
    ``lora_B.i``: out x 1): a rank left out of a step's graph gets no gradient at all, so the
    optimizer leaves it exactly as it was (a slice of one matrix would still move with Adam's
    momentum)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, init: str, frozen: bool):
        super().__init__()
        out_features, in_features = base_weight(base).shape
        w = base.weight
        options = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.alpha, self.rslora, self.frozen = r, alpha, rslora, frozen
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(1, in_features, **options)) for _ in range(r)])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(out_features, 1, **options)) for _ in range(r)])
        with torch.no_grad():
            for row in self.lora_A:  # LoRA's init, row by row (the same fan-in, so the same distribution)
                if init == "gaussian":
                    nn.init.normal_(row, std=1 / r)
                else:
                    nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        # the inference rank (saved with the adapter) and the rank of the current training step
        # (drawn by after_step; a buffer too, so a resumed run continues at the same rank)
        self.register_buffer("rank", torch.tensor(r, device=w.device))
        self.register_buffer("train_rank", torch.tensor(r, device=w.device), persistent=False)

    def factors(self):
        b = min(int(self.train_rank), self.r) if self.training else int(self.rank)
        A, B = truncated_factors(self.lora_A, self.lora_B, b, self.frozen and self.training)
        return A, B, scaling(self.alpha, b, self.rslora)


Config = DyLoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: DyLoraConfig, name: str) -> nn.Module:
    return DyLoraLinear(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora,
                        config.init, config.frozen)


# ---- rank selection --------------------------------------------------------------------------

def _modules(model: nn.Module, name: str) -> list:
    require_state(model).check_known([name])
    modules = [adapter for _, adapter in core.method_adapters(model, name, "dylora")]
    if not modules:
        raise ConfigError(f"adapter {name!r} has no dylora modules")
    return modules


def after_step(model: nn.Module, name: str, config: DyLoraConfig, step: int, total_steps: int) -> None:
    """Draw the rank the next training step runs at: b ~ U{1, ..., r}, one for the whole adapter."""
    modules = _modules(model, name)
    b = int(torch.randint(1, max(m.r for m in modules) + 1, ()))
    for module in modules:
        module.train_rank.fill_(b)


def set_rank(model: nn.Module, name: str, b: int) -> None:
    """Run adapter ``name`` at rank ``b`` (1..r) from now on (inference, merging, saving); a
    module whose own ``r`` is smaller keeps its ``r``."""
    modules = _modules(model, name)
    largest = max(m.r for m in modules)
    if not (isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= largest):
        raise ConfigError(f"dylora: the rank must be an integer from 1 to r={largest}, got {b!r}")
    if name in require_state(model).merged:
        raise StateError(f"adapter {name!r} is merged at its current rank; peftlab.unmerge it before changing the rank")
    for module in modules:
        module.rank.fill_(min(b, module.r))


def get_rank(model: nn.Module, name: str) -> int:
    """The rank adapter ``name`` runs at outside training."""
    return max(int(m.rank) for m in _modules(model, name))
