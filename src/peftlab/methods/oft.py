"""OFT: Orthogonal Finetuning (Qiu et al., NeurIPS 2023, "Controlling Text-to-Image Diffusion by
Orthogonal Finetuning", arXiv:2306.07280).

A frozen weight ``W`` (out x in) is turned by a trained orthogonal matrix ``R`` (in x in) that
acts on the layer's input, as in HF PEFT::

    y = W (R^T x) + b,   i.e.  W' = W R^T,   R = diag(R_1, ..., R_k) block-diagonal,
    R_i = Cayley(Q_i) = (I - Q_i)(I + Q_i)^{-1},   Q_i = -Q_i^T  (b x b, b = block size, k b = in)

Each ``Q_i`` is stored as its ``b (b - 1) / 2`` upper-triangle entries (PEFT's ``oft_R.weight``,
``k x b(b-1)/2``). Every output neuron's weight row is turned by the same orthogonal ``R``, so the
angles between neurons (``W' W'^T = W W^T``, the paper's hyperspherical energy) are those of the
pretrained layer. The entries start at zero, so ``R = I`` and the model is exactly the base at
step 0. ``W' = W R^T`` is a weight, so OFT merges (unmerge solves with ``R^T`` blockwise). The
forward turns the input block by block (``in b`` multiply-adds a row), as PEFT does: a training
step of a 576 x 576 layer on 512 rows, one core, takes 11.6 ms (PEFT 12.3) with the Neumann form
and 15.4 ms (PEFT 15.1) with the exact one.

Cayley-Neumann: by default (``use_cayley_neumann=True``, PEFT 0.21.2's default) the inverse is
replaced, as in PEFT, by a truncated Neumann series, ``R_i = I + 2 Q + 2 Q^2 + ... + 2 Q^{n-2} +
Q^{n-1}`` (``n = num_cayley_neumann_terms``, 5), which is orthogonal only up to ``O(||Q||^n)``
(below 1e-6 for the small rotations fine-tuning makes) but needs no matrix solve. This series
approximates ``(I + Q)(I - Q)^{-1}``, the transpose of the exact mode's ``(I - Q)(I + Q)^{-1}``,
exactly as in PEFT: the same parameters turn the other way in the two modes, and files move
between the libraries with the mode they were trained with.

Block size: ``block_size`` (PEFT's ``oft_block_size``) or ``r`` (the number of blocks; PEFT's
``r``), not both; it must divide every adapted layer's ``in_features``, else attaching fails
naming the layer. Left unset (both 0, the default), it is PEFT's default 32 where 32 divides the
width and otherwise the nearest divisor of the width (PEFT's own fallback, lower one on a tie:
16 for a 16-wide layer, 24 for 48), so the defaults attach to any width and match a PEFT file
written with PEFT's defaults. PEFT adjusts explicit values too, with a warning; peftlab refuses
them clearly instead (a PEFT file whose tensors show an adjusted explicit size is refused on load).

Reads and writes HF PEFT's ``OFT`` format exactly (``formats/hf_oft.py``): ``oft_R.weight`` per
layer, and ``coft`` / ``eps`` (constrained OFT: each ``Q_i`` is projected in place onto the ball
of radius ``eps / sqrt(k)`` before each use, as PEFT does), ``block_share`` (one ``Q`` for every
block), ``use_cayley_neumann``, ``num_cayley_neumann_terms`` mean what they mean there.
Differences from HF PEFT:
- defaults are PEFT's except ``targets``, which is peftlab's ``all-linear``;
- ``nn.Linear`` only (quantized linear bases included); PEFT's ``Conv2d``, ``Embedding`` and
  GPT-2 ``Conv1D`` layers are refused clearly;
- ``module_dropout`` sets ``int(p k)`` random blocks of ``R`` to the identity in each training
  call, as PEFT's config describes; PEFT 0.21.2 builds that dropout layer but its ``Linear``
  never calls it (the setting has no effect there), so with ``module_dropout > 0`` training
  differs from PEFT's (evaluation is the same).
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

CATEGORY = "reparameterized"
PAPER = "Qiu et al., 2023 (arXiv:2306.07280)"
MERGEABLE = True
INVALID_SETTINGS = ("r=-1", "block_size=-4", "module_dropout=1.5", "eps=0", "num_cayley_neumann_terms=0", "coft=maybe")
# the trained numbers are rotation angles that start at zero (an SST-2 run at this rate is still to be measured)
DEFAULT_LR = 1e-3  # SST-2, seed 0: 0.776 at 1e-3; at 1e-2 the Neumann-series rotation runs away and stays at the majority class (0.509), peft's twin alike
# a rotation keeps norms, so on a tiny random model (weights at 0.02) it barely moves the loss; at a pretrained
# scale it trains fast (12 steps at 1e-2: loss x0.14 llama, x0.05 bert; at 0.02 scale x0.94 / x0.98)
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
DEFAULT_BLOCK_SIZE = 32  # PEFT's oft_block_size


@dataclass
class OftConfig(MethodConfig):
    """block_size: side of each orthogonal block (must divide in_features); r: number of blocks
    instead (in_features / r each); neither: 32 or the nearest divisor of the width;
    module_dropout: training-time fraction of blocks set to the identity; coft / eps: constrained
    OFT (rotations kept within eps of the identity); block_share: one block for all;
    use_cayley_neumann / num_cayley_neumann_terms: the Neumann-series Cayley transform (PEFT's default)."""

    method: ClassVar[str] = "oft"
    r: int = 0
    block_size: int = 0
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        for key in ("r", "block_size"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"oft: {key} must be a non-negative integer (0: unset), got {value!r}")
        if self.r and self.block_size:
            raise ConfigError(f"oft: give r (number of blocks, {self.r}) or block_size ({self.block_size}), not both: "
                              "r x block_size is the layer's in_features")
        p = self.module_dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ConfigError(f"oft: module_dropout must be in [0, 1), got {p!r}")
        for key in ("coft", "block_share", "use_cayley_neumann"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"oft: {key} must be true or false, got {getattr(self, key)!r}")
        eps = self.eps
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps > 0):
            raise ConfigError(f"oft: eps (COFT's radius) must be a positive number, got {eps!r}")
        n = self.num_cayley_neumann_terms
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ConfigError(f"oft: num_cayley_neumann_terms must be a positive integer, got {n!r}")

    def block_size_for(self, in_features: int, module_name: str = "") -> int:
        """The block size of a layer with ``in_features`` inputs (ConfigError where the setting does not divide it)."""
        where = f"'{module_name}'" if module_name else "a layer"
        if self.r:
            if in_features % self.r:
                raise ConfigError(f"oft: r={self.r} blocks do not divide the {in_features} inputs of {where}; choose r "
                                  f"dividing every adapted width, or leave r and block_size unset (automatic)")
            return in_features // self.r
        if self.block_size:
            if in_features % self.block_size:
                raise ConfigError(f"oft: block_size={self.block_size} does not divide the {in_features} inputs of {where}; "
                                  "choose a divisor of every adapted width, or leave it unset (automatic)")
            return self.block_size
        return nearest_divisor(in_features, DEFAULT_BLOCK_SIZE)


