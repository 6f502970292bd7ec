"""SoRA: Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., EMNLP 2023, arXiv:2311.11696).

LoRA fixes one rank for every module before training. SoRA starts from a generous rank and lets
training find a smaller one per module: a gate vector ``g`` (one entry per rank) sits between
the two factors,

    delta W = s * B diag(g) A,

and ``g`` is trained by proximal gradient descent on the L1-regularized loss: after each
optimizer step the gate is soft-thresholded,

    g <- sign(g) * max(|g| - lambda * lr, 0),

which sets entries exactly to zero. A zero gate switches its rank off (its row of ``A`` and
column of ``B`` no longer matter), so the rank left per module (``effective_ranks``) is what
training decided: the paper then drops the zeroed ranks, leaving a plain LoRA of that rank
(merging gives inference at no extra cost either way). ``A``, ``B``, init (``A`` random, ``B``
zero, so the output equals the base at step 0) and scale ``s = alpha / r`` are LoRA's; the gate
starts from a standard normal draw, as in the authors' code. The threshold uses the learning
rate of the step, which ``peftlab.train`` passes to ``after_step`` (a hand-written loop passes
``lr=`` to ``peftlab.core.adapters.after_step``). Mergeable: the update is one low-rank product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import adapters as core
from ..core.state import require_state
from ..core.targets import is_linear
from ..errors import ConfigError
from .lora import LoraConfig, LoraLinear
from .lowrank import FactoredUpdate, reject_weight_inits

CATEGORY = "reparameterized"
PAPER = "Ding et al., 2023 (arXiv:2311.11696)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "sparse_lambda=-1", "init=pissa")


@dataclass
class SoraConfig(LoraConfig):
    """The LoRA settings plus sparse_lambda: the L1 strength of the gate; each step's soft
    threshold is ``sparse_lambda * lr``, so with Adam (steps of about ``lr``) values below 1 let
    gates with a steady gradient survive and values above 1 close every gate in time."""

    method: ClassVar[str] = "sora"
    sparse_lambda: float = 0.1

    def validate(self) -> None:
        super().validate()
        reject_weight_inits(self)
        value = self.sparse_lambda
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            raise ConfigError(f"sora: sparse_lambda must be a number >= 0 (0 turns the sparsity off), got {value!r}")


# ---- pure math -------------------------------------------------------------------------------

def soft_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """The proximal operator of ``threshold * |.|_1``: shrink toward 0 by ``threshold``, exactly 0 inside it."""
    return torch.sign(values) * torch.clamp(values.abs() - threshold, min=0)


# ---- module ----------------------------------------------------------------------------------

class SoraLinear(FactoredUpdate, LoraLinear):
    """LoRA with a gate between the factors: ``s * B diag(g) A``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__(base, r, alpha, dropout, rslora, init)
        w = self.lora_A.weight
        self.gate = nn.Parameter(torch.randn(r, device=w.device, dtype=w.dtype))

    def factors(self):
        return self.gate[:, None] * self.lora_A.weight, self.lora_B.weight, self.scaling

    def effective_rank(self) -> int:
        return int(torch.count_nonzero(self.gate))


Config = SoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: SoraConfig, name: str) -> nn.Module:
    return SoraLinear(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)


# ---- training hook and report ----------------------------------------------------------------

def after_step(model: nn.Module, name: str, config: SoraConfig, step: int, total_steps: int,
               lr: float | None = None) -> None:
    """The proximal step: soft-threshold every gate by ``sparse_lambda * lr``."""
    if lr is None:
        raise ConfigError("sora: the gate's proximal step needs the step's learning rate; call "
                          "peftlab.core.adapters.after_step(model, step, total_steps, lr=...)")
    with torch.no_grad():
        for _, module in core.method_adapters(model, name, "sora"):
            module.gate.copy_(soft_threshold(module.gate, config.sparse_lambda * lr))


def effective_ranks(model: nn.Module, name: str = "default") -> dict:
    """``{module name: number of open (nonzero) gates}`` of adapter ``name``."""
    require_state(model).check_known([name])
    return {module_name: module.effective_rank() for module_name, module in core.method_adapters(model, name, "sora")}
