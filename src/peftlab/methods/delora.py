"""DeLoRA: Decoupled Low-rank Adaptation (Bini et al., ICLR 2025, "Decoupling Angles and Strength
in Low-rank Adaptation", arXiv:2503.18225).

LoRA's update ``B A`` mixes two things, which way the weight moves and how far, and its norm can
grow without limit as training goes on (which is why LoRA is touchy about its learning rate and
long schedules). DeLoRA normalizes each rank-one piece of the update and gives the strength to one
trained scalar ``lambda`` per layer::

    delta W = (lambda / r) B Xi A Sigma_W,   Xi = diag(1 / (||b_i|| ||a_i||)),
    Sigma_W = diag(||W[:, 1]||, ..., ||W[:, in]||)

with ``b_i`` the columns of ``B`` (out x r), ``a_i`` the rows of ``A`` (r x in) and ``Sigma_W`` the
frozen weight's column norms (taken once, when the adapter is made, and kept as a buffer). Each
``b_i a_i^T / (||b_i|| ||a_i||)`` has Frobenius norm 1, so ``||(lambda / r) B Xi A||_F <= lambda``
and, with the column scaling, ``||delta W||_F <= lambda ||W||_F`` (also ``<= lambda max_j
||W[:, j]||``): the fine-tuned weight stays within a ball around the pretrained one whose radius
is proportional to ``||W||``, whatever ``A`` and ``B`` do; only ``lambda`` sets how far, the
factors only which way (rescaling ``a_i`` or ``b_i`` leaves ``delta W`` unchanged). The paper
writes the scale as ``lambda ||W|| / r``; HF PEFT (whose DeLoRA came from the authors' own
PEFT-based code) applies the weight norm per input column as written above, and this file follows
PEFT, so files move between the two unchanged; the bound ``lambda ||W||_F`` holds either way. ``B`` starts at zero, so the model is exactly the
base at step 0 (the norms are clamped below at 1e-4, as in PEFT, so the zero ``B`` is defined);
``delta W`` is a weight, so DeLoRA merges into ``W``.

Reads and writes HF PEFT's ``DELORA`` format exactly (``formats/hf_delora.py``): ``delora_A``,
``delora_B``, ``delora_lambda`` (1,) and the buffer ``delora_w_norm`` (in,) per layer; ``r``,
``rank_pattern``, ``lambda_pattern`` mean what they mean there, ``lambda_init`` is PEFT's
``delora_lambda`` (the initial boundary) and ``dropout`` its ``module_dropout``. Differences from
HF PEFT:
- defaults are PEFT's (r 8, no dropout) except ``targets`` (peftlab's ``all-linear``) and the
  starting boundary, ``lambda_init`` 1 where PEFT's ``delora_lambda`` is 15. The update reaches
  full strength as soon as ``B`` leaves zero (one step), and its bound grows like ``lambda`` times a
  column norm of ``W``, i.e. ``lambda / sqrt(in)`` relative to ``||W||_F``: 15 is about a quarter of
  ``||W||`` on the 3B-parameter Llama HF PEFT's method comparison uses (in 3072), but three quarters
  on MiniLM (in 384) and two thirds on SmolLM2-135M (in 576), where it wrecks the model on the first
  step. On SST-2 (MiniLM, seed 0, rate 1e-2) lambda 15 stayed at the majority class (0.509, rates
  1e-2 and 5e-2, PEFT's twin alike); lambda 3 reached 0.780 and lambda 1 0.818. Large models can
  set ``lambda_init=15`` to get PEFT's default;
- PEFT's ``module_dropout`` is, despite its name, ordinary dropout on the adapter's input (an
  ``nn.Dropout`` on ``x``); peftlab does the same and calls it ``dropout``;
- quantized linear bases work here (the column norms of the dequantized weight; a merge
  requantizes), where PEFT refuses them; ``nn.Linear`` only, GPT-2's ``Conv1D`` refused clearly;
  ``bias`` training has no setting here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import _pattern_value, base_weight
from .lowrank import FactoredUpdate
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Bini et al., 2025 (arXiv:2503.18225)"
MERGEABLE = True
# HF PEFT's DeLoRA guide: "a learning rate 10-100x larger than for standard LoRA variants (typical values
# from 1e-3/1e-2)"; 10x peftlab's LoRA rate (1e-3)
DEFAULT_LR = 1e-2
# the bound is the point: 12 steps on the random tiny test models move the loss in proportion to lambda
# (at 1: -2.1% on the Llama, -1.1% on the BERT), so the property tests give it room to show a 3% drop
EXAMPLE_SETTINGS = "lambda_init=4"
INVALID_SETTINGS = ("r=0", "lambda_init=nan", "dropout=1.5", "init=zeros", "rank_pattern=3", "lambda_pattern=3")
INITS = ("default", "random")
NORM_FLOOR = 1e-4  # PEFT's clamp of ||a_i|| and ||b_i||


@dataclass
class DeloraConfig(MethodConfig):
    """r: rank; lambda_init: the boundary lambda each layer starts with (trained; PEFT's delora_lambda);
    dropout on the adapter's input (PEFT's module_dropout); init: default (B = 0: the base model) or
    random (PEFT's init_weights=False); rank_pattern / lambda_pattern: per-module r / lambda keyed by a
    module-name suffix or regex."""

    method: ClassVar[str] = "delora"
    r: int = 8
    lambda_init: float = 1.0  # PEFT: 15 (sized for billion-parameter models; see the module docstring)
    dropout: float = 0.0
    init: str = "default"
    rank_pattern: dict = field(default_factory=dict)
    lambda_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        for key in ("rank_pattern", "lambda_pattern"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"delora: {key} must map module names (suffixes or regexes) to values, "
                                  f"e.g. {{'down_proj': 4}}; got {value!r}")
            for k in value:
                try:
                    re.compile(k)
                except re.error as error:
                    raise ConfigError(f"delora: {key} key {k!r} is not a valid regex ({error})") from None
        ranks = [self.r, *self.rank_pattern.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise ConfigError(f"delora: rank r must be a positive integer, got {ranks}")
        lambdas = [self.lambda_init, *self.lambda_pattern.values()]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in lambdas):
            raise ConfigError(f"delora: lambda_init (the boundary, PEFT suggests about 10-15) must be a finite number, "
                              f"got {lambdas}")
        p = self.dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ConfigError(f"delora: dropout must be in [0, 1), got {p!r}")
        if self.init not in INITS:
            raise ConfigError(f"delora: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def lambda_for(self, module_name: str) -> float:
        return float(_pattern_value(self.lambda_pattern, module_name, self.lambda_init))


# ---- pure math -------------------------------------------------------------------------------

def column_norms(W: torch.Tensor) -> torch.Tensor:
    """``||W[:, j]||`` for each input column j (W: out x in), in float32."""
    return torch.linalg.vector_norm(W.float(), dim=0)


def scales(A: torch.Tensor, B: torch.Tensor, lam: torch.Tensor, r: int) -> torch.Tensor:
    """(r,) ``lambda / r / (||a_i|| ||b_i||)``, each norm clamped below at 1e-4."""
    a = torch.linalg.vector_norm(A, dim=1).clamp(min=NORM_FLOOR)
    b = torch.linalg.vector_norm(B, dim=0).clamp(min=NORM_FLOOR)
    return lam / r / (a * b)


def delta_weight(A, B, lam, r: int, w_norm) -> torch.Tensor:
    """``(lambda / r) B Xi A diag(w_norm)`` in (out x in) layout."""
    return (B * scales(A, B, lam, r)) @ A * w_norm


# ---- module ----------------------------------------------------------------------------------

class DeloraLinear(FactoredUpdate, nn.Module):
    """DeLoRA for ``nn.Linear``: the update is one low-rank product, ``B' A'`` with ``A' = A diag(w)``
    and ``B' = B diag(lambda / r / (||a_i|| ||b_i||))``, so the forward, LoRA's fused kernel, the
    delta and merging come from ``FactoredUpdate`` through ``factors()``."""

    def __init__(self, base: nn.Module, r: int, lambda_init: float, dropout: float = 0.0, init: str = "default"):
        super().__init__()
        W = base_weight(base)
        self.out_features, self.in_features = W.shape
        device, dtype = base.weight.device, (base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32)
        self.r = r
        A, B = torch.empty(r, self.in_features), torch.empty(self.out_features, r)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as PEFT (and LoRA's A)
        if init == "random":  # PEFT's init_weights=False: the update is not zero at step 0
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        else:
            nn.init.zeros_(B)
        self.delora_A = nn.Parameter(A.to(device, dtype))
        self.delora_B = nn.Parameter(B.to(device, dtype))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(lambda_init), device=device, dtype=dtype))
        # the pretrained weight's column norms, taken once: saved with the adapter (as PEFT), so
        # merging never changes them and unmerging is exact
        self.register_buffer("delora_w_norm", column_norms(W.detach()).to(device, dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        A, B = self.delora_A, self.delora_B
        return A * self.delora_w_norm, B * scales(A, B, self.delora_lambda, self.r), 1.0


# ---- method protocol -------------------------------------------------------------------------

Config = DeloraConfig


def make_adapter(module: nn.Module, config: DeloraConfig, name: str) -> nn.Module:
    refuse_non_linear("delora", module, name)
    return DeloraLinear(module, config.rank_for(name), config.lambda_for(name), config.dropout, config.init)
