"""DeFT: Decompositional Efficient Fine-Tuning (NeurIPS 2025, "DEFT: Decompositional Efficient
Fine-Tuning for Text-to-Image Models"), with PaRa (Chen et al., 2024, "PaRa: Personalizing
Text-to-Image Diffusion via Parameter Rank Reduction", arXiv:2406.05641) as its ``para`` variant.

A frozen weight ``W`` (out x in) is not added to but rewritten: a rank-``r`` subspace of its output
space is projected out and new content is injected into it::

    W' = (I - P_proj) W + Q_P (s R)

with two trained matrices, the direction ``P`` (out x r) and the injection ``R`` (r x in), and
``s = alpha / r`` (1 when ``alpha`` is unset). The projector comes from ``P`` by one of two rules
(``decomposition``): ``relu`` (the default): ``Q_P = P``, ``P_proj = P relu(P)^T`` (not orthogonal);
``qr``: ``Q_P`` the orthonormal ``Q`` of ``P``, ``P_proj = Q_P Q_P^T`` (an orthogonal projector).
Writing ``P_proj = Q_P B^T`` (``B`` = relu(P) or ``Q_P``), the update is rank ``r``::

    delta W = W' - W = Q_P (s R - B^T W)

so the layer never forms an out x out projector: its extra work is a rank-r LoRA's plus the small
``B^T W`` (r x in). That is what the forward computes (in float32, as HF PEFT), and what merges.
``para=true`` is PaRa: no ``R``, the update is the pure removal ``-P_proj W`` and only ``P`` trains.

Init (HF PEFT's ``init_weights=True``, peftlab's ``init=identity``): ``P ~ N(0, 0.02)`` and
``R = B^T W / s``, so ``delta W = 0`` and the model is exactly the base at step 0 while the
gradient reaches both factors. ``init=random`` (PEFT's ``init_weights=False``, the paper's original
start, where a subspace is replaced from the first step) draws ``R ~ N(0, 0.02 * init_scale)``.
PaRa has no identity start.

The update depends on the base weight itself, so merging is exact but unmerging cannot read the
update back from the merged weight: merge keeps the small factor ``B^T W`` of the weight it merged
into (r x in, not saved) and unmerge subtracts the update rebuilt from it (as HF PEFT does). As for
DoRA, a second DeFT adapter on the same layer reads whatever weight the layer has, so merging one
adapter changes the other's update: merge them one at a time only where that is meant.

Reads and writes HF PEFT's ``DEFT`` format exactly (``formats/hf_deft.py``). Differences from HF PEFT:
- defaults are PEFT's (r=8, relu, alpha unset, the identity init, no dropout) except ``targets``
  (peftlab's ``all-linear``); ``r`` above a layer's output width is capped there, as PEFT does;
- ``alpha`` must be unset or positive (PEFT reads ``alpha=0`` as unset);
- ``nn.Linear`` only (quantized linear bases included: their dequantized weight is ``W``); GPT-2's
  ``Conv1D`` (PEFT's ``fan_in_fan_out``) is refused clearly; ``bias`` training has no setting here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "DEFT, NeurIPS 2025; PaRa: Chen et al., 2024 (arXiv:2406.05641)"
MERGEABLE = True
# Neither the paper's text-to-image recipe nor HF PEFT's docs give a rate for text models. On SST-2 (peftlab
# bench, MiniLM, 2026-12-03) 5e-3 sent seeds 1 and 2 to the majority class, peftlab's and HF PEFT's twin alike
# (seed 0: 0.680 / 0.725); 1e-3 reached 0.792 on seed 0.
DEFAULT_LR = 1e-3
EXAMPLE_LR = 5e-3  # the tiny random test models: twelve steps at 1e-3 lower the loss by 0.4% (P starts at std 0.02)
INVALID_SETTINGS = ("r=0", "decomposition=svd", "alpha=0", "para=maybe", "dropout=1", "init=zeros", "init_scale=0")
DECOMPOSITIONS = ("relu", "qr")
INITS = ("identity", "random")
INIT_STD = 0.02  # P's (and a random R's) standard deviation, PEFT's


@dataclass
class DeftConfig(MethodConfig):
    """r: rank of the removed / injected subspace (capped at a layer's output width);
    decomposition: relu (P relu(P)^T, the default) or qr (an orthogonal projector);
    alpha: the injection's scale is alpha / r (unset: 1); para: PaRa, removal only (no R);
    dropout: on the injection's input; init: identity (the base at step 0) or random
    (R ~ N(0, 0.02 * init_scale), the paper's original start)."""

    method: ClassVar[str] = "deft"
    r: int = 8
    decomposition: str = "relu"
    alpha: float | None = None
    para: bool = False
    dropout: float = 0.0
    init: str = "identity"
    init_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"deft: r must be a positive integer, got {self.r!r}")
        if self.decomposition not in DECOMPOSITIONS:
            raise ConfigError(f"deft: decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {self.decomposition!r}")
        a = self.alpha
        if a is not None and not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0):
            raise ConfigError(f"deft: alpha must be unset (scale 1) or a positive number (scale alpha / r), got {a!r}")
        if not isinstance(self.para, bool):
            raise ConfigError(f"deft: para must be true or false, got {self.para!r}")
        d = self.dropout
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
            raise ConfigError(f"deft: dropout must be in [0, 1), got {d!r}")
        if self.init not in INITS:
            raise ConfigError(f"deft: init must be one of {', '.join(INITS)}, got {self.init!r}")
        s = self.init_scale
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0):
            raise ConfigError(f"deft: init_scale must be a positive number (it scales a random R's std), got {s!r}")

    @property
    def identity(self) -> bool:
        return self.init == "identity" and not self.para


