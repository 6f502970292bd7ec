"""BOFT: Orthogonal Finetuning via Butterfly Factorization (Liu et al., ICLR 2024,
"Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization", arXiv:2311.06243).

OFT's orthogonal ``R`` made dense from sparse pieces: a product of ``m`` butterfly factors, each
a permuted block-diagonal orthogonal matrix, plus a trained scale per output feature, as in HF PEFT::

    y = s * (W (M^T x)) + b,   i.e.  W' = diag(s) W M^T,
    M = B_{m-1} ... B_1 B_0,   B_i = P_i diag(R_{i,1}, ..., R_{i,k}) P_i^T,
    R_{i,j} = (I - S)(I + S)^{-1},  S = (A - A^T) / 2   (A: the trained b x b block, exact Cayley)

``P_0 = I``; ``P_i`` (i >= 1) regroups the inputs so that factor i's blocks mix coordinates
``b 2^{i-1} / 2`` apart: in each run of ``b 2^i`` coordinates, the half-blocks (``b / 2`` each)
are reordered even ones first, then odd ones (PEFT's ``block_butterfly_perm``). With
``m = log2(k) + 1`` factors every input reaches every other and ``M`` is dense, from
``m k b^2`` numbers instead of ``in^2``. ``m = 1`` is OFT with a full (not upper-triangle) block
parameter and the output scale. Every factor is orthogonal, so is ``M``: the angles between the
neurons' weight rows are kept (up to the scale ``s``). ``A`` starts at zero and ``s`` at one, so
the model is exactly the base at step 0; ``W'`` merges.

The forward applies the factors to the input (two gathers and one batched block product per
factor, ``m k b^2`` multiply-adds a row) instead of forming the dense ``in x in`` ``M`` and
multiplying by it as PEFT does (``in^2`` a row); merging forms ``M`` once. A training step of a
576 x 576 layer on 512 rows, one core: 16 ms (block size 4) and 11 ms (8), PEFT's 56 and 57 ms.

Reads and writes HF PEFT's ``BOFT`` format exactly (``formats/hf_oft.py``): ``boft_R``
(m x k x b x b) and ``boft_s`` (out x 1) per layer, and ``block_size`` / ``block_num`` /
``n_butterfly_factor`` / ``dropout`` are PEFT's ``boft_block_size`` / ``boft_block_num`` /
``boft_n_butterfly_factor`` / ``boft_dropout`` with PEFT's rules (one of block size and number;
with m > 1 both even and ``b 2^{m-1}`` dividing in_features; violations fail naming the layer).
Differences from HF PEFT:
- defaults are PEFT's (block_size 4, one factor) except ``targets``, which is peftlab's
  ``all-linear``; block size 4 divides every width of the tiny test models and of real ones;
- PEFT without its CUDA extension (every CPU) silently builds one factor whatever
  ``boft_n_butterfly_factor`` says; peftlab builds the factors asked for on any device (and
  reads the count of a PEFT file from its tensors, so PEFT's CPU files load as what PEFT ran);
- ``nn.Linear`` only (quantized linear bases included); Conv2d and GPT-2's Conv1D are refused;
- ``dropout`` is PEFT's multiplicative dropout: in training, ``int(p k)`` random blocks of one
  random factor become the identity for the call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight, set_base_weight
from .oft import refuse_non_linear

CATEGORY = "reparameterized"
PAPER = "Liu et al., 2024 (arXiv:2311.06243)"
MERGEABLE = True
INVALID_SETTINGS = ("block_size=-4", "block_num=-2", "n_butterfly_factor=0", "dropout=1.5")
DEFAULT_LR = 1e-2
# a rotation keeps norms, so on a tiny random model (weights at 0.02) it barely moves the loss; at a pretrained
# scale it trains fast (12 steps at 1e-2: loss x0.44 llama, x0.13 bert; at 0.02 scale x0.98 / x0.99)
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
DEFAULT_BLOCK_SIZE = 4  # PEFT's boft_block_size


@dataclass
class BoftConfig(MethodConfig):
    """block_size: side of each orthogonal block; block_num: number of blocks instead (in / block_num
    each); neither: 4; n_butterfly_factor: number of butterfly factors m (1: OFT-like block
    diagonal; log2(blocks) + 1: dense); dropout: training-time fraction of one factor's blocks set
    to the identity."""

    method: ClassVar[str] = "boft"
    block_size: int = 0
    block_num: int = 0
    n_butterfly_factor: int = 1
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        for key in ("block_size", "block_num"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"boft: {key} must be a non-negative integer (0: unset), got {value!r}")
        if self.block_size and self.block_num:
            raise ConfigError(f"boft: give block_size ({self.block_size}) or block_num ({self.block_num}), not both: "
                              "block_size x block_num is the layer's in_features")
        m = self.n_butterfly_factor
        if not (isinstance(m, int) and not isinstance(m, bool) and m >= 1):
            raise ConfigError(f"boft: n_butterfly_factor must be a positive integer (1: block diagonal), got {m!r}")
        p = self.dropout
        if not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
            raise ConfigError(f"boft: dropout must be in [0, 1), got {p!r}")

    def blocks_for(self, in_features: int, module_name: str = "") -> tuple[int, int]:
        """(block count k, block size b) of a layer with ``in_features`` inputs, by PEFT's rules;
        ConfigError naming the layer where the settings do not fit it."""
        where = f"'{module_name}' ({in_features} inputs)" if module_name else f"a layer with {in_features} inputs"
        extra = self.n_butterfly_factor - 1
        if self.block_num:
            k = self.block_num
            if in_features % k:
                raise ConfigError(f"boft: block_num={k} does not divide {where}")
            if extra and (extra > int(math.log2(k)) or k % 2 ** extra):
                raise ConfigError(f"boft: block_num={k} must be a multiple of 2^(n_butterfly_factor - 1) = {2 ** extra} "
                                  f"for n_butterfly_factor={self.n_butterfly_factor}")
            b = in_features // k
        else:
            b = self.block_size or DEFAULT_BLOCK_SIZE
            if in_features % b:
                raise ConfigError(f"boft: block_size={b} does not divide {where}; choose a divisor of every adapted width")
            if extra and in_features % (b * 2 ** extra):
                raise ConfigError(f"boft: n_butterfly_factor={self.n_butterfly_factor} needs block_size x "
                                  f"2^{extra} = {b * 2 ** extra} to divide {where}")
            k = in_features // b
        if extra and (k % 2 or b % 2):
            raise ConfigError(f"boft: with n_butterfly_factor > 1 the block count ({k}) and block size ({b}) of {where} "
                              "must both be even")
        return k, b


# ---- pure math -------------------------------------------------------------------------------

def butterfly_order(n: int, blocks: int, block_size: int, factor: int, factors: int) -> list:
    """``perm`` of factor ``factor`` (0-based) of ``factors`` as a list, PEFT's ``block_butterfly_perm``:
    ``P[i, perm[i]] = 1``. In each run of ``n / (blocks / 2^factor)`` coordinates, the half-blocks
    (``block_size / 2`` each) are taken even ones first, then odd ones."""
    if factors == 1:
        return list(range(n))
    half = block_size // 2
    run = n // (blocks // 2 ** factor)
    groups = run // half
    order = list(range(0, groups, 2)) + list(range(1, groups, 2))
    return [start + g * half + t for start in range(0, n, run) for g in order for t in range(half)]


def butterfly_permutation(n: int, blocks: int, block_size: int, factor: int, factors: int) -> torch.Tensor:
    return torch.tensor(butterfly_order(n, blocks, block_size, factor, factors), device="cpu")


def cayley_full(A: torch.Tensor) -> torch.Tensor:
    """Orthogonal blocks ``(I - S)(I + S)^{-1}`` from full blocks ``A`` (..., b, b), ``S`` their skew part."""
    S = 0.5 * (A - A.transpose(-2, -1))
    eye = torch.eye(A.shape[-1], device=A.device, dtype=A.dtype).expand_as(S)
    return torch.linalg.solve(eye + S, eye - S, left=False)


def apply_factor(x: torch.Tensor, R: torch.Tensor, perm: torch.Tensor | None, inverse: torch.Tensor | None) -> torch.Tensor:
    """``x @ B`` with ``B = P diag(R) P^T`` (R: k x b x b; ``P[i, perm[i]] = 1``, None: identity)."""
    if perm is not None:
        x = x.index_select(-1, inverse)
    k, b, _ = R.shape
    x = torch.einsum("...kb,kbc->...kc", x.reshape(*x.shape[:-1], k, b), R).reshape(x.shape)
    return x.index_select(-1, perm) if perm is not None else x


def butterfly_apply(x: torch.Tensor, R: torch.Tensor, perms: list) -> torch.Tensor:
    """``x @ M`` with ``M = B_{m-1} ... B_0`` (R: m x k x b x b orthogonal blocks; perms: (perm, inverse) per factor)."""
    for i in reversed(range(R.shape[0])):
        x = apply_factor(x, R[i], *perms[i])
    return x


def factor_dropout(R: torch.Tensor, p: float) -> torch.Tensor:
    """PEFT's multiplicative dropout: ``int(p k)`` random blocks of one random factor replaced by the identity."""
    m, k, b, _ = R.shape
    dropped = int(p * k)
    if dropped == 0:
        return R
    mask = torch.zeros(m, k, 1, 1, device=R.device, dtype=R.dtype)
    mask[torch.randint(0, m, (1,)).item(), torch.randperm(k, device=R.device)[:dropped]] = 1
    return (1 - mask) * R + mask * torch.eye(b, device=R.device, dtype=R.dtype)