def nearest_divisor(width: int, wanted: int) -> int:
    """The divisor of ``width`` nearest ``wanted`` (the lower one on a tie; ``width`` itself when
    ``wanted >= width``): PEFT's ``adjust_oft_parameters``."""
    if wanted >= width:
        return width
    lower = next(d for d in range(wanted, 0, -1) if width % d == 0)
    higher = next(d for d in range(wanted, width + 1) if width % d == 0)
    return lower if wanted - lower <= higher - wanted else higher


# ---- pure math -------------------------------------------------------------------------------

def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(k x b(b-1)/2) upper-triangle entries -> (k x b x b) skew-symmetric ``Q`` (``Q[i, j] = vec``, i < j)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], block_size, block_size)
    upper = upper.index_put((torch.arange(vec.shape[0], device=vec.device)[:, None], rows, cols), vec)
    return upper - upper.transpose(-2, -1)


def cayley(Q: torch.Tensor, neumann: bool = True, terms: int = 5) -> torch.Tensor:
    """Orthogonal blocks from skew ``Q`` (k x b x b): exact ``(I - Q)(I + Q)^{-1}``, or PEFT's
    Neumann form ``I + 2 Q + ... + 2 Q^{n-2} + Q^{n-1}`` (``n = terms``; 1: ``I``, 2: ``I + 2 Q``,
    3: as 4, as in PEFT) of ``(I + Q)(I - Q)^{-1}``."""
    eye = torch.eye(Q.shape[-1], device=Q.device, dtype=Q.dtype).expand_as(Q)
    if not neumann:
        return torch.linalg.solve(eye + Q, eye - Q, left=False)
    if terms == 1:
        return eye.clone()
    if terms == 2:
        return eye + 2 * Q
    power = Q @ Q  # as PEFT: terms=3 gives the series of terms=4
    R = eye + 2 * Q + 2 * power
    for _ in range(3, terms - 1):
        power = power @ Q
        R = R + 2 * power
    return R + power @ Q


