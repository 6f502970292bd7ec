"""GLoRA: One-for-All: Generalized LoRA for Parameter-Efficient Fine-tuning (Chavan et al., 2023,
arXiv:2306.07967).

GLoRA puts one general "prompt module" on a frozen linear layer ``y = W x + b`` that can scale and
shift both its weight and its bias, so that LoRA, scaling-and-shifting (SSF), bias tuning and
prompt-like shifts are all special cases of one layer::

    W' = W + W (.) A + B            (A, B: out x in, broadcast from their type)
    b' = b + b (.) D + E + W C      (D, E: out; C: in x 1, so W C is out)

Each support tensor has a type that sets how many numbers it trains: ``lora`` (a rank-``r`` product
``Xd Xu``), ``vector`` (one value per output row, or per input column for C), ``constant`` (one
scalar) or ``none`` (zero, nothing trained). The paper searches a type per layer; like HF PEFT,
peftlab takes one type for A and B (``ab``), one for C (``c``) and one for D and E (``de``) for all
layers. The product ``W (.) A`` is elementwise (the authors' code and HF PEFT's; the paper writes
``W0 A``), so a ``vector`` A scales W's rows, a ``constant`` A scales all of W. The bias terms
(C, D, E) exist only on a layer that has a bias; elsewhere they are ``none``. ``W'`` and ``b'``
depend on the frozen W and b, but the update is linear in x and per row, so the layer returns
``x (W (.) A + B)^T + (b (.) D + E + W C)`` and merges into ``W`` and ``b``; unmerging divides by
``1 + A`` and ``1 + D`` (as HF PEFT does), so a merge where either has a zero entry is refused.
At init (``init=zeros``, PEFT's ``init_weights=True``) every ``lora`` path's ``Xd`` and every
vector and constant is zero: the model is the base model at step 0.

Reads and writes HF PEFT's ``GLORA`` format exactly (``formats/hf_glora.py``). Differences from HF
PEFT: the settings are named ``ab``, ``c``, ``de`` (PEFT's ``config_A_B``, ``config_C``,
``config_D_E``), and ``init=random`` is PEFT's ``init_weights=False``; ``targets`` defaults to
peftlab's ``all-linear``; PEFT's ``bias`` training (``all`` / ``glora_only``) has no setting here
(E already shifts the bias); ``nn.Linear`` only, as in PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, StateError
from .bitfit import feature_dtype, shift_bias
from .lora import base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear only, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Chavan et al., 2023 (arXiv:2306.07967)"
MERGEABLE = True
# Neither peft nor the paper's text fixes one rate (peft's config gives none). On SST-2 (peftlab bench,
# MiniLM, seed 0, 2026-12-03) 5e-3 sent both GLoRA and HF PEFT's twin to the majority class (0.509);
# 1e-3 reached 0.750.
DEFAULT_LR = 1e-3
EXAMPLE_LR = 5e-3  # the tiny random test models: 12 steps at 1e-3 move the loss by 1%
INVALID_SETTINGS = ("r=0", "ab=diagonal", "c=constant", "de=lora", "init=ones")
EXAMPLE_SETTINGS = "r=4,de=vector"  # a rank for hidden size 32; per-row bias scales and shifts on BERT
AB_TYPES = ("lora", "vector", "constant", "none")
C_TYPES = ("lora", "vector", "none")
DE_TYPES = ("vector", "constant", "none")
INITS = ("zeros", "random")


@dataclass
class GloraConfig(MethodConfig):
    """r: rank of every ``lora`` path; ab: type of A and B (the weight's scale and shift): lora,
    vector, constant or none; c: type of C (the bias's shift by W C): lora, vector or none; de: type
    of D and E (the bias's scale and shift): vector, constant or none; init: zeros (the base at step
    0) or random (PEFT's init_weights=False)."""

    method: ClassVar[str] = "glora"
    r: int = 8
    ab: str = "lora"
    c: str = "lora"
    de: str = "constant"
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"glora: r must be a positive integer (the rank of the lora paths), got {self.r!r}")
        for setting, allowed in (("ab", AB_TYPES), ("c", C_TYPES), ("de", DE_TYPES)):
            if getattr(self, setting) is None:  # the spec string reads "none" as None
                setattr(self, setting, "none")
            value = getattr(self, setting)
            if value not in allowed:
                raise ConfigError(f"glora: {setting} must be one of {', '.join(allowed)}, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"glora: init must be zeros (the base model at step 0) or random, got {self.init!r}")


# ---- pure math -------------------------------------------------------------------------------

def weight_delta(W, A, B):
    """``W' - W = W (.) A + B`` (out x in; A and B broadcast from their type, 0 for ``none``)."""
    return (W * A + B).expand_as(W)


def bias_delta(b, W, C, D, E):
    """``b' - b = b (.) D + E + W C`` (out; C is in x 1, or 0 for ``none``)."""
    shift = (W @ C).squeeze(-1) if torch.is_tensor(C) else 0.0
    return (b * D + E + shift).expand_as(b)


# ---- module ----------------------------------------------------------------------------------

class SupportTensor(nn.Module):
    """One of A..E: ``Xd Xu`` (lora), ``X`` (vector: ``shape``), ``X[0]`` (constant) or 0 (none)."""

    def __init__(self, kind: str, rows: int, cols: int, r: int, shape: tuple, init: str, device, dtype):
        super().__init__()
        self.kind = kind
        make = lambda *s: nn.Parameter(torch.zeros(*s, device=device, dtype=dtype))  # noqa: E731
        with torch.no_grad():
            if kind == "lora":
                self.Xd, self.Xu = make(rows, r), make(r, cols)
                nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))
                if init == "random":
                    nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))
            elif kind == "vector":
                self.X = make(*shape)
                if init == "random":
                    nn.init.kaiming_uniform_(self.X.view(1, -1) if self.X.dim() == 1 else self.X, a=math.sqrt(5))
            elif kind == "constant":
                self.X = make(1)
                if init == "random":
                    nn.init.normal_(self.X, std=0.02)

    def value(self):
        """The tensor (broadcastable to its place), or 0.0 for ``none``."""
        if self.kind == "lora":
            return self.Xd @ self.Xu
        if self.kind == "vector":
            return self.X
        return self.X[0] if self.kind == "constant" else 0.0


