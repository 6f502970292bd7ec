"""PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers (Zhong et al., 2024,
arXiv:2410.01870; first circulated as NEAT).

LoRA's update ``B A`` ignores the weight it is added to. PEANuT makes the update a function of
that weight: a small neural network ``f`` (the "tweaker") reads the frozen ``W`` (out x in) column
by column and writes the update::

    delta W^T = scaling * B(g(act(W^T A^T)))          (each of the ``in`` columns of W goes through f)

``A`` (r x out) projects a column of ``W`` down to ``r`` numbers, ``g`` is ``depth`` encoder layers
followed by ``depth`` decoder layers (each ``r x r``, each followed by ``act``, the decoders with a
U-Net-style skip from the matching encoder input), and ``B`` (out x r) projects back up. With an
identity activation and ``depth = 0`` the update is ``scaling * B A W``: a low-rank map applied to
the weight itself; the non-linearity is what lets a few parameters reach updates no fixed low-rank
pair reaches (the paper's expressiveness argument). ``B`` starts at zero (PEFT's
``init_weights=True``), so the model is exactly the base at step 0; ``A`` and the hidden layers
start as ``nn.Linear`` does (Kaiming uniform, a = sqrt 5).

``delta W`` is a weight, so PEANuT merges; because it depends on ``W``, the update merged is the
one computed from the weight before the merge, and unmerge takes that same update out again (it
is kept until then), rather than recomputing it from the merged weight. The forward builds
``delta W`` (in x out x r multiply-adds, a weight-sized cost, as in PEFT) and runs the layer as one
matmul with ``W + delta W``.

Reads and writes HF PEFT's ``PEANUT`` format exactly (``formats/hf_peanut.py``): per layer
``peanut_A.weight``, ``peanut_B.weight``, ``peanut_encoders.<i>.weight``,
``peanut_decoders.<i>.weight``; ``r``, ``depth``, ``act_fn`` (any key of transformers' ``ACT2FN``,
the same functions PEFT uses), ``scaling`` mean what they mean there. Differences from HF PEFT:
- defaults are PEFT's (r=32, depth=0, relu, scaling=1) except ``targets`` (peftlab's
  ``all-linear``; PEFT's default is LoRA's per-architecture list, q and v projections);
- ``init=kaiming`` is PEFT's ``init_weights=False`` (``B`` random too: not the base at step 0);
- ``nn.Linear`` only (quantized linear bases included: ``f`` reads the dequantized weight); GPT-2's
  ``Conv1D`` is refused clearly, as in PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight, set_base_weight
from .vera import can_wrap  # noqa: F401  (protocol: nn.Linear; Conv1D matched, so naming one gets the refusal below)

CATEGORY = "reparameterized"
PAPER = "Zhong et al., 2024 (arXiv:2410.01870)"
MERGEABLE = True
# B starts at zero and A at nn.Linear's init, as in LoRA, and PEFT gives no rate of its own: the LoRA family's
# 1e-3 (peftlab's fallback), to be measured on SST-2
DEFAULT_LR = 1e-3
# the tweaker reads W, so its first signal is as small as W: on a tiny random model (weights at 0.02) 12 steps at
# 1e-3 move the loss under 1%; at a pretrained scale (0.2) it trains as the registry tests expect
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
INVALID_SETTINGS = ("r=0", "depth=-1", "act_fn=swishy", "scaling=0", "init=ones")
INITS = ("zeros", "kaiming")


@dataclass
class PeanutConfig(MethodConfig):
    """r: hidden width of the tweaker network; depth: encoder (and decoder) layers between A and B;
    act_fn: its activation (a transformers ACT2FN name: relu, gelu, silu, tanh, linear, ...);
    scaling: the update's multiplier; init: zeros (B = 0, the base at step 0) or kaiming (B random)."""

    method: ClassVar[str] = "peanut"
    r: int = 32
    depth: int = 0
    act_fn: str = "relu"
    scaling: float = 1.0
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"peanut: r (the tweaker's hidden width) must be a positive integer, got {self.r!r}")
        if not (isinstance(self.depth, int) and not isinstance(self.depth, bool) and self.depth >= 0):
            raise ConfigError(f"peanut: depth (hidden layers per side) must be a non-negative integer, got {self.depth!r}")
        if not isinstance(self.act_fn, str) or self.act_fn not in ACT2FN:
            raise ConfigError(f"peanut: act_fn {self.act_fn!r} is not an activation transformers knows; choose one of "
                              f"{', '.join(sorted(ACT2FN))}")
        s = self.scaling
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s != 0):
            raise ConfigError(f"peanut: scaling must be a finite non-zero number, got {s!r}")
        if self.init not in INITS:
            raise ConfigError(f"peanut: init must be one of {', '.join(INITS)}, got {self.init!r}")


