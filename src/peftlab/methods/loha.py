"""LoHa: low-rank Hadamard product (Yeh et al., 2023, "Navigating Text-To-Image Customization: From
LyCORIS Fine-Tuning to Model Evaluation", arXiv:2309.14859; the parameterisation is FedPara's,
Hyeon-Woo et al., ICLR 2022, arXiv:2108.06098).

A frozen weight ``W`` (out x in) is adapted by the elementwise (Hadamard) product of two rank-r
products::

    delta W = s * (W1a W1b) * (W2a W2b),    W1a, W2a: out x r,  W1b, W2b: r x in,  s = alpha / r

Each factor has rank r, but their Hadamard product has rank up to r^2, so LoHa reaches a rank-r^2
update with the 2 r (out + in) parameters of a rank-2r LoRA. ``W2b`` starts at zero and the other
three Kaiming-uniform, so the model is exactly the base model at step 0; the update is a weight,
so it merges into ``W``.

The forward forms ``delta W`` only where that is the cheaper route: the Hadamard product of two
products is itself one product, ``(W1a W1b) * (W2a W2b) = (W1a . W2a)(W1b * W2b)``, where
``W1a . W2a`` (out x r^2) holds the outer products of matching rows and ``W1b * W2b`` (r^2 x in)
of matching columns (the face-splitting / Khatri-Rao products). When ``2 r^2 (out + in) <= out in``
the layer runs as a rank-r^2 LoRA through LoRA's fused kernel (``lora._FusedLoraLinear``);
otherwise (small layers, large r) ``delta W`` is formed once per call and added to ``W`` before
the one matmul (a training step of a 576 x 1536 layer on 512 rows, one core: at r=8 the factored
route is 1.4x faster, at r=16 they break even, at r=24 the dense one is 1.6x faster). Both give
HF PEFT's numbers (to float rounding); PEFT always forms ``delta W`` and runs a second full matmul, which took 1.3-2.5x
as long as peftlab's route in the same measurement at r=8 and 16.

Reads and writes HF PEFT's ``LOHA`` format exactly (``formats/hf_lycoris.py``): the parameters
carry PEFT's names (``hada_w1_a`` ...), and ``r``, ``alpha``, ``rank_pattern``, ``alpha_pattern``,
``rank_dropout``, ``module_dropout`` mean what they mean there. Differences from HF PEFT:
- defaults are PEFT's (r=8, alpha=8) except ``targets``, which is peftlab's ``all-linear``;
- ``nn.Linear`` (quantized linear bases included), ``nn.Conv1d`` and ``nn.Conv2d`` named in ``targets``
  (``all-linear`` stays linear-only): a convolution gets PEFT's default flattened form, the update
  (out x in/groups * k...) reshaped to the base kernel, run with the base's stride, padding, dilation,
  groups and padding mode (PEFT's unmerged forward ignores a non-zero padding mode; here merged equals
  unmerged there too). PEFT's CP decomposition (``use_effective_conv2d``, ``hada_t1/t2``) is refused
  with a clear error, and GPT-2's ``Conv1D``, which PEFT's LoHa does not take either;
- PEFT's ``init_weights=False`` (all four factors random: not the base at step 0) has no setting here;
- rank dropout draws one keep-mask over the update's output rows per call and rescales it by its
  mean, as PEFT does; module dropout skips the whole adapter for a call in training, as PEFT does.
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
from ..errors import ConfigError
from .lora import MergesDelta, _FusedLoraLinear, _pattern_value, base_weight

CATEGORY = "reparameterized"
PAPER = "Yeh et al., 2023 (arXiv:2309.14859); FedPara, Hyeon-Woo et al., 2022"
MERGEABLE = True
DEFAULT_LR = 5e-3  # KronA's rate: at the 1e-3 fallback SST-2 stayed at the majority class in 125 steps (ours and HF's alike)
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INVALID_SETTINGS = ("r=0", "alpha=-1", "rank_dropout=1.5", "module_dropout=-0.1", "rank_pattern=3")


@dataclass
class LohaConfig(MethodConfig):
    """r: rank of each of the two factors (the update's rank is up to r^2); alpha: scale numerator
    (s = alpha / r); rank_dropout: training-time dropout of the update's output rows;
    module_dropout: training-time probability of skipping the adapter for a call; rank_pattern /
    alpha_pattern: per-module overrides keyed by a module-name suffix or regex (as PEFT's)."""

    method: ClassVar[str] = "loha"
    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        validate_lycoris(self)

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def validate_lycoris(config) -> None:
    """The settings LoHa and LoKr share (PEFT's ``LycorisConfig``)."""
    name = config.method
    for key in ("rank_pattern", "alpha_pattern"):
        value = getattr(config, key)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name}: {key} must map module names (suffixes or regexes) to values, "
                              f"e.g. {{'down_proj': 4}}; got {value!r}")
        for k in value:
            try:
                re.compile(k)
            except re.error as error:
                raise ConfigError(f"{name}: {key} key {k!r} is not a valid regex ({error})") from None
    ranks = [config.r, *config.rank_pattern.values()]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ConfigError(f"{name}: rank r must be a positive integer, got {ranks}")
    alphas = [config.alpha, *config.alpha_pattern.values()]
    if not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0 for a in alphas):
        raise ConfigError(f"{name}: alpha must be a positive number, got {alphas}")
    for key in ("rank_dropout", "module_dropout"):
        value = getattr(config, key)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
            raise ConfigError(f"{name}: {key} must be in [0, 1), got {value!r}")