# ---- pure math -------------------------------------------------------------------------------

def projection_factors(P: torch.Tensor, decomposition: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q_P, B)`` (out x r each, float32) with ``P_proj = Q_P B^T``: ``(P, relu(P))`` or ``(Q, Q)``, ``Q`` from QR."""
    P = P.float()
    if decomposition == "qr":
        Q = torch.linalg.qr(P).Q
        return Q, Q
    return P, torch.relu(P)


def projector(P: torch.Tensor, decomposition: str) -> torch.Tensor:
    """``P_proj`` (out x out), dense (for tests and inspection; the layer never forms it)."""
    Q, B = projection_factors(P, decomposition)
    return Q @ B.T


def update_from_factor(Q: torch.Tensor, factor: torch.Tensor, R: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``delta W = Q (s R - factor)``, or ``-Q factor`` without ``R`` (PaRa); ``factor = B^T W``."""
    return -(Q @ factor) if R is None else Q @ (R.float() * scale - factor)


def delta_weight(W, P, R, decomposition: str, scale: float) -> torch.Tensor:
    """``(I - P_proj) W + Q_P s R - W`` in float32 (``R`` None: PaRa's ``-P_proj W``)."""
    Q, B = projection_factors(P, decomposition)
    return update_from_factor(Q, B.T @ W.float(), R, scale)


# ---- module ----------------------------------------------------------------------------------

class DeftLinear(nn.Module):
    """DeFT for ``nn.Linear``: returns ``x delta W^T`` (the injection's input through dropout);
    ``deft_P`` (out x r) and ``deft_R`` (r x in, absent for PaRa) are PEFT's tensors."""

    def __init__(self, base: nn.Module, config: DeftConfig):
        super().__init__()
        W = base_weight(base)
        self.out_features, self.in_features = W.shape
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.r = min(config.r, self.out_features)
        self.decomposition, self.para = config.decomposition, config.para
        self.scale = config.alpha / self.r if config.alpha else 1.0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule
        P = torch.randn(self.out_features, self.r) * INIT_STD
        self.deft_P = nn.Parameter(P.to(W.device, dtype))
        self.deft_R = None
        if not config.para:
            if config.init == "identity":  # R = B^T W / s: delta W = 0
                _, B = projection_factors(self.deft_P.detach(), self.decomposition)
                R = (B.T @ W.detach().float()) / self.scale
            else:
                R = torch.randn(self.r, self.in_features) * (INIT_STD * config.init_scale)
            self.deft_R = nn.Parameter(R.to(W.device, dtype))

    def _weight(self) -> torch.Tensor:
        return base_weight(self.__dict__["_base_ref"])

    def delta_weight(self) -> torch.Tensor:
        """``delta W`` (out x in) in the base weight's dtype."""
        W = self._weight()
        return delta_weight(W, self.deft_P, self.deft_R, self.decomposition, self.scale).to(W.dtype)

    def forward(self, x, base_out):
        # x delta W^T = (s drop(x) R^T - x (B^T W)^T) Q^T: two rank-r paths, in float32 as PEFT
        Q, B = projection_factors(self.deft_P, self.decomposition)
        x32 = x.float()
        h = -F.linear(x32, B.T @ self._weight().float())
        if self.deft_R is not None:
            h = h + F.linear(self.dropout(x32), self.deft_R.float()) * self.scale
        return F.linear(h, Q).to(x.dtype)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W + delta W``; None where it does not apply (dropout in
        training, a quantized base, mixed dtypes)."""
        if (type(base) is not nn.Linear or x.dtype != base.weight.dtype or x.dtype != self.deft_P.dtype
                or (self.training and not isinstance(self.dropout, nn.Identity))):
            return None
        return F.linear(x, base.weight + self.delta_weight(), base.bias)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            Q, B = projection_factors(self.deft_P, self.decomposition)
            factor = B.T @ W.float()  # kept: unmerge cannot read it back from the merged weight
            self.register_buffer("_merged_factor", factor, persistent=False)
            set_base_weight(base, W + update_from_factor(Q, factor, self.deft_R, self.scale).to(W.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            Q, _ = projection_factors(self.deft_P, self.decomposition)
            set_base_weight(base, W - update_from_factor(Q, self._merged_factor, self.deft_R, self.scale).to(W.dtype))
            del self._merged_factor

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = DeftConfig


def make_adapter(module: nn.Module, config: DeftConfig, name: str) -> nn.Module:
    refuse_non_linear("deft", module, name)
    return DeftLinear(module, config)