# ---- pure math -------------------------------------------------------------------------------

def delta_weight(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, encoders, decoders, act, scaling: float) -> torch.Tensor:
    """The update (out x in) the tweaker writes for ``W`` (out x in): ``A`` (r x out), ``B`` (out x r),
    ``encoders`` / ``decoders`` lists of (r x r) weights, ``act`` the activation."""
    h = act(W.t() @ A.t())  # in x r: every column of W, projected
    skips = []
    for E in encoders:
        skips.append(h)
        h = act(h @ E.t())
    for D, skip in zip(decoders, reversed(skips)):
        h = act(h @ D.t()) + skip
    return (h @ B.t()).t() * scaling


# ---- module ----------------------------------------------------------------------------------

class PeanutLinear(nn.Module):
    """PEANuT for ``nn.Linear``: returns ``delta W x`` with ``delta W = f(W)``."""

    def __init__(self, base: nn.Module, config: PeanutConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        kw = dict(bias=False, device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        r = config.r
        self.r, self.depth, self.act_fn, self.scaling = r, config.depth, config.act_fn, config.scaling
        self.peanut_A = nn.Linear(self.out_features, r, **kw)
        self.peanut_encoders = nn.ModuleList(nn.Linear(r, r, **kw) for _ in range(config.depth))
        self.peanut_decoders = nn.ModuleList(nn.Linear(r, r, **kw) for _ in range(config.depth))
        self.peanut_B = nn.Linear(r, self.out_features, **kw)
        if config.init == "zeros":  # the others keep nn.Linear's Kaiming-uniform start, as PEFT's
            nn.init.zeros_(self.peanut_B.weight)
        self.__dict__["_act"] = ACT2FN[config.act_fn]  # no parameters; not a submodule
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def delta_weight(self, W: torch.Tensor | None = None) -> torch.Tensor:
        """``f(W)`` (out x in) for the frozen weight (or ``W``), in the adapter's dtype."""
        A = self.peanut_A.weight
        W = base_weight(self.__dict__["_base_ref"]) if W is None else W
        return delta_weight(W.to(A.dtype), A, self.peanut_B.weight, [e.weight for e in self.peanut_encoders],
                            [d.weight for d in self.peanut_decoders], self.__dict__["_act"], self.scaling)

    def forward(self, x, base_out):
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta).to(x.dtype)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W + f(W)``; None where it does not apply."""
        if type(base) is not nn.Linear or x.dtype != self.peanut_A.weight.dtype or x.dtype != base.weight.dtype:
            return None
        return F.linear(x, base.weight + self.delta_weight(), base.bias)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            delta = self.delta_weight(W)
            self.register_buffer("_merged_delta", delta, persistent=False)  # what unmerge takes out again
            set_base_weight(base, W + delta.to(W.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            set_base_weight(base, W - self._merged_delta.to(W.dtype))
            del self._merged_delta

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = PeanutConfig


def make_adapter(module: nn.Module, config: PeanutConfig, name: str) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"peanut: '{name}' is a {type(module).__name__}; PEANuT (here and in HF PEFT) adapts nn.Linear "
                          "layers only; leave it out with 'exclude' or choose other targets")
    return PeanutLinear(module, config)
