"""HiRA: Hadamard High-Rank Adaptation (Huang et al., ICLR 2025, "HiRA: Parameter-Efficient Hadamard
High-Rank Adaptation for Large Language Models").

LoRA's update ``B A`` has rank at most ``r``, which the paper argues limits what a task can teach the
model. HiRA keeps LoRA's two small factors but multiplies their product entrywise by the frozen
weight itself::

    delta W = W ⊙ (B A),      W' = W + delta W = W ⊙ (1 + B A)

with ``A`` (r x in) and ``B`` (out x r) trained. The rank of a Hadamard product is bounded by the
product of the ranks, ``rank(W ⊙ BA) <= rank(W) * r``, so with a full-rank ``W`` the update can reach
full rank at LoRA's parameter count (the method's defining property; ``tests/test_hira.py`` checks it
by hand). The update also inherits ``W``'s pattern: an entry where ``W`` is zero never moves. There is
no ``alpha`` scaling. ``A`` starts as LoRA's (Kaiming-uniform) and ``B`` at zero, so the model is
exactly the base at step 0. ``delta W`` is a weight, so HiRA merges.

Merging turns ``W`` into ``W ⊙ (1 + B A)``, after which ``W ⊙ (B A)`` can no longer be computed from
the layer's weight; like HF PEFT, the adapter keeps a copy of the pre-merge weight while merged
(in memory only, never saved), computes its update from it and restores it on unmerge, so unmerging
is exact.

Reads and writes HF PEFT's ``HIRA`` format exactly (``formats/hf_hira.py``): ``hira_A`` (r x in) and
``hira_B`` (out x r) per layer; ``r``, ``rank_pattern`` mean what they mean there, ``dropout`` is
PEFT's ``hira_dropout`` and ``init`` its ``init_weights`` (``default`` True, ``gaussian`` "gaussian",
``random`` False). Differences from HF PEFT:
- defaults are PEFT's (r 32, no dropout) except ``targets`` (peftlab's ``all-linear``);
- ``rank_pattern`` works here; PEFT 0.21.2 accepts it but builds every layer at ``r`` (its
  dispatcher passes ``config.r``), so an adapter with a pattern is saved in peftlab's native format
  (PEFT could not load it) and PEFT's files are read at the ranks their tensors have;
- ``nn.Linear`` only (quantized linear bases included: the update multiplies the dequantized
  weight, where PEFT has a bitsandbytes layer); GPT-2's ``Conv1D`` and embeddings, which PEFT also
  takes, are refused clearly; ``bias`` training has no setting here;
- with two HiRA adapters on one layer and one of them merged, the other multiplies the layer's
  current (merged) weight, where PEFT keeps using the pre-merge weight for every adapter.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import _pattern_value, base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Huang et al., 2025 (ICLR 2025, HiRA)"
MERGEABLE = True
# HF PEFT's MetaMathQA benchmark runs HiRA (r 32) at 4.5e-3 (method_comparison/MetaMathQA/experiments/hira/
# llama-3.2-3B-rank32-lr4.5e-3), 45x the 1e-4 of its LoRA runs: the update B A is scaled entrywise by W, whose
# entries are small (std about 0.02), so B A must grow far larger than a LoRA product to move the model as much.
# On SST-2 (peftlab bench, MiniLM, 2026-12-03) 3e-2 reached 0.670 on seed 0 (HF PEFT's twin collapsed to the
# majority class on seed 2); 1e-2 reached 0.807 on seed 0.
DEFAULT_LR = 1e-2
EXAMPLE_LR = 3e-2  # the tiny random test models: 12 steps at 1e-2 move the loss by under 3%
INVALID_SETTINGS = ("r=0", "dropout=1.5", "init=zeros", "rank_pattern=3")
INITS = ("default", "gaussian", "random")


@dataclass
class HiraConfig(MethodConfig):
    """r: rank of B A (the update's rank can exceed it); dropout on the adapter's input (PEFT's
    hira_dropout); init: default (B = 0: the base model), gaussian (A ~ N(0, 1/r^2), B = 0) or random
    (both random, PEFT's init_weights=False: not the base at step 0); rank_pattern: per-module r keyed
    by a module-name suffix or regex."""

    method: ClassVar[str] = "hira"
    r: int = 32
    dropout: float = 0.0
    init: str = "default"
    rank_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        pattern = self.rank_pattern
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ConfigError(f"hira: rank_pattern must map module names (suffixes or regexes) to ranks, "
                              f"e.g. {{'down_proj': 8}}; got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as error:
                raise ConfigError(f"hira: rank_pattern key {k!r} is not a valid regex ({error})") from None
        ranks = [self.r, *pattern.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise ConfigError(f"hira: rank r must be a positive integer, got {ranks}")
        p = self.dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ConfigError(f"hira: dropout must be in [0, 1), got {p!r}")
        if self.init not in INITS:
            raise ConfigError(f"hira: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)


# ---- pure math -------------------------------------------------------------------------------

def delta_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W ⊙ (B A)`` in (out x in) layout, in the factors' dtype."""
    return W.to(A.dtype) * (B @ A)


def merged_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``W ⊙ (1 + B A)``: the layer's weight with the update folded in."""
    return W + delta_weight(W, A, B).to(W.dtype)


# ---- module ----------------------------------------------------------------------------------

class HiraLinear(nn.Module):
    """HiRA for ``nn.Linear``: returns ``(W ⊙ B A) dropout(x)``."""

    def __init__(self, base: nn.Module, r: int, dropout: float = 0.0, init: str = "default"):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        device, dtype = w.device, (w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r, self.init = r, init
        # PEFT's init_weights=False: both factors standard normal, not the base at step 0 (for debugging)
        A, B = torch.randn(r, self.in_features), torch.randn(self.out_features, r)
        if init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        elif init == "default":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if init != "random":
            nn.init.zeros_(B)
        self.hira_A = nn.Parameter(A.to(device, dtype))
        self.hira_B = nn.Parameter(B.to(device, dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._premerge = None  # the base weight before merging, held only while merged

    def _base(self) -> nn.Module:
        base = self.__dict__.get("_base_ref")
        if base is None:
            raise RuntimeError("HiraLinear used outside an AdapterLayer")
        return base

    def frozen_weight(self) -> torch.Tensor:
        """The ``W`` the update multiplies: the pre-merge copy while merged, else the base's weight."""
        return self._premerge if self._premerge is not None else base_weight(self._base())

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.frozen_weight().detach(), self.hira_A, self.hira_B)

    def forward(self, x, base_out):
        delta = self.delta_weight()
        return F.linear(self.dropout(x.to(delta.dtype)), delta)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W ⊙ (1 + B A)``; None where it does not apply."""
        if (type(base) is not nn.Linear or self.training and not isinstance(self.dropout, nn.Identity)
                or x.dtype != self.hira_A.dtype or x.dtype != base.weight.dtype):
            return None
        return F.linear(x, merged_weight(base.weight.detach(), self.hira_A, self.hira_B), base.bias)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base).detach().clone()
            set_base_weight(base, merged_weight(W, self.hira_A, self.hira_B))
            self._premerge = W

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            if self._premerge is not None:
                set_base_weight(base, self._premerge)
                self._premerge = None

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = HiraConfig


def make_adapter(module: nn.Module, config: HiraConfig, name: str) -> nn.Module:
    refuse_non_linear("hira", module, name)
    adapter = HiraLinear(module, config.rank_for(name), config.dropout, config.init)
    adapter.__dict__["_base_ref"] = module  # a plain reference, not a submodule
    return adapter
