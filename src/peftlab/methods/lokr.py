"""LoKr: low-rank Kronecker product (Yeh et al., 2023, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859).

Like KronA (``krona.py``), LoKr adapts a weight ``W`` (out x in) with a Kronecker product::

    delta W = s * (W1 kron W2),    W1: a x c,  W2: b x d,  out = a b,  in = c d,  s = alpha / r

but chooses the factor shapes itself, factoring each dimension into two near its square root
(``factorization``; ``decompose_factor`` = f asks for a factor f where it divides), and may store
either factor as a rank-r product: ``W2 = W2a W2b`` when ``r < max(b, d) / 2`` (else ``W2`` is a
full matrix), and ``W1 = W1a W1b`` likewise when ``decompose_both`` is set. The update can have
full rank from a few thousand parameters. ``W1`` (or ``W1a``) starts at zero and the rest
Kaiming-uniform, so the model is the base model at step 0; ``init=lycoris`` instead zeroes ``W2``
(or ``W2b``), as the LyCORIS reference does. The forward never forms the Kronecker product
(``krona.kron_apply``: two thin matmuls); merging forms it once.

Reads and writes HF PEFT's ``LOKR`` format exactly (``formats/hf_lycoris.py``): the parameters
carry PEFT's names (``lokr_w1``, ``lokr_w2_a`` ...) and the shapes and the choice between full
and factored matrices follow PEFT's rules for ``nn.Linear``, so files move both ways. Differences
from HF PEFT:
- defaults are PEFT's (r=8, alpha=8, decompose_factor=-1) except ``targets``: peftlab's ``all-linear``;
- ``nn.Linear`` (quantized linear bases included), ``nn.Conv1d`` and ``nn.Conv2d`` named in ``targets``:
  a convolution gets PEFT's default flattened form (``W1`` on the channel factors; ``W2`` full as
  (b, d, k...) or a rank-r pair (b x r)(r x d k...)), the update laid out exactly as PEFT lays it out
  (for a Conv1d with a full ``W2`` that is torch.kron's broadcast, reshaped: not channel-aligned, but
  what PEFT's files mean) and run with the base's geometry. PEFT's CP decomposition
  (``use_effective_conv2d``, ``lokr_t2``) is refused clearly, and GPT-2's ``Conv1D`` (which PEFT's
  LoKr does not take either);
- PEFT's ``init_weights=False`` (every factor random: not the base at step 0) has no setting here;
- rank dropout and module dropout behave as in PEFT (a keep-mask over the update's output rows per
  call, rescaled by its mean with ``rank_dropout_scale``; the adapter skipped for a call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .krona import kron_apply
from .lora import MergesDelta, _pattern_value, base_weight
from .loha import CONVS, module_dropped, refuse_non_linear, row_dropout, validate_lycoris
from .loha import can_wrap as loha_can_wrap

CATEGORY = "reparameterized"
PAPER = "Yeh et al., 2023 (arXiv:2309.14859)"
MERGEABLE = True
DEFAULT_LR = 5e-3  # as KronA, which also starts from a zero factor
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INVALID_SETTINGS = ("r=0", "alpha=-1", "decompose_factor=0", "rank_dropout=1.5", "init=zeros")
INITS = ("default", "lycoris")
# the tiny hidden-32 test models factor 32 as 4 x 8, leaving the zero-initialised W1 16 entries a layer, too few
# to move the loss in the registry tests' 12 steps; a factor of 8 gives it 64 (8 x 8 and W2 4 x 4)
EXAMPLE_SETTINGS = "decompose_factor=8"


@dataclass
class LokrConfig(MethodConfig):
    """r: rank of a factored Kronecker factor (and s = alpha / r); alpha: scale numerator;
    decompose_factor: the size wanted for the small factor's dimensions (-1: near the square root);
    decompose_both: also store the small factor W1 as a rank-r product; init: default (W1 = 0) or
    lycoris (W2 = 0); rank_dropout, rank_dropout_scale, module_dropout: training-time dropouts as
    in PEFT; rank_pattern / alpha_pattern: per-module overrides keyed by a module-name suffix or regex."""

    method: ClassVar[str] = "lokr"
    r: int = 8
    alpha: float = 8
    decompose_factor: int = -1
    decompose_both: bool = False
    init: str = "default"
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    module_dropout: float = 0.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        validate_lycoris(self)
        f = self.decompose_factor
        if not (isinstance(f, int) and not isinstance(f, bool) and (f == -1 or f > 0)):
            raise ConfigError(f"lokr: decompose_factor must be -1 (factor each dimension near its square root) or a "
                              f"positive integer, got {f!r}")
        for key in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"lokr: {key} must be true or false, got {getattr(self, key)!r}")
        if self.init not in INITS:
            raise ConfigError(f"lokr: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


# ---- pure math -------------------------------------------------------------------------------

def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension``, as LyCORIS and PEFT do: ``(factor,
    dimension // factor)`` when ``factor`` divides it; otherwise walk up the divisors ``m`` of
    ``dimension`` (never past ``factor``) until ``m`` reaches its cofactor, and return the pair
    smaller first: for ``factor = -1`` the divisor pair nearest the square root."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        d = next(k for k in range(m + 1, dimension + 1) if dimension % k == 0)
        if d > limit:
            break
        m, n = d, dimension // d
    return min(m, n), max(m, n)


def factor_shapes(out_features: int, in_features: int, r: int, decompose_factor: int, decompose_both: bool):
    """``((a, c), (b, d), w1_factored, w2_factored)``: ``W1`` is a x c, ``W2`` is b x d, and whether
    each is stored as a rank-r product (PEFT's rule for ``nn.Linear``)."""
    a, b = factorization(out_features, decompose_factor)
    c, d = factorization(in_features, decompose_factor)
    w1_factored = decompose_both and r < max(a, c) / 2
    w2_factored = r < max(b, d) / 2
    return (a, c), (b, d), w1_factored, w2_factored


def delta_weight(w1: torch.Tensor, w2: torch.Tensor, scale: float) -> torch.Tensor:
    """The update ``s (W1 kron W2)`` in (out x in) layout."""
    return torch.kron(w1, w2) * scale


# ---- module ----------------------------------------------------------------------------------

class LokrLinear(MergesDelta, nn.Module):
    """LoKr for ``nn.Linear``: returns ``s (W1 kron W2) x`` without forming the product; on a Conv1d /
    Conv2d the update kernel is formed and run with the base's geometry."""

    def __init__(self, base: nn.Module, r: int, alpha: float, decompose_factor: int = -1, decompose_both: bool = False,
                 init: str = "default", rank_dropout: float = 0.0, rank_dropout_scale: bool = False,
                 module_dropout: float = 0.0):
        super().__init__()
        w = base.weight
        self.kernel_shape = tuple(w.shape) if isinstance(base, CONVS) else None
        if self.kernel_shape:  # PEFT's flattened conv: W1 on (out, in/groups) factors, W2 carries the kernel
            out_features, in_features, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
            self.__dict__["_base_ref"] = base  # a plain reference, not a submodule: its geometry runs the update
        else:
            (out_features, in_features), kernel = base_weight(base).shape, ()
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r, self.alpha, self.scaling, self.init = r, alpha, alpha / r, init
        self.rank_dropout, self.rank_dropout_scale, self.module_dropout = rank_dropout, rank_dropout_scale, module_dropout
        self.out_features = out_features
        (a, c), (b, d), w1_factored, w2_factored = factor_shapes(out_features, in_features, r, decompose_factor, decompose_both)

        def new(*shape):
            return nn.Parameter(torch.empty(*shape, device=w.device, dtype=dtype))

        # a factor is one full matrix or a (left, right) rank-r pair; PEFT's names
        if w1_factored:
            self.lokr_w1_a, self.lokr_w1_b = new(a, r), new(r, c)
        else:
            self.lokr_w1 = new(a, c)
        if w2_factored:
            self.lokr_w2_a, self.lokr_w2_b = new(b, r), new(r, d * math.prod(kernel))
        else:
            self.lokr_w2 = new(b, d, *kernel)
        zeroed = {"default": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}[init]
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in zeroed:
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _factor(self, which: str) -> torch.Tensor:
        full = self._parameters.get(f"lokr_{which}")
        return full if full is not None else self._parameters[f"lokr_{which}_a"] @ self._parameters[f"lokr_{which}_b"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W1, W2)``, each formed from its rank-r pair where it is stored as one."""
        return self._factor("w1"), self._factor("w2")

    def delta_weight(self) -> torch.Tensor:
        if self.kernel_shape is None:
            return delta_weight(*self.factors(), self.scaling)
        # PEFT's convolution update, laid out as PEFT lays it out (so files mean the same): a 4D W2 is
        # paired with W1 as (a, c, 1, 1); otherwise torch.kron's own broadcasting, then the kernel's shape
        w1, w2 = self.factors()
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return (torch.kron(w1, w2) * self.scaling).reshape(self.kernel_shape)

    def forward(self, x, base_out):
        if self.kernel_shape is not None:
            if module_dropped(self, self.module_dropout):
                return torch.zeros_like(base_out)
            out = self.__dict__["_base_ref"]._conv_forward(x, self.delta_weight(), None)
            if self.training and self.rank_dropout > 0:  # over output channels
                keep = row_dropout(out.shape[1], self.rank_dropout, self.rank_dropout_scale, out)
                out = out * keep.view(1, -1, *([1] * (out.dim() - 2)))
            return out
        if module_dropped(self, self.module_dropout):
            return x.new_zeros(*x.shape[:-1], self.out_features)
        out = kron_apply(x, *self.factors()) * self.scaling
        if self.training and self.rank_dropout > 0:
            out = out * row_dropout(out.shape[-1], self.rank_dropout, self.rank_dropout_scale, out)
        return out


# ---- method protocol -------------------------------------------------------------------------

Config = LokrConfig


can_wrap = loha_can_wrap  # nn.Linear, nn.Conv1d, nn.Conv2d; Conv1D matched to be refused clearly


def make_adapter(module: nn.Module, config: LokrConfig, name: str) -> nn.Module:
    refuse_non_linear("lokr", module, name)
    return LokrLinear(module, config.rank_for(name), config.alpha_for(name), config.decompose_factor,
                      config.decompose_both, config.init, config.rank_dropout, config.rank_dropout_scale,
                      config.module_dropout)
