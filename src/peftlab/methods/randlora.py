"""RandLoRA: Full-rank parameter-efficient fine-tuning of large models (Albert et al., ICLR 2025,
arXiv:2502.00987).

LoRA's update is limited to rank ``r``; RandLoRA keeps LoRA's low parameter count but makes the
update full rank. It sums ``n = ceil(min(out, in) / r)`` frozen random rank-``r`` bases, each
scaled by two small trained diagonal matrices::

    delta W = (alpha / r) * sum_{j=1..n} B_j Lambda_j A Gamma_j

with ``B_j`` (long side x r) and ``A`` (r x short side) frozen and random, ``Lambda_j = diag(lambda[:, j])``
(r) and ``Gamma_j = diag(gamma[j])`` (short side) trained. The ranks add up to at least
``min(out, in)``, so the update is full rank in general, while a layer trains only
``r n + n min(out, in)`` numbers (about ``min(out, in) (1 + min(out, in) / r)``; a smaller ``r``
means more bases and more trained numbers). The trained scalings always act on the layer's short
side (``A`` and ``Gamma`` there): for a layer wider than it is tall, the product is transposed.

As in VeRA (``methods/vera.py``), the random bases are one pair for the whole adapter, sized by
the largest adapted widths and sliced per layer (``A[:, :, :short]``, ``B[:long, :n, :]``), held as
buffers by the first layer and referenced by the rest. They are drawn from a CPU ``torch.Generator``
seeded with ``projection_prng_key`` exactly as HF PEFT draws them, so a key gives the same bases bit
for bit: Kaiming-uniform (``a = sqrt(5)``) in bfloat16, ``A`` first then the ``n`` blocks of ``B``,
each divided by its standard deviation; or, with ``sparse`` / ``very_sparse``, ternary
{-1, 0, 1} matrices from uniform draws (``+-1`` with probability ``1/6`` each, or ``1/(2 sqrt(d))``
each for the short side ``d``), divided by their std. ``lambda`` starts at zero and every
``gamma`` at ``1 / max(n, short side)``, so the model is exactly the base at step 0 and
``lambda`` gets a gradient from the first step. The update is a weight, so it merges. The forward
forms the thin pair ``(down, up)`` (``n r`` wide) and runs it through LoRA's fused kernel with
scale ``alpha / r``; the flattened pairing of ``B``'s columns (basis-major) with the scaled
``A``'s rows (rank-major) is PEFT's, a relabelling of ``B``'s random columns that keeps its
files meaning the same here.

Reads and writes HF PEFT's ``RANDLORA`` format (``formats/hf_randlora.py``). Differences from HF PEFT:
- defaults are PEFT's (r=32, alpha=640, projection_prng_key=0, save_projection=True) except
  ``targets`` (peftlab's ``all-linear``); ``randlora_alpha`` / ``randlora_dropout`` are
  ``alpha`` / ``dropout`` here; PEFT's ``init_weights=False`` (lambda random, gamma ``1 / max(out, in)``)
  is ``init=random``;
- PEFT's files hold the shared bases once as ``base_model.randlora_A`` / ``base_model.randlora_B``
  and again under every adapted layer (its state dict reaches them through each layer); peftlab
  writes them once (PEFT reads that unchanged into its one shared pair) and reads PEFT's files
  from the shared copy;
- PEFT draws the dense bases in bfloat16 where accelerate reports bfloat16 support (float16
  elsewhere); peftlab always uses bfloat16, the choice on every machine this project tests on;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly;
- each named RandLoRA adapter has its own bases (PEFT shares the first adapter's).
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
from .lora import MergesDelta, _FusedLoraLinear, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Albert et al., 2025 (arXiv:2502.00987)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "alpha=0", "dropout=1.5", "projection_prng_key=1.5", "sparse=maybe", "init=ones")
# alpha / r = 20 amplifies every step of the diagonal scalings, and PEFT's docs warn that high rates make it unstable:
# the LoRA family's common 1e-3
DEFAULT_LR = 1e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INITS = ("default", "random")


@dataclass
class RandLoraConfig(MethodConfig):
    """r: rank of each frozen random basis (smaller r: more bases, more trained numbers); alpha: the
    update's scale is alpha / r; dropout: on the adapter's input; projection_prng_key: seed of the
    shared bases; save_projection: write the bases into the file (else regenerated from the key);
    sparse / very_sparse: ternary bases; init: default (the base at step 0) or random (PEFT's init_weights=False)."""

    method: ClassVar[str] = "randlora"
    r: int = 32
    alpha: float = 640  # written as PEFT writes it (an integer) unless set otherwise
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    init: str = "default"

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"randlora: rank r must be a positive integer, got {self.r!r}")
        a = self.alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a != 0):
            raise ConfigError(f"randlora: alpha must be a finite non-zero number (the scale is alpha / r), got {a!r}; "
                              "the paper's choice is 20 r")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"randlora: dropout must be in [0, 1), got {self.dropout!r}")
        key = self.projection_prng_key
        if not (isinstance(key, int) and not isinstance(key, bool) and -2**63 <= key < 2**64):
            raise ConfigError(f"randlora: projection_prng_key must be an integer seed, got {key!r}")
        for flag in ("save_projection", "sparse", "very_sparse"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"randlora: {flag} must be true or false, got {getattr(self, flag)!r}")
        if self.init not in INITS:
            raise ConfigError(f"randlora: init must be one of {', '.join(INITS)}, got {self.init!r}")


