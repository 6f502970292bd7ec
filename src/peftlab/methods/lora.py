"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., ICLR 2022, arXiv:2106.09685).

A frozen weight ``W`` (out x in) is adapted by a trainable low-rank product: ``W + s * B @ A``
with ``A`` (r x in), ``B`` (out x r) and ``s = alpha / r``. ``B`` starts at zero, so the model is
exactly the base model at step 0, and the product can be folded into ``W`` after training
(merge) so inference costs nothing extra.

Variants here:
- rsLoRA (Kalajdzievski, 2023, arXiv:2312.03732): ``s = alpha / sqrt(r)``, which keeps the
  update's scale stable as the rank grows.
- PiSSA (Meng et al., 2024, arXiv:2404.02948): ``A`` and ``B`` start from the top-r singular
  vectors and values of ``W`` and the residual ``W - s B A`` stays in the base, so training
  moves the principal directions first. Saved adapters are converted to plain LoRA of rank 2r
  that applies to the original base (``B' A' = B A - B0 A0``), as HF PEFT does.
- LoftQ (Li et al., 2023, arXiv:2310.08659): on a base quantized with
  ``peftlab.quantize(model, "nf4", loftq_rank=r)``, ``s B A`` starts at the rank-r correction LoftQ
  chose together with the quantized weights (``quant/loftq.py``), so quantized base + LoRA starts
  near the full-precision model instead of at the quantized one.
- per-module ranks and alphas through ``rank_pattern`` / ``alpha_pattern``.

On a quantized base (``peftlab.quant``) merging dequantizes, adds and requantizes (see
``base_weight`` / ``set_base_weight``, which every method's merge goes through).

Wraps ``nn.Linear``, ``nn.Embedding`` and GPT-2's ``Conv1D`` (weight stored as in x out).
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
from ..core.targets import is_linear
from ..errors import ConfigError, TargetError
from ..quant.layers import is_quantized

CATEGORY = "reparameterized"
PAPER = "Hu et al., 2022 (arXiv:2106.09685)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "alpha=-1", "dropout=1.5", "init=svd")
INITS = ("default", "gaussian", "pissa", "loftq")


@dataclass
class LoraConfig(MethodConfig):
    """r: rank; alpha: scale numerator; dropout on the adapter input; rslora: alpha/sqrt(r);
    init: default (B = 0), gaussian, pissa, or loftq (on a LoftQ-quantized base); rank_pattern /
    alpha_pattern: per-module overrides keyed by a module-name suffix or regex, e.g. ``{"mlp.down_proj": 4}``."""

    method: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    init: str = "default"
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        for key in ("rank_pattern", "alpha_pattern"):
            value = getattr(self, key)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise ConfigError(f"{self.method}: {key} must map module names (suffixes or regexes) to values, "
                                  f"e.g. {{'down_proj': 4}}; got {value!r}")
        ranks = [self.r, *self.rank_pattern.values()]
        if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
            raise ConfigError(f"{self.method}: rank r must be a positive integer, got {ranks}")
        alphas = [self.alpha, *self.alpha_pattern.values()]
        if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 for a in alphas):
            raise ConfigError(f"{self.method}: alpha must be a positive number, got {alphas}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"{self.method}: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.rslora, bool):
            raise ConfigError(f"{self.method}: rslora must be true or false, got {self.rslora!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?(?:{key})$", module_name):
            return value
    return default


# ---- pure math -------------------------------------------------------------------------------

