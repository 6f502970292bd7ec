"""What the LoRA variants whose update is still one low-rank product share (not a registered method).

DyLoRA (a truncated rank), SoRA (a gate between the factors) and MoSLoRA (a mixer between them)
each compute an effective pair of factors ``A'`` (k x in), ``B'`` (out x k) and a scale from
their parameters; the update is ``scale * B' A'``, exactly LoRA's form. ``FactoredUpdate``
writes the forward, LoRA's fused forward, the delta and merging once in terms of ``factors()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lora import LoraConfig, MergesDelta, _FusedLoraLinear, delta_weight


class FactoredUpdate(MergesDelta):
    """Mixin for an adapter module with ``dropout`` and ``factors() -> (A', B', scale)``."""

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        raise NotImplementedError

    def forward(self, x, base_out):
        A, B, scale = self.factors()
        return F.linear(F.linear(self.dropout(x), A) * scale, B)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in LoRA's fused op (gradients reach the parameters through ``factors()``)."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity):
            return None
        A, B, scale = self.factors()
        if x.dtype != A.dtype:
            return None
        return _FusedLoraLinear.apply(x, base.weight, base.bias, A, B, scale)

    def delta_weight(self) -> torch.Tensor:
        A, B, scale = self.factors()
        return delta_weight(A, B, scale)



def reject_weight_inits(config: LoraConfig) -> None:
    """PiSSA and LoftQ start LoRA's plain ``s B A`` from the base weight; none of the variants'
    updates has that form at init."""
    if config.init in ("pissa", "loftq"):
        raise ConfigError(f"{config.method}: init={config.init} is not supported; use init=default or gaussian")