def project_coft(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT: each block's ``Q`` scaled onto the ball ``||Q||_F <= eps / sqrt(k)`` where it lies outside (PEFT's rule)."""
    radius = eps / math.sqrt(vec.shape[0])
    norm = torch.linalg.vector_norm(skew(vec, block_size), dim=(1, 2))[:, None]
    return torch.where(norm <= radius, vec, vec * (radius / norm))


def rotate(x: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``x @ diag(R_1, ..., R_k)`` over the last dimension (R: k x b x b)."""
    k, b, _ = R.shape
    return torch.einsum("...kb,kbc->...kc", x.reshape(*x.shape[:-1], k, b), R).reshape(x.shape)


def block_diagonal(R: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*R.unbind(0))


def rotate_weight(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """The merged weight ``W R^T`` (W: out x in; R: k blocks)."""
    k, b, _ = R.shape
    return torch.einsum("okc,kbc->okb", W.reshape(W.shape[0], k, b), R).reshape(W.shape)


def unrotate_weight(W: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``W (R^T)^{-1}`` blockwise (a solve, not a transpose: the Neumann form is orthogonal only nearly)."""
    k, b, _ = R.shape
    blocks = W.reshape(W.shape[0], k, b).transpose(0, 1)  # k x out x b
    return torch.linalg.solve(R.transpose(-2, -1), blocks, left=False).transpose(0, 1).reshape(W.shape)


def block_dropout(R: torch.Tensor, p: float) -> torch.Tensor:
    """``int(p k)`` random blocks of ``R`` replaced by the identity (a shared block is left alone)."""
    k, b, _ = R.shape
    dropped = int(p * k)
    if k == 1 or dropped == 0:
        return R
    mask = torch.zeros(k, 1, 1, device=R.device, dtype=R.dtype)
    mask[torch.randperm(k, device=R.device)[:dropped]] = 1
    return (1 - mask) * R + mask * torch.eye(b, device=R.device, dtype=R.dtype)


# ---- module ----------------------------------------------------------------------------------

class SkewBlocks(nn.Module):
    """Holds the trained entries as ``weight`` (k x b(b-1)/2; one row with block_share), so the
    adapter's state dict is PEFT's ``oft_R.weight``."""

    def __init__(self, rows: int, block_size: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, block_size * (block_size - 1) // 2, device=device, dtype=dtype))


class OftLinear(nn.Module):
    """OFT for ``nn.Linear``: the layer sees ``x diag(R_1 .. R_k)``."""

    def __init__(self, base: nn.Module, block_size: int, config: OftConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.block_size, self.blocks = block_size, self.in_features // block_size
        self.module_dropout, self.coft, self.eps = config.module_dropout, config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.oft_R = SkewBlocks(1 if config.block_share else self.blocks, block_size, w.device, dtype)
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def rotation_blocks(self) -> torch.Tensor:
        """The k orthogonal blocks (k x b x b), after COFT's in-place projection where it is on."""
        weight = self.oft_R.weight
        if self.coft:
            with torch.no_grad():
                projected = project_coft(weight, self.block_size, self.eps)
                if not torch.equal(projected, weight):
                    weight.copy_(projected)
        R = cayley(skew(weight, self.block_size), self.neumann, self.terms)
        return R.expand(self.blocks, -1, -1) if R.shape[0] != self.blocks else R

    def rotation(self) -> torch.Tensor:
        """``R`` (in x in), block-diagonal."""
        return block_diagonal(self.rotation_blocks())

    def _rotated(self, x):
        R = self.rotation_blocks()
        if self.training and self.module_dropout > 0:
            R = block_dropout(R, self.module_dropout)
        return rotate(x.to(R.dtype), R).to(x.dtype)

    def forward(self, x, base_out):
        # W (x R - x): the change of the output, bias counted once (by the base); exactly 0 at R = I
        return F.linear(self._rotated(x) - x, base_weight(self.__dict__["_base_ref"]).to(x.dtype))

    def fused_forward(self, base: nn.Module, x):
        return base(self._rotated(x))

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            set_base_weight(base, rotate_weight(W.to(self.oft_R.weight.dtype), self.rotation_blocks()).to(W.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            set_base_weight(base, unrotate_weight(W.to(self.oft_R.weight.dtype), self.rotation_blocks()).to(W.dtype))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = OftConfig


def refuse_non_linear(method: str, module: nn.Module, name: str) -> None:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"{method}: '{name}' is a {type(module).__name__}; peftlab's {method} adapts nn.Linear layers only "
                          "(HF PEFT's also takes Conv2d and GPT-2's Conv1D, which peftlab does not yet); "
                          "leave it out with 'exclude' or choose other targets")


def can_wrap(module: nn.Module) -> bool:
    # Conv1D is matched too, so that naming one gives the clear refusal of make_adapter, not "nothing matched"
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def make_adapter(module: nn.Module, config: OftConfig, name: str) -> nn.Module:
    refuse_non_linear("oft", module, name)
    in_features = base_weight(module).shape[1]
    return OftLinear(module, config.block_size_for(in_features, name), config)