# ---- pure math -------------------------------------------------------------------------------

def delta_weight(w1a, w1b, w2a, w2b, scale: float) -> torch.Tensor:
    """The update ``s (W1a W1b) * (W2a W2b)`` in (out x in) layout."""
    return (w1a @ w1b) * (w2a @ w2b) * scale


def khatri_rao_factors(w1a, w1b, w2a, w2b) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``B @ A == (W1a W1b) * (W2a W2b)``: ``B`` (out x r1 r2) holds the outer
    products of the rows of ``W1a`` and ``W2a``, ``A`` (r1 r2 x in) those of the columns of ``W1b``
    and ``W2b``; ``A`` and ``B`` are in LoRA's roles, so the update is a rank-r1 r2 LoRA."""
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    B = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_features, -1)
    A = (w1b[:, None, :] * w2b[None, :, :]).reshape(-1, in_features)
    return A, B


def factored_is_cheaper(out_features: int, in_features: int, r: int) -> bool:
    """Whether the rank-r^2 route is the faster one: it adds about 3 r^2 (out + in) multiply-adds a row
    (forward and two backward products), the dense route one out x in product (the update's
    gradient); measured, the two break even near ``r^2 (out + in) = 0.6 out in``."""
    return 2 * r * r * (out_features + in_features) <= out_features * in_features


def row_dropout(rows: int, p: float, rescale: bool, like: torch.Tensor) -> torch.Tensor:
    """PEFT's LyCORIS rank dropout: a keep-mask over the update's output rows, one per call,
    divided by its mean when ``rescale`` (LoHa always, LoKr with ``rank_dropout_scale``)."""
    keep = (torch.rand(rows, device=like.device) > p).to(like.dtype)
    return keep / keep.mean().clamp_min(1.0 / rows) if rescale else keep


def module_dropped(module: nn.Module, p: float) -> bool:
    """PEFT's module dropout: in training, skip the adapter for this call with probability ``p``."""
    return module.training and p > 0 and bool(torch.rand(1) < p)


# ---- module ----------------------------------------------------------------------------------

