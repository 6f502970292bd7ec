"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al., ICML 2024, arXiv:2402.09353).

DoRA splits a weight into a magnitude and a direction: ``W' = m * (W + s B A) / ||W + s B A||``
where the norm is taken per output row (the columns of ``W`` in the paper's d x k notation) and
``m`` starts at ``||W||``, so the layer equals the base at step 0. LoRA updates the direction,
``m`` trains freely. As the paper recommends (section 4.3), the norm is treated as a constant in
backprop, which saves memory at no cost in accuracy. The layer is mergeable: ``W'`` replaces ``W``.

Forward, with ``y = W x`` the base output without bias::

    delta = (m / norm - 1) * y + (m / norm) * s * B A x

On ``nn.Conv1d/2d/3d`` (``DoraConv``, as HF PEFT's conv variant) the norm runs over each output
channel's whole kernel and ``m`` is stored as ``(1, out, 1...)``, the shape PEFT saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.targets import is_linear
from ..errors import ConfigError
from .lora import LoraConfig, LoraConv, LoraLinear, base_weight, is_conv, set_base_weight

CATEGORY = "reparameterized"
PAPER = "Liu et al., 2024 (arXiv:2402.09353)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "init=pissa")


@dataclass
class DoraConfig(LoraConfig):
    """The LoRA settings; DoRA adds a trainable magnitude per output feature."""

    method: ClassVar[str] = "dora"

    def validate(self) -> None:
        super().validate()
        if self.init == "pissa":
            raise ConfigError("dora: init=pissa is not supported; use init=default or gaussian")


def weight_norm(weight: torch.Tensor, lora_delta: torch.Tensor) -> torch.Tensor:
    """Per-output-row L2 norm of ``W + delta`` (weight in out x in layout)."""
    return torch.linalg.vector_norm(weight + lora_delta, dim=1)


class DoraLinear(LoraLinear):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default"):
        super().__init__(base, r, alpha, dropout, rslora, init)
        with torch.no_grad():
            magnitude = weight_norm(base_weight(base), self.delta_weight())
        self.lora_magnitude_vector = nn.Parameter(magnitude.clone())

    def _scale(self, base) -> torch.Tensor:
        norm = weight_norm(base_weight(base), self.delta_weight().detach()).detach()
        return self.lora_magnitude_vector / norm

    def forward(self, x, base_out):
        base = self._base()
        scale = self._scale(base)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            plain = F.linear(x, base_weight(base))
        else:
            plain = base_out if base.bias is None else base_out - base.bias
        lora = self.lora_B(self.lora_A(x) * self.scaling)
        return (scale - 1) * plain + scale * lora

    fused_forward = None  # DoRA needs the base output itself; no fused path

    def _base(self):
        base = self.__dict__.get("_base_ref")
        if base is None:
            raise RuntimeError("DoraLinear used outside an AdapterLayer")
        return base

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            merged = W + self.delta_weight()
            norm = torch.linalg.vector_norm(merged, dim=1)
            self.register_buffer("_merged_norm", norm, persistent=False)
            set_base_weight(base, merged * (self.lora_magnitude_vector / norm)[:, None])

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            original = W / (self.lora_magnitude_vector / self._merged_norm)[:, None] - self.delta_weight()
            set_base_weight(base, original)
            del self._merged_norm

    def hf_state(self):
        tensors, r, alpha = super().hf_state()
        tensors["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return tensors, r, alpha


class DoraConv(LoraConv):
    """DoRA on ``nn.Conv1d/2d/3d`` (as HF PEFT's conv variant): the norm is taken per output channel over
    the whole kernel (in x k...), and the magnitude is stored as ``(1, out, 1...)`` so it broadcasts over
    the conv output, as in PEFT's files. Grouped convolutions are refused: their LoRA update is no
    kernel of the base's shape, so ``||W + s B A||`` has no meaning there."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default"):
        if base.groups > 1:
            raise ConfigError(f"dora: a {type(base).__name__} with groups={base.groups} cannot take DoRA (its LoRA update is "
                              "no kernel of the base's shape, so the weight norm is undefined); use lora on it, or leave it "
                              "out of the targets")
        super().__init__(base, r, alpha, dropout, rslora, init)
        with torch.no_grad():
            magnitude = self._norm(base.weight, self.delta_weight())
        self.lora_magnitude_vector = nn.Parameter(magnitude.clone())

    @staticmethod
    def _norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Per-output-channel L2 norm of ``W + delta``, shaped (1, out, 1...)."""
        norm = torch.linalg.vector_norm(weight + delta, dim=tuple(range(1, weight.dim())))
        return norm.view(1, -1, *([1] * (weight.dim() - 2)))

    def forward(self, x, base_out):
        base = self._base()
        scale = self.lora_magnitude_vector / self._norm(base.weight, self.delta_weight().detach()).detach()
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            plain = base._conv_forward(x, base.weight, None)
        else:
            plain = base_out if base.bias is None else base_out - base.bias.view(1, -1, *([1] * (base_out.dim() - 2)))
        return (scale - 1) * plain + scale * self.lora_B(self.lora_A(x)) * self.scaling

    _base = DoraLinear._base

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            merged = base.weight + self.delta_weight()
            norm = self._norm(base.weight, self.delta_weight())
            self.register_buffer("_merged_norm", norm, persistent=False)
            base.weight.data.copy_(merged * (self.lora_magnitude_vector / norm).transpose(0, 1))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            factor = (self.lora_magnitude_vector / self._merged_norm).transpose(0, 1)
            base.weight.data.copy_(base.weight / factor - self.delta_weight())
            del self._merged_norm

    def hf_state(self):
        tensors, r, alpha = super().hf_state()
        tensors["lora_magnitude_vector"] = self.lora_magnitude_vector.detach()
        return tensors, r, alpha


Config = DoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module) or is_conv(module)


def make_adapter(module: nn.Module, config: DoraConfig, name: str) -> nn.Module:
    kind = DoraConv if is_conv(module) else DoraLinear
    adapter = kind(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)
    adapter.__dict__["_base_ref"] = module  # a plain reference, not a submodule
    return adapter