class GloraLinear(nn.Module):
    """GLoRA for ``nn.Linear``: returns ``x (W (.) A + B)^T + (b (.) D + E + W C)``."""

    def __init__(self, base: nn.Module, r: int, ab: str, c: str, de: str, init: str = "zeros"):
        super().__init__()
        out_features, in_features = base_weight(base).shape
        has_bias = getattr(base, "bias", None) is not None
        c, de = (c, de) if has_bias else ("none", "none")
        self.r, self.ab, self.c, self.de, self.init = r, ab, c, de, init
        kw = dict(r=r, init=init, device=base.weight.device, dtype=feature_dtype(base))
        self.glora_A = SupportTensor(ab, out_features, in_features, shape=(out_features, 1), **kw)
        self.glora_B = SupportTensor(ab, out_features, in_features, shape=(out_features, 1), **kw)
        self.glora_C = SupportTensor(c, in_features, 1, shape=(in_features, 1), **kw)
        self.glora_D = SupportTensor(de, out_features, 1, shape=(out_features,), **kw)
        self.glora_E = SupportTensor(de, out_features, 1, shape=(out_features,), **kw)
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.parameters(), None)
        return feature_dtype(self.__dict__["_base_ref"]) if first is None else first.dtype

    def deltas(self, base: nn.Module | None = None):
        """(delta W, delta b or None) for the base's current weight and bias."""
        base = self.__dict__["_base_ref"] if base is None else base
        W = base_weight(base).to(self.dtype)
        dW = weight_delta(W, self.glora_A.value(), self.glora_B.value())
        if not self.touches_bias(base):
            return dW, None
        b = base.bias.to(self.dtype)
        return dW, bias_delta(b, W, self.glora_C.value(), self.glora_D.value(), self.glora_E.value())

    def touches_bias(self, base: nn.Module) -> bool:
        return getattr(base, "bias", None) is not None and not (self.de == "none" and self.c == "none")

    def forward(self, x, base_out):
        dW, db = self.deltas()
        return F.linear(x.to(dW.dtype), dW, db)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W'`` and ``b'``; None where it does not apply."""
        if type(base) is not nn.Linear or x.dtype != base.weight.dtype:
            return None
        dW, db = self.deltas(base)
        if dW.dtype != x.dtype:
            return None
        bias = base.bias if db is None else base.bias + db
        return F.linear(x, base.weight + dW, bias)

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            for support, name in ((self.glora_A, "A"), (self.glora_D, "D")):
                value = support.value()
                if torch.is_tensor(value) and not (1 + value).all():
                    raise StateError(f"glora: an entry of 1 + {name} is exactly zero, so merging could not be undone; "
                                     "keep the adapter unmerged")
            dW, db = self.deltas(base)
            if db is not None:
                shift_bias(base, db.to(base.bias.dtype))
            set_base_weight(base, base_weight(base) + dW.to(base_weight(base).dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            merged = base_weight(base)
            A, B = self.glora_A.value(), self.glora_B.value()
            W = ((merged - B) / (1 + A)).to(merged.dtype)  # W' = W (1 + A) + B
            if self.touches_bias(base):  # b' = b (1 + D) + E + W C
                b = base.bias.to(self.dtype)
                shift = bias_delta(torch.zeros_like(b), W.to(self.dtype), self.glora_C.value(), 0.0, self.glora_E.value())
                restored = (b - shift) / (1 + self.glora_D.value())
                shift_bias(base, (restored - b).to(base.bias.dtype))
            set_base_weight(base, W)

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = GloraConfig


def make_adapter(module: nn.Module, config: GloraConfig, name: str) -> nn.Module:
    refuse_non_linear("glora", module, name)
    return GloraLinear(module, config.r, config.ab, config.c, config.de, config.init)
