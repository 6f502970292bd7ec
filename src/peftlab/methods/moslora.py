"""MoSLoRA: Mixture-of-Subspaces in Low-Rank Adaptation (Wu et al., 2024, arXiv:2406.11909).

LoRA's update ``B A`` is a sum of r rank-one subspaces, each pairing column i of ``B`` with
row i of ``A`` only. MoSLoRA lets every pair of subspaces mix through a learnable r x r mixer
``M`` placed between the factors:

    delta W = s * B M A.

With ``M = I`` this is exactly LoRA; a learned ``M`` fuses the subspaces more flexibly at the
cost of r^2 parameters per module and one tiny matmul. ``A`` and ``B`` start as in LoRA
(``B = 0``, so the output equals the base at step 0) and ``M`` with Kaiming-uniform values,
the paper's choice (a zero mixer would block every gradient, since ``B`` starts at zero too).
Mergeable: ``B M A`` is an ordinary (out x in) low-rank matrix folded into the weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core.targets import is_linear
from .lora import LoraConfig, LoraLinear
from .lowrank import FactoredUpdate, reject_weight_inits

CATEGORY = "reparameterized"
PAPER = "Wu et al., 2024 (arXiv:2406.11909)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "dropout=1", "init=pissa")


@dataclass
class MosLoraConfig(LoraConfig):
    """The LoRA settings; MoSLoRA adds an r x r mixer per module."""

    method: ClassVar[str] = "moslora"

    def validate(self) -> None:
        super().validate()
        reject_weight_inits(self)


class MosLoraLinear(FactoredUpdate, LoraLinear):
    """LoRA with a mixer between the factors: ``s * B M A``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, rslora: bool, init: str):
        super().__init__(base, r, alpha, dropout, rslora, init)
        w = self.lora_A.weight
        # the mixer M, named as in the authors' code
        self.lora_AB = nn.Linear(r, r, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_AB.weight, a=math.sqrt(5))

    def factors(self):
        return self.lora_AB.weight @ self.lora_A.weight, self.lora_B.weight, self.scaling


Config = MosLoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: MosLoraConfig, name: str) -> nn.Module:
    return MosLoraLinear(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)