# ---- module ----------------------------------------------------------------------------------

class BoftLinear(nn.Module):
    """BOFT for ``nn.Linear``: ``s * W (x M) + b``."""

    def __init__(self, base: nn.Module, blocks: int, block_size: int, factors: int, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.blocks, self.block_size, self.factors, self.dropout = blocks, block_size, factors, dropout
        self.boft_R = nn.Parameter(torch.zeros(factors, blocks, block_size, block_size, device=w.device, dtype=dtype))
        self.boft_s = nn.Parameter(torch.ones(self.out_features, 1, device=w.device, dtype=dtype))
        for i in range(factors):  # index lists, not permutation matrices; None where a factor's is the identity
            perm = butterfly_order(self.in_features, blocks, block_size, i, factors)
            identity = perm == list(range(self.in_features))
            inverse = sorted(range(self.in_features), key=perm.__getitem__)
            self.register_buffer(f"perm_{i}", None if identity else torch.tensor(perm, device=w.device), persistent=False)
            self.register_buffer(f"inverse_{i}", None if identity else torch.tensor(inverse, device=w.device),
                                 persistent=False)
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def _perms(self) -> list:
        return [(getattr(self, f"perm_{i}"), getattr(self, f"inverse_{i}")) for i in range(self.factors)]

    def rotation_blocks(self) -> torch.Tensor:
        """The orthogonal blocks of every factor (m x k x b x b)."""
        return cayley_full(self.boft_R)

    def factor(self, i: int) -> torch.Tensor:
        """Butterfly factor ``B_i`` (in x in), dense."""
        return apply_factor(torch.eye(self.in_features, device=self.boft_R.device, dtype=self.boft_R.dtype),
                            self.rotation_blocks()[i], *self._perms()[i])

    def rotation(self) -> torch.Tensor:
        """``M`` (in x in) = ``B_{m-1} ... B_0``."""
        eye = torch.eye(self.in_features, device=self.boft_R.device, dtype=self.boft_R.dtype)
        return butterfly_apply(eye, self.rotation_blocks(), self._perms())

    def _rotated(self, x):
        R = self.rotation_blocks()
        if self.training and self.dropout > 0:
            R = factor_dropout(R, self.dropout)
        return butterfly_apply(x.to(R.dtype), R, self._perms()).to(x.dtype)

    def forward(self, x, base_out):
        # s * W (x M) - W x = s * W (x M - x) + (s - 1) * W x: exactly 0 at M = I, s = 1
        W = base_weight(self.__dict__["_base_ref"]).to(x.dtype)
        s = self.boft_s[:, 0].to(x.dtype)
        return torch.nn.functional.linear(self._rotated(x) - x, W) * s + torch.nn.functional.linear(x, W) * (s - 1)

    def fused_forward(self, base: nn.Module, x):
        out = base(self._rotated(x))
        s = self.boft_s[:, 0].to(out.dtype)
        bias = getattr(base, "bias", None)
        return out * s if bias is None else (out - bias) * s + bias

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            merged = (W.to(self.boft_R.dtype) @ self.rotation().T) * self.boft_s
            set_base_weight(base, merged.to(W.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            W = base_weight(base)
            original = (W.to(self.boft_R.dtype) / self.boft_s) @ self.rotation()  # M orthogonal: (M^T)^{-1} = M
            set_base_weight(base, original.to(W.dtype))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = BoftConfig


def can_wrap(module: nn.Module) -> bool:
    # Conv1D is matched too, so that naming one gives the clear refusal of make_adapter, not "nothing matched"
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def make_adapter(module: nn.Module, config: BoftConfig, name: str) -> nn.Module:
    refuse_non_linear("boft", module, name)
    k, b = config.blocks_for(base_weight(module).shape[1], name)
    return BoftLinear(module, k, b, config.n_butterfly_factor, config.dropout)