def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The update ``s * B @ A`` in (out x in) layout."""
    return (B @ A) * scale


def loftq_factors(base: nn.Module, r: int, scale: float):
    """``(A, B)`` with ``s * B @ A`` the rank-r part of the LoftQ correction ``W - Q`` that
    ``peftlab.quantize(..., loftq_rank)`` left on the quantized base (``quant/loftq.py``)."""
    L, R = getattr(base, "loftq_B", None), getattr(base, "loftq_A", None)
    if L is None:
        raise ConfigError("lora: init=loftq needs a base quantized with LoftQ, which chooses the quantized weights and the "
                          "LoRA init together: call peftlab.quantize(model, 'nf4', loftq_rank=r) on the full-precision "
                          "model first, then attach lora[init=loftq]")
    if r > R.shape[0]:
        raise ConfigError(f"lora: init=loftq with r={r}, but the base was quantized with loftq_rank={R.shape[0]}; "
                          f"use r <= {R.shape[0]} or quantize with loftq_rank={r}")
    root = math.sqrt(scale)
    return R[:r] / root, L[:, :r] / root


def pissa_factors(weight: torch.Tensor, r: int, scale: float):
    """Top-r SVD factors with ``s * B @ A = U_r S_r V_r^T`` (weight is out x in)."""
    U, S, Vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scale)
    A = root[:, None] * Vh[:r]
    B = U[:, :r] * root[None, :]
    return A.to(weight.dtype), B.to(weight.dtype)


class _FusedLoraLinear(torch.autograd.Function):
    """``x W^T + b + s (x A^T) B^T`` in two BLAS calls forward and backward.

    The unfused form adds the adapter output to the base output and scales it in separate
    full-width elementwise passes; here the adapter product accumulates into the base output
    (``addmm_``) and the scale is applied to the thin (N x r) tensor, which removes every
    full-width temporary from the training step.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2 = x.reshape(-1, x.shape[-1])
        xa = (x2 @ A.t()).mul_(scale)
        out = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        out.addmm_(xa, B.t())
        needs_x = ctx.needs_input_grad[1] or ctx.needs_input_grad[3]
        ctx.save_for_backward(x2 if needs_x else None, weight, A, B, xa)
        ctx.scale = scale
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, A, B, xa = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ B).mul_(ctx.scale)  # N x r
        dx = dW = db = dA = dB = None
        if ctx.needs_input_grad[0]:
            dx = (g @ weight).addmm_(gb, A).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dW = g.t() @ x2
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        if ctx.needs_input_grad[3]:
            dA = gb.t() @ x2
        if ctx.needs_input_grad[4]:
            dB = g.t() @ xa
        return dx, dW, db, dA, dB, None


# ---- modules ---------------------------------------------------------------------------------

