"""GraLoRA: Granular Low-Rank Adaptation (Jung et al., 2025, arXiv:2505.20355).

LoRA's one rank-r product ``B A`` over the whole weight lets a few input channels with large
activations dominate every output's gradient. GraLoRA cuts the frozen weight ``W`` (out x in) into
a ``k x k`` grid of blocks and gives each block its own low-rank pair of rank ``s = r / k``::

    delta W[block j, n] = scale * B_j^(n) A_n^(j),   A_n^(j): s x (in / k),  B_j^(n): (out / k) x s

(output block ``j``, input block ``n``), with ``scale = alpha / (r + hybrid_r)``. The ``k^2``
pairs hold ``k^2 s (in + out) / k = r (in + out)`` numbers, LoRA's count at rank r, but the
update's rank can reach ``k r`` (each of the k block rows has rank up to r). With ``hybrid_r > 0``
a plain LoRA pair of that rank over the whole weight is added (Hybrid GraLoRA), under the same
scale. Every ``A`` starts Kaiming-uniform and every ``B`` at zero, so the model is exactly the base
model at step 0; the update is a weight, so it merges into ``W``.

The pairs are stored as HF PEFT stores them, so files map tensor for tensor: ``gralora_A``
(k, in / k, r) holds, for input block ``n``, the k matrices ``A_n^(j)`` side by side (columns
``j s ... (j + 1) s``); ``gralora_B`` (k, r, out / k) holds, for output block ``j``, the k
matrices ``B_j^(n)`` stacked (rows ``n s ... (n + 1) s``). The forward never forms ``delta W``:
each input block goes through its ``A`` once (k r numbers per row), the result is regrouped by
output block, and each output block reads its ``B`` once.

Reads and writes HF PEFT's ``GRALORA`` format exactly (``formats/hf_gralora.py``); ``r``,
``alpha``, ``gralora_k``, ``hybrid_r`` mean what they mean there. Differences from HF PEFT:
- defaults are PEFT's (r=32, alpha=64, gralora_k=2, hybrid_r=0) except ``targets`` (peftlab's
  ``all-linear``); PEFT's ``gralora_dropout`` is ``dropout`` here and one dropout mask feeds
  both the block pairs and the hybrid pair (PEFT draws one for each);
- PEFT's ``init_weights=False`` (B random too: not the base at step 0, "for testing") has no
  setting here; a file written with it loads all the same (its values are in the file);
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D``, which PEFT takes with
  ``fan_in_fan_out``, is refused with a clear error, as is a layer whose widths ``k`` does not
  divide (PEFT refuses it too); ``bias`` training has no setting here.
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
from .lora import MergesDelta, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Jung et al., 2025 (arXiv:2505.20355)"
MERGEABLE = True
# LoRA's rate: GraLoRA keeps LoRA's parameter count and scale (alpha / r = 2) and the paper trains it
# with the LoRA rates of each benchmark; peftlab's LoRA family uses 1e-3
DEFAULT_LR = 1e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INVALID_SETTINGS = ("r=0", "gralora_k=0", "r=5", "hybrid_r=-1", "alpha=0", "dropout=1.5")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GraloraConfig(MethodConfig):
    """r: the block pairs' total rank (LoRA's parameter count at rank r; each of the k x k blocks
    gets rank r / k); gralora_k: blocks per side (the paper: 2 up to rank 32, 4 above); hybrid_r:
    rank of an extra plain LoRA pair (0: none); alpha: scale numerator (alpha / (r + hybrid_r));
    dropout: on the adapter's input."""

    method: ClassVar[str] = "gralora"
    r: int = 32
    alpha: float = 64
    gralora_k: int = 2
    hybrid_r: int = 0
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not (_is_int(self.r) and self.r > 0):
            raise ConfigError(f"gralora: rank r must be a positive integer, got {self.r!r}")
        if not (_is_int(self.gralora_k) and self.gralora_k > 0):
            raise ConfigError(f"gralora: gralora_k (blocks per side) must be a positive integer, got {self.gralora_k!r}")
        if self.r % self.gralora_k:
            raise ConfigError(f"gralora: r={self.r} is not divisible by gralora_k={self.gralora_k} (each block gets "
                              f"rank r / gralora_k); choose r as a multiple of gralora_k")
        if not (_is_int(self.hybrid_r) and self.hybrid_r >= 0):
            raise ConfigError(f"gralora: hybrid_r must be a non-negative integer (0: no plain LoRA part), got {self.hybrid_r!r}")
        a = self.alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a > 0):
            raise ConfigError(f"gralora: alpha must be a positive number (scale = alpha / (r + hybrid_r)), got {a!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"gralora: dropout must be in [0, 1), got {self.dropout!r}")


# ---- pure math -------------------------------------------------------------------------------

def block_delta(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The unscaled block-wise update (out x in) from ``A`` (k, in/k, r) and ``B`` (k, r, out/k):
    block (j, n) = ``B[j, n s:(n+1) s].T @ A[n, :, j s:(j+1) s].T``."""
    k, in_block, r = A.shape
    out_block, s = B.shape[2], r // k
    a = A.reshape(k, in_block, k, s)       # [n, i, j, t]
    b = B.reshape(k, k, s, out_block)      # [j, n, t, o]
    return torch.einsum("jnto,nijt->joni", b, a).reshape(k * out_block, k * in_block)


def delta_weight(A, B, scale: float, A_general=None, B_general=None) -> torch.Tensor:
    """``scale * (block_delta(A, B) + B_general @ A_general)`` in (out x in) layout."""
    delta = block_delta(A, B)
    if A_general is not None:
        delta = delta + B_general @ A_general
    return delta * scale


def block_forward(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x @ block_delta(A, B).T`` without forming the update: each input block through its A,
    regrouped by output block, each output block through its B."""
    k, in_block, r = A.shape
    s = r // k
    h = torch.einsum("...ni,nir->...nr", x.reshape(*x.shape[:-1], k, in_block), A)  # [..., n, (j, t)]
    h = h.reshape(*h.shape[:-1], k, s).transpose(-3, -2)                             # [..., j, n, t]
    out = torch.einsum("...jr,jro->...jo", h.reshape(*h.shape[:-3], k, r), B)
    return out.reshape(*out.shape[:-2], -1)


# ---- module ----------------------------------------------------------------------------------

class GraloraLinear(MergesDelta, nn.Module):
    """GraLoRA for ``nn.Linear``: returns ``scale * (block_delta x + B_general A_general x)``."""

    def __init__(self, base: nn.Module, r: int, alpha: float, k: int, hybrid_r: int = 0, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r, self.alpha, self.k, self.hybrid_r = r, alpha, k, hybrid_r
        self.scaling = alpha / (r + hybrid_r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_block, out_block = self.in_features // k, self.out_features // k
        A = torch.empty(k, r, in_block)
        for block in A:  # each input block's A: Kaiming-uniform over its own fan-in, as LoRA's A
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.gralora_A = nn.Parameter(A.transpose(1, 2).contiguous().to(w.device, dtype))
        self.gralora_B = nn.Parameter(torch.zeros(k, r, out_block, device=w.device, dtype=dtype))
        if hybrid_r:
            self.gralora_A_general = nn.Linear(self.in_features, hybrid_r, bias=False, device=w.device, dtype=dtype)
            self.gralora_B_general = nn.Linear(hybrid_r, self.out_features, bias=False, device=w.device, dtype=dtype)
            nn.init.zeros_(self.gralora_B_general.weight)

    def delta_weight(self) -> torch.Tensor:
        hybrid = (self.gralora_A_general.weight, self.gralora_B_general.weight) if self.hybrid_r else ()
        return delta_weight(self.gralora_A, self.gralora_B, self.scaling, *hybrid)

    def forward(self, x, base_out):
        x = self.dropout(x.to(self.gralora_A.dtype))
        out = block_forward(x, self.gralora_A, self.gralora_B)
        if self.hybrid_r:
            out = out + F.linear(F.linear(x, self.gralora_A_general.weight), self.gralora_B_general.weight)
        return out * self.scaling


# ---- method protocol -------------------------------------------------------------------------

Config = GraloraConfig


def make_adapter(module: nn.Module, config: GraloraConfig, name: str) -> nn.Module:
    refuse_non_linear("gralora", module, name)
    out_features, in_features = base_weight(module).shape
    k = config.gralora_k
    if in_features % k or out_features % k:
        raise ConfigError(f"gralora: '{name}' is {out_features} x {in_features}, which gralora_k={k} does not divide into "
                          f"{k} x {k} blocks; choose a gralora_k that divides both widths, or leave it out with 'exclude'")
    return GraloraLinear(module, config.r, config.alpha, k, config.hybrid_r, config.dropout)
