"""KronA: Parameter Efficient Tuning with Kronecker Adapter (Edalati et al., 2022, arXiv:2212.10650).

LoRA's update has rank at most r. A Kronecker product of two small matrices has rank
``rank(A) * rank(B)``, so KronA adapts a weight ``W`` (out x in) with

    delta W = s * (A kron B),    A: a1 x a2,  B: (out / a1) x (in / a2),

a full-rank update from about as many parameters as a low-rank one (``a_shape`` sets ``A``'s
shape; both of its numbers must divide the matching weight dimension). The product is never
formed in the forward: with the input row ``x`` read as an (a2 x b2) matrix ``X`` (row-major),
``(A kron B) x = vec(A X B^T)``, which costs two thin matmuls instead of an (out x in) weight.
``A`` starts at zero and ``B`` Kaiming-uniform, so the output equals the base at step 0 while
``A`` gets a gradient from the first step. Mergeable: at merge the Kronecker product is formed
once and added to ``W``. Targets default to every linear layer, as LoRA's; the paper adapts the
query and value projections (``targets=[queries,values]``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import is_linear
from ..errors import ConfigError
from .lora import MergesDelta, base_weight

CATEGORY = "reparameterized"
PAPER = "Edalati et al., 2022 (arXiv:2212.10650)"
MERGEABLE = True
# the Kronecker factors start small and stay there at LoRA's 1e-3 (SST-2 at the bench budget: majority
# class); 5e-3 reaches 0.776 and 2e-2 0.751 (seed 0)
DEFAULT_LR = 5e-3
INVALID_SETTINGS = ("a_shape=[0,4]", "a_shape=16", "a_shape=[5,5]", "scale=0")


@dataclass
class KronaConfig(MethodConfig):
    """a_shape: [a1, a2], the shape of the small factor ``A`` (a1 divides each target's output
    size and a2 its input size; ``B`` takes the rest); scale: the factor ``s``."""

    method: ClassVar[str] = "krona"
    a_shape: list = field(default_factory=lambda: [16, 16])
    scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        shape = self.a_shape
        if not (isinstance(shape, (list, tuple)) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ConfigError(f"krona: a_shape must be two positive integers [a1, a2] (the small factor's rows and "
                              f"columns), e.g. a_shape=[16,16]; got {shape!r}")
        if not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool) and self.scale > 0):
            raise ConfigError(f"krona: scale must be a positive number, got {self.scale!r}")


# ---- pure math -------------------------------------------------------------------------------

def kron_apply(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``x (A kron B)^T`` for every row of ``x`` without forming the product: each row read as
    an (a2 x b2) matrix ``X`` gives ``A X B^T`` (a1 x b1), read back as a row of a1 * b1."""
    rows = x.shape[:-1]
    X = x.reshape(*rows, A.shape[1], B.shape[1])
    return (A @ (X @ B.t())).reshape(*rows, A.shape[0] * B.shape[0])


def delta_weight(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The update ``s (A kron B)`` in (out x in) layout."""
    return torch.kron(A, B) * scale


def b_shape(weight_shape, a_shape, module_name: str) -> tuple[int, int]:
    """The shape of ``B`` for a weight of (out x in), or a ConfigError when ``a_shape`` does not divide it."""
    (out_features, in_features), (a1, a2) = weight_shape, a_shape
    if out_features % a1 or in_features % a2:
        raise ConfigError(
            f"krona: a_shape=[{a1},{a2}] does not divide '{module_name}', whose weight is {out_features} x "
            f"{in_features} (out x in); a1 must divide {out_features} and a2 must divide {in_features}, "
            "e.g. a_shape=[8,8], or leave this module out with 'exclude'"
        )
    return out_features // a1, in_features // a2


# ---- module ----------------------------------------------------------------------------------

class KronaLinear(MergesDelta, nn.Module):
    """Returns ``s (A kron B) x`` for ``nn.Linear`` and ``Conv1D``."""

    def __init__(self, base: nn.Module, a_shape, scale: float, module_name: str):
        super().__init__()
        rows, cols = b_shape(tuple(base_weight(base).shape), a_shape, module_name)
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.scale = scale
        self.krona_A = nn.Parameter(torch.zeros(*a_shape, device=w.device, dtype=dtype))
        self.krona_B = nn.Parameter(torch.empty(rows, cols, device=w.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.krona_B, a=math.sqrt(5))

    def forward(self, x, base_out):
        return kron_apply(x, self.krona_A, self.krona_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.krona_A, self.krona_B, self.scale)



Config = KronaConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: KronaConfig, name: str) -> nn.Module:
    return KronaLinear(module, config.a_shape, config.scale, name)