class LohaLinear(MergesDelta, nn.Module):
    """LoHa for ``nn.Linear``: returns ``s ((W1a W1b) * (W2a W2b)) x``. On ``nn.Conv1d`` / ``Conv2d`` (PEFT's
    default, ``use_effective_conv2d=False``) the same (out x in/groups * k...) update is reshaped to the
    base's kernel and applied as a convolution with the base's geometry."""

    def __init__(self, base: nn.Module, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        w = base.weight
        self.kernel_shape = tuple(w.shape) if isinstance(base, CONVS) else None
        out_features, in_features = (w.shape[0], w[0].numel()) if self.kernel_shape else base_weight(base).shape
        if self.kernel_shape:
            self.__dict__["_base_ref"] = base  # a plain reference, not a submodule: its geometry runs the update
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        self.factored = self.kernel_shape is None and factored_is_cheaper(out_features, in_features, r)

        def new(*shape):
            return nn.Parameter(torch.empty(*shape, device=w.device, dtype=dtype))

        self.hada_w1_a, self.hada_w1_b = new(out_features, r), new(r, in_features)
        self.hada_w2_a, self.hada_w2_b = new(out_features, r), new(r, in_features)
        with torch.no_grad():
            for p in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            nn.init.zeros_(self.hada_w2_b)

    def _parts(self):
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b

    def delta_weight(self) -> torch.Tensor:
        delta = delta_weight(*self._parts(), self.scaling)
        return delta if self.kernel_shape is None else delta.view(self.kernel_shape)

    def forward(self, x, base_out):
        if self.kernel_shape is not None:
            return self._conv_forward(x, base_out)
        if module_dropped(self, self.module_dropout):
            return x.new_zeros(*x.shape[:-1], self.hada_w1_a.shape[0])
        if self.factored:
            A, B = khatri_rao_factors(*self._parts())
            out = F.linear(F.linear(x, A) * self.scaling, B)
        else:
            out = F.linear(x, self.delta_weight())
        if self.training and self.rank_dropout > 0:
            out = out * row_dropout(out.shape[-1], self.rank_dropout, True, out)
        return out

    def _conv_forward(self, x, base_out):
        if module_dropped(self, self.module_dropout):
            return torch.zeros_like(base_out)
        out = self.__dict__["_base_ref"]._conv_forward(x, self.delta_weight(), None)
        if self.training and self.rank_dropout > 0:  # over output channels
            out = out * row_dropout(out.shape[1], self.rank_dropout, True, out).view(1, -1, *([1] * (out.dim() - 2)))
        return out

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul (dense) or LoRA's fused kernel (factored); None in training
        with dropout, where the plain forward draws the masks."""
        if (type(base) is not nn.Linear or x.dtype != self.hada_w1_a.dtype
                or (self.training and (self.rank_dropout > 0 or self.module_dropout > 0))):
            return None
        if self.factored:
            A, B = khatri_rao_factors(*self._parts())
            return _FusedLoraLinear.apply(x, base.weight, base.bias, A, B, self.scaling)
        return F.linear(x, base.weight + self.delta_weight(), base.bias)


# ---- method protocol -------------------------------------------------------------------------

Config = LohaConfig


CONVS = (nn.Conv1d, nn.Conv2d)  # what PEFT's LoHa and LoKr take besides nn.Linear


def refuse_non_linear(method: str, module: nn.Module, name: str) -> None:
    if not isinstance(module, (nn.Linear, *CONVS)):
        raise ConfigError(f"{method}: '{name}' is a {type(module).__name__}; peftlab's {method} adapts nn.Linear, nn.Conv1d "
                          "and nn.Conv2d layers (HF PEFT's takes no GPT-2 Conv1D or Conv3d either); "
                          "leave it out with 'exclude' or choose other targets")


def can_wrap(module: nn.Module) -> bool:
    # Conv1D is matched too, so that naming one gives the clear refusal of make_adapter, not "nothing matched"
    return isinstance(module, (nn.Linear, *CONVS)) or type(module).__name__ == "Conv1D"


def make_adapter(module: nn.Module, config: LohaConfig, name: str) -> nn.Module:
    refuse_non_linear("loha", module, name)
    return LohaLinear(module, config.rank_for(name), config.alpha_for(name), config.rank_dropout, config.module_dropout)
