"""Compacter: "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers" (Karimi Mahabadi et al.,
NeurIPS 2021, arXiv:2106.04647).

A bottleneck adapter spends ``2 d b`` parameters per layer on its two projections. Compacter
builds each projection as a parameterized hypercomplex multiplication (PHM) layer, a sum of ``n``
Kronecker products::

    W = sum_i  A_i (x) B_i,      A_i: n x n,   B_i: (out/n) x (in/n),   B_i = s_i t_i^T  (rank phm_rank)

The small "slow" matrices ``A_i`` capture what every adapter layer has in common and are SHARED by
all PHM layers of the model (one ``n x n x n`` tensor for the whole adapter); the "fast" ``B_i``
are per layer and low-rank, so a layer costs ``(in + out) * phm_rank`` weights instead of
``in * out``. On GLUE and SuperGLUE with T5 it matches full fine-tuning while training 0.047% of the
parameters. Compacter sits where Houlsby adapters sit (roles ``attn-out`` and ``ffn-out``);
Compacter++ (``compacterpp.py``) only after the FFN, as Pfeiffer adapters do.

``n`` must divide the model width and the bottleneck. By default it is the paper's 4, or the largest
smaller number that divides the width, and a bottleneck given by ``reduction`` is rounded up to a
multiple of ``n``, so the defaults fit any width; an ``n`` or ``bottleneck`` set by hand that does
not divide is an error. The shared ``A`` is one ``nn.Parameter``
registered in the first adapter (in module order) and used by reference in all others, so it
appears once in ``model.parameters()``, is trained by every layer's gradient and is saved once,
with that first adapter. The up-projection's ``s_i`` start at zero, so the model starts exactly
as the base model. Not mergeable: the nonlinearity between the projections cannot be folded into a
weight. Settings: ``n``, ``phm_rank`` and those of ``bottleneck.BottleneckConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.targets import is_linear
from ..errors import ConfigError
from . import bottleneck
from .bottleneck import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the property tests' model)
from .bottleneck import BottleneckAdapter, BottleneckConfig, out_width

CATEGORY = "additive"
PAPER = "Karimi Mahabadi et al., 2021 (arXiv:2106.04647)"
MERGEABLE = False
INVALID_SETTINGS = ("n=0", "phm_rank=0", "reduction=0", "activation=softmax")
EXAMPLE_SETTINGS = "reduction=4"  # a bottleneck of 8 on the tiny hidden-32 test models, divisible by n=4
PAPER_N = 4
DEFAULT_LR = 1e-2


@dataclass
class CompacterConfig(BottleneckConfig):
    """n: the PHM dimension (number of Kronecker terms, and the size of the shared A_i; unset: 4, or
    the largest smaller number dividing the model width); phm_rank: the rank of each B_i."""

    method: ClassVar[str] = "compacter"
    targets: Any = field(default_factory=lambda: ["attn-out", "ffn-out"])
    n: int | None = None
    phm_rank: int = 1

    def validate(self) -> None:
        super().validate()
        for key in ("n", "phm_rank"):
            value = getattr(self, key)
            if key == "n" and value is None:
                continue
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"{self.method}: {key} must be a positive integer, got {value!r}")

    def n_for(self, width: int) -> int:
        """The PHM dimension on a layer of ``width``: ``n`` as set, else the paper's 4 or the largest
        smaller divisor of the width."""
        return self.n or next(k for k in range(PAPER_N, 0, -1) if width % k == 0)

    def bottleneck_for(self, width: int) -> int:
        """A bottleneck set by hand as it is; one from ``reduction`` rounded up to a multiple of n."""
        size = super().bottleneck_for(width)
        if self.bottleneck is not None:
            return size
        n = self.n_for(width)
        return -(-size // n) * n


# ---- pure math ---------------------------------------------------------------------------------

def kronecker_sum(rule: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``sum_i kron(rule[i], blocks[i])``: rule (n, n, n), blocks (n, p, q) -> (n p, n q)."""
    n, p, q = blocks.shape
    return torch.einsum("iab,icd->acbd", rule, blocks).reshape(n * p, n * q)


def phm_weight(rule: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The PHM layer's (out x in) weight with ``B_i = s_i t_i``: s (n, out/n, r), t (n, r, in/n)."""
    return kronecker_sum(rule, s @ t)


# ---- modules -----------------------------------------------------------------------------------

class PHMLinear(nn.Module):
    """A linear layer whose weight is ``sum_i A_i (x) s_i t_i``; ``A`` (the shared rule) is passed in."""

    def __init__(self, width_in: int, width_out: int, n: int, rank: int, zero: bool, like: torch.Tensor):
        super().__init__()
        factory = dict(device=like.device, dtype=like.dtype)
        # Var(W) = n Var(A) r Var(s) Var(t) = 1 / width_in, PyTorch's default Linear scale, with Var(A) = 1/n
        self.s = nn.Parameter(torch.zeros(n, width_out // n, rank, **factory) if zero
                              else torch.randn(n, width_out // n, rank, **factory))
        self.t = nn.Parameter(torch.randn(n, rank, width_in // n, **factory) / math.sqrt(width_in * rank))
        self.bias = nn.Parameter(torch.zeros(width_out, **factory))

    def forward(self, x, rule):
        return F.linear(x, phm_weight(rule, self.s, self.t), self.bias)


class CompacterAdapter(BottleneckAdapter):
    def __init__(self, module: nn.Module, config: CompacterConfig, module_name: str):
        width = out_width(module)
        size = config.bottleneck_for(width)
        n = config.n_for(width)
        if width % n or size % n:
            raise ConfigError(f"{config.method}: n={n} must divide the model width ({width}) and the bottleneck ({size}); "
                              "choose n that divides both, or change bottleneck / reduction")
        like = module.weight if module.weight.dtype.is_floating_point else torch.zeros((), device=module.weight.device)
        down = PHMLinear(width, size, n, config.phm_rank, zero=False, like=like)
        up = PHMLinear(size, width, n, config.phm_rank, zero=True, like=like)
        super().__init__(down, up, config, module_name)
        # Every adapter starts with its own rule; after_attach makes all but the first use the first one's.
        self.phm_rule = nn.Parameter(torch.randn(n, n, n, device=like.device, dtype=like.dtype) / math.sqrt(n))

    @property
    def rule(self) -> torch.Tensor:
        owner = self.__dict__.get("rule_owner", self)
        return owner.phm_rule

    def use_rule_of(self, owner: "CompacterAdapter") -> None:
        del self.phm_rule
        self.__dict__["rule_owner"] = owner  # a plain reference, not a submodule: the rule is registered once

    def bottleneck(self, h):
        rule = self.rule
        return self.up(self.act(self.down(h, rule)), rule)


# ---- method protocol ---------------------------------------------------------------------------

Config = CompacterConfig
can_wrap = is_linear


def make_adapter(module: nn.Module, config: CompacterConfig, name: str) -> CompacterAdapter:
    return CompacterAdapter(module, config, name)


def after_attach(model: nn.Module, name: str, config: CompacterConfig) -> None:
    """Share the first adapter's A_i with every other layer of this adapter."""
    adapters = [adapter for _, adapter in bottleneck.family_adapters(model, name, config.method)]
    sizes = sorted({adapter.phm_rule.shape[0] for adapter in adapters})
    if len(sizes) > 1:
        raise ConfigError(f"{config.method}: the targeted layers have widths that need different n ({sizes}), but one "
                          f"A_i is shared by all of them; set n to a number that divides every width")
    for adapter in adapters[1:]:
        adapter.use_rule_of(adapters[0])
    bottleneck.after_attach(model, name, config)