# ---- pure math -------------------------------------------------------------------------------

def num_bases(short: int, r: int) -> int:
    """How many rank-r bases make a full-rank update on a side of ``short``: ceil(short / r)."""
    return -(-short // r)


def _kaiming(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(shape, dtype=torch.bfloat16), a=math.sqrt(5), generator=generator)


def _ternary(uniform: torch.Tensor, sparsity: float) -> torch.Tensor:
    out = torch.zeros(uniform.shape)
    out[uniform < 1 / (2 * sparsity)] = -1
    out[uniform > 1 - 1 / (2 * sparsity)] = 1
    return out / out.std()


def bases(r: int, long: int, short: int, key: int, sparse: bool = False, very_sparse: bool = False):
    """The shared frozen ``(A, B)``: A (r, 1, short), B (long, n, r), ``n = ceil(short / r)``, drawn
    from a CPU generator seeded with ``key`` in HF PEFT's order and dtype (returned as float32)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    n = num_bases(short, r)
    if very_sparse or sparse:
        sparsity = math.sqrt(short) if very_sparse else 3
        A = torch.rand((r, 1, short), generator=generator)
        B = torch.rand((long, n, r), generator=generator)
        return _ternary(A, sparsity), _ternary(B, sparsity)
    A = _kaiming((r, 1, short), generator)
    B = torch.cat([_kaiming((long, 1, r), generator) for _ in range(n)], dim=1)
    return (A / A.std()).float(), (B / B.std()).float()


def thin_pair(A, B, lam, gamma, in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down, up)`` with ``delta W = scale * up @ down``: the layer's slices of the shared bases,
    its scalings applied on the short side (down: n r x in, up: out x n r)."""
    n, short = gamma.shape
    long = max(in_features, out_features)
    scaled = (lam[:, :, None] * A[:, :, :short] * gamma[None]).flatten(0, 1)  # (r n) x short, rank-major
    plain = B[:long, :n, :].flatten(1)  # long x (n r), basis-major
    if in_features == short:
        return scaled, plain
    return plain.T, scaled.T


def delta_weight(A, B, lam, gamma, in_features: int, out_features: int, scale: float) -> torch.Tensor:
    """The update ``scale * sum_j B_j diag(lambda_j) A diag(gamma_j)`` in (out x in) layout."""
    down, up = thin_pair(A, B, lam, gamma, in_features, out_features)
    return scale * (up @ down)


# ---- module ----------------------------------------------------------------------------------

class RandLoraLinear(MergesDelta, nn.Module):
    """RandLoRA for ``nn.Linear``: returns ``(alpha / r) up (down x)``, the thin pair built from the
    shared bases and this layer's ``randlora_lambda`` (r x n) and ``randlora_gamma`` (n x short side).
    The first layer of an adapter holds the bases as buffers ``randlora_A`` / ``randlora_B``."""

    def __init__(self, base: nn.Module, config: RandLoraConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        like = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        short, long = min(self.out_features, self.in_features), max(self.out_features, self.in_features)
        self.r, self.n = config.r, num_bases(short, config.r)
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.init == "random":  # PEFT's init_weights=False
            lam, gamma = torch.randn(self.r, self.n), torch.full((self.n, short), 1.0 / long)
        else:
            lam, gamma = torch.zeros(self.r, self.n), torch.full((self.n, short), 1.0 / max(self.n, short))
        self.randlora_lambda = nn.Parameter(lam.to(**like))
        self.randlora_gamma = nn.Parameter(gamma.to(**like))

    # the shared bases: registered on one layer (so they move with .to() and are saved once), referenced by the rest
    def own_bases(self, A: torch.Tensor, B: torch.Tensor) -> None:
        like = self.randlora_lambda
        self.register_buffer("randlora_A", A.to(like.device, like.dtype))
        self.register_buffer("randlora_B", B.to(like.device, like.dtype))

    def use_bases_of(self, owner: "RandLoraLinear") -> None:
        self.__dict__["bases_owner"] = owner  # a plain reference, not a submodule: the bases are stored once

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared ``(A, B)`` whole: (r, 1, largest short side), (largest long side, n, r)."""
        owner = self.__dict__.get("bases_owner", self)
        return owner._buffers["randlora_A"], owner._buffers["randlora_B"]

    def thin_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return thin_pair(*self.bases(), self.randlora_lambda, self.randlora_gamma, self.in_features, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        down, up = self.thin_pair()
        return self.scaling * (up @ down)

    def forward(self, x, base_out):
        down, up = self.thin_pair()
        return F.linear(F.linear(self.dropout(x), down), up) * self.scaling

    def fused_forward(self, base: nn.Module, x):
        """The whole layer through LoRA's fused kernel with the thin pair; None where it does not apply."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.randlora_lambda.dtype:
            return None
        down, up = self.thin_pair()
        return _FusedLoraLinear.apply(x, base.weight, base.bias, down, up, self.scaling)


# ---- method protocol -------------------------------------------------------------------------

Config = RandLoraConfig


def make_adapter(module: nn.Module, config: RandLoraConfig, name: str) -> nn.Module:
    refuse_non_linear("randlora", module, name)
    return RandLoraLinear(module, config)


def shared_sizes(adapters) -> tuple[int, int]:
    """(long, short) of the shared bases, as PEFT sizes them: from the largest output and the
    largest input width among the adapted layers."""
    max_out = max(a.out_features for a in adapters)
    max_in = max(a.in_features for a in adapters)
    return max(max_out, max_in), min(max_out, max_in)


def after_attach(model: nn.Module, name: str, config: RandLoraConfig) -> None:
    """Draw the one pair of bases, sized by the widest adapted layers, and give it to every layer."""
    from ..core.adapters import method_adapters

    adapters = [adapter for _, adapter in method_adapters(model, name, "randlora")]
    if not adapters:
        return
    long, short = shared_sizes(adapters)
    A, B = bases(config.r, long, short, config.projection_prng_key, config.sparse, config.very_sparse)
    adapters[0].own_bases(A, B)
    for adapter in adapters[1:]:
        adapter.use_bases_of(adapters[0])