class MergesDelta:
    """merge / unmerge for an adapter whose whole effect is a weight update ``delta_weight()``
    (out x in): LoRA and every variant whose update is a weight (AdaLoRA, KronA, DyLoRA, ...)."""

    def merge(self, base: nn.Module) -> None:
        set_base_weight(base, base_weight(base) + self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        set_base_weight(base, base_weight(base) - self.delta_weight())

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


class LoraLinear(MergesDelta, nn.Module):
    """LoRA for ``nn.Linear`` and ``Conv1D``: returns ``s * B A dropout(x)``."""

    alters_base = False  # True for PiSSA, whose init moves part of W into the adapter

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default"):
        super().__init__()
        self.transposed = not isinstance(base, nn.Linear)  # Conv1D stores (in x out)
        out_features, in_features = base_weight(base).shape
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = scaling(alpha, r, rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_features, r, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=base.weight.device, dtype=dtype)
        self.init = init
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
            if init == "loftq":
                A, B = loftq_factors(base, r, self.scaling)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
            if init == "pissa":
                if is_quantized(base):
                    raise ConfigError("lora: init=pissa rewrites the base weight in full precision (W - s B A), which a quantized "
                                      "base cannot hold without requantizing it; use init=loftq on a base quantized with "
                                      "peftlab.quantize(model, 'nf4', loftq_rank=r), or PiSSA on a full-precision model")
                A, B = pissa_factors(base_weight(base), r, self.scaling)
                self.lora_A.weight.copy_(A)
                self.lora_B.weight.copy_(B)
                self.register_buffer("pissa_A0", A.clone(), persistent=False)
                self.register_buffer("pissa_B0", B.clone(), persistent=False)
                self.alters_base = True
                set_base_weight(base, base_weight(base) - delta_weight(A, B, self.scaling))

    def forward(self, x, base_out):
        return self.lora_B(self.lora_A(self.dropout(x)) * self.scaling)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer's output in one fused op, or None where it does not apply."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.lora_A.weight.dtype:
            return None
        return _FusedLoraLinear.apply(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.lora_A.weight, self.lora_B.weight, self.scaling)

    # PiSSA only: the base holds W - s B0 A0, so rows not using this adapter add s B0 A0 back.
    def inactive_delta(self, x):
        return F.linear(F.linear(x, self.pissa_A0) * self.scaling, self.pissa_B0)

    def detach_from(self, base: nn.Module) -> None:
        """Called when the adapter is removed unmerged: give the base back what PiSSA took."""
        if self.alters_base:
            set_base_weight(base, base_weight(base) + delta_weight(self.pissa_A0, self.pissa_B0, self.scaling))

    def hf_state(self) -> tuple[dict, int, float]:
        """Tensors to save (HF PEFT names), with the rank and alpha they stand for.
        PiSSA is saved as the equivalent plain LoRA of rank 2r on the original base."""
        A, B = self.lora_A.weight.detach(), self.lora_B.weight.detach()
        if not self.alters_base:
            return {"lora_A.weight": A, "lora_B.weight": B}, self.r, self.alpha
        A2 = torch.cat([A, self.pissa_A0], 0)
        B2 = torch.cat([B, -self.pissa_B0], 1)
        alpha2 = self.alpha * (math.sqrt(2) if self.rslora else 2)
        return {"lora_A.weight": A2, "lora_B.weight": B2}, 2 * self.r, alpha2


class LoraEmbedding(nn.Module):
    """LoRA for ``nn.Embedding``: the update ``s * (B A)^T`` is a (vocab x dim) table of rank r."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False, init: str = "default"):
        super().__init__()
        if init in ("pissa", "loftq"):
            raise ConfigError(f"lora: init={init} applies to linear layers only; exclude the embedding or use init=default")
        self.r, self.alpha, self.rslora, self.init = r, alpha, rslora, init
        self.scaling = scaling(alpha, r, rslora)
        w = base.weight
        # A starts at zero and B random (as HF PEFT), so the output equals the base at step 0.
        self.lora_embedding_A = nn.Parameter(torch.zeros(r, base.num_embeddings, device=w.device, dtype=w.dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(base.embedding_dim, r, device=w.device, dtype=w.dtype))
        self.padding_idx = base.padding_idx

    def forward(self, ids, base_out):
        rows = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.padding_idx)
        return (rows @ self.lora_embedding_B.t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling

    def merge(self, base) -> None:
        base.weight.data += self.delta_weight()

    def unmerge(self, base) -> None:
        base.weight.data -= self.delta_weight()

    def detach_from(self, base) -> None:
        pass

    def hf_state(self):
        return {"lora_embedding_A": self.lora_embedding_A.detach(), "lora_embedding_B": self.lora_embedding_B.detach()}, self.r, self.alpha


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight in (out x in) layout, whatever the module stores (a quantized base: dequantized)."""
    if is_quantized(base):
        return base.dequantize()
    return base.weight.t() if type(base).__name__ == "Conv1D" else base.weight


def set_base_weight(base: nn.Module, value: torch.Tensor) -> None:
    """Make the base weight ``value`` (out x in). A quantized base requantizes it, which rounds it to
    the format's grid; the error this adds is recorded (``peftlab.quant.merge_report``)."""
    if is_quantized(base):
        base.requantize(value)
        return
    value = value.t() if type(base).__name__ == "Conv1D" else value
    base.weight.data.copy_(value)


# ---- method protocol -------------------------------------------------------------------------

Config = LoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def make_adapter(module: nn.Module, config: LoraConfig, name: str) -> nn.Module:
    kind = LoraEmbedding if isinstance(module, nn.Embedding) else LoraLinear
    return kind(module, config.rank_for(name), config.alpha_for(name), config.dropout, config.rslora, config.init)
