"""UniPELT: A Unified Framework for Parameter-Efficient Language Model Tuning (Mao et al., ACL 2022,
arXiv:2110.07577).

Why: which PEFT method is best depends on the task and on how much data there is, and no single
method wins everywhere. UniPELT includes LoRA, prefix tuning and a bottleneck adapter in every
layer at once, each behind a learned gate, so training itself decides how much of each submodule
to use for the task at hand; in the paper it matches or beats the best of its parts on GLUE,
especially with little data.

What (the paper's placement and sizes as defaults):

- LoRA (rank ``r`` = 8) on the query and value projections, its update scaled by a gate
  ``g_L = sigmoid(W_L x)`` computed per token from the projection's input ``x``;
- a bottleneck adapter (width ``bottleneck`` = 48) after the FFN, as Pfeiffer's, its output scaled
  by ``g_A = sigmoid(W_A h)`` per token from the FFN output ``h`` it reads;
- prefix tuning (``length`` = 10 virtual tokens per layer, through the reparameterization MLP) with
  one gate per layer ``g_P = sigmoid(w_l)`` on the prefix's values, so the layer's attention
  reads ``g_P`` times the prefix's contribution. The paper computes ``g_P`` from the layer's input;
  here it is a learned per-layer scalar, because the prefix lives in the KV cache shared by the
  rows of a batch and an input-dependent scale there would make a padded row differ from the same
  row run alone. Folding the prefix (``fold(model)``, and saving, which writes the folded form)
  folds the gate into the values.

LoRA's update and the adapter start at zero, so only the prefix changes the output at init.
Mergeable: no (the LoRA and adapter gates depend on the input). Built from three gated parts
(``PARTS``), attached together as one adapter and saved in peftlab's format.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import is_linear
from .bottleneck import BottleneckAdapter, BottleneckConfig, linear_pair, out_width
from .lora import LoraConfig, LoraLinear
from .prefix import Prefix, PrefixConfig, make_prefix
from .prompting import EXAMPLE_MODEL_SETTINGS, fold  # noqa: F401  (the registry tests' model; fold drops the MLP)

CATEGORY = "hybrid"
PAPER = "Mao et al., 2022 (arXiv:2110.07577)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # the prefix is attended to from the first step
DEFAULT_LR = 5e-4  # the prefix MLP's; the paper trains UniPELT at 1e-4 to 5e-4
INVALID_SETTINGS = ("r=0", "length=0", "bottleneck=0")
EXAMPLE_SETTINGS = "length=4,hidden=16,bottleneck=8,r=4"


@dataclass
class UniPeltConfig(MethodConfig):
    """r / alpha / lora_targets: the gated LoRA; bottleneck / activation: the gated adapter after
    the FFN (``targets``, ``layers``, ``exclude`` place it and the LoRA); length / hidden: the
    gated prefix."""

    method: ClassVar[str] = "unipelt"
    targets: Any = "ffn-out"
    r: int = 8
    alpha: float = 16
    lora_targets: list = field(default_factory=lambda: ["queries", "values"])
    bottleneck: int = 48
    activation: str = "relu"
    length: int = 10
    hidden: int = 512

    def validate(self) -> None:
        super().validate()
        for part in expand(self):
            part.validate()


Config = UniPeltConfig


def expand(config: UniPeltConfig) -> list:
    placement = dict(exclude=config.exclude, layers=config.layers)
    return [
        GatedLoraConfig(targets=config.lora_targets, r=config.r, alpha=config.alpha, **placement),
        GatedAdapterConfig(targets=config.targets, bottleneck=config.bottleneck, activation=config.activation,
                           modules_to_save=config.modules_to_save, **placement),
        GatedPrefixConfig(length=config.length, hidden=config.hidden),
    ]


# ---- the gated parts ---------------------------------------------------------------------------

def gate(width: int, like: torch.Tensor) -> nn.Linear:
    """A per-token gate ``sigmoid(W x + b)`` reading ``width`` features (0.5 at a zero input)."""
    return nn.Linear(width, 1, device=like.device, dtype=like.dtype if like.dtype.is_floating_point else torch.float32)


@dataclass
class GatedLoraConfig(LoraConfig):
    method: ClassVar[str] = "unipelt_lora"


class GatedLora(LoraLinear):
    """LoRA whose update is scaled per token by ``sigmoid(W_L x)``."""

    method = "unipelt_lora"
    fused_forward = None

    def __init__(self, base: nn.Module, config: GatedLoraConfig, module_name: str):
        super().__init__(base, config.rank_for(module_name), config.alpha_for(module_name), config.dropout, config.rslora)
        self.gate = gate(self.lora_A.in_features, self.lora_A.weight)

    def forward(self, x, base_out):
        return torch.sigmoid(self.gate(x)) * super().forward(x, base_out)


@dataclass
class GatedAdapterConfig(BottleneckConfig):
    method: ClassVar[str] = "unipelt_adapter"


class GatedAdapter(BottleneckAdapter):
    """A serial bottleneck adapter whose output is scaled per token by ``sigmoid(W_A h)``."""

    def __init__(self, base: nn.Module, config: GatedAdapterConfig, module_name: str):
        width = out_width(base)
        down, up = linear_pair(width, config.bottleneck_for(width), width, base.weight)
        super().__init__(down, up, config, module_name)
        self.gate = gate(width, base.weight)

    def forward(self, x, base_out):
        return torch.sigmoid(self.gate(base_out)) * self.bottleneck(base_out)


@dataclass
class GatedPrefixConfig(PrefixConfig):
    method: ClassVar[str] = "unipelt_prefix"


class GatedPrefix(Prefix):
    """A prefix whose values are scaled by a learned gate per layer, ``sigmoid(w_l)``."""

    def __init__(self, stack: nn.Module, length: int, shape, hidden: int, factory: dict):
        super().__init__(stack, length, shape, hidden, factory)
        self.gate_logits = nn.Parameter(torch.zeros(shape.layers, **factory))

    def network_names(self) -> tuple:
        return (*super().network_names(), "gate_logits")

    def final(self) -> torch.Tensor:
        if self.folded:
            return super().final()
        flat = super().final()
        per_layer = flat.view(flat.shape[0], self.shape.layers, 2, self.shape.width)  # keys, values per layer
        scale = torch.stack([torch.ones_like(self.gate_logits), torch.sigmoid(self.gate_logits)], dim=1)
        return (per_layer * scale[:, :, None]).reshape(flat.shape)


def _layer_part(config_cls, adapter_cls):
    return SimpleNamespace(Config=config_cls, CATEGORY=CATEGORY, PAPER=PAPER, MERGEABLE=False, can_wrap=is_linear,
                           make_adapter=lambda module, config, name: adapter_cls(module, config, name))


PARTS = {
    "unipelt_lora": _layer_part(GatedLoraConfig, GatedLora),
    "unipelt_adapter": _layer_part(GatedAdapterConfig, GatedAdapter),
    "unipelt_prefix": SimpleNamespace(Config=GatedPrefixConfig, CATEGORY=CATEGORY, PAPER=PAPER, MERGEABLE=False,
                                      make_model_adapter=lambda model, config: make_prefix(model, config, config.hidden,
                                                                                           GatedPrefix)),
}
