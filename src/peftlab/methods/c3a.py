"""C3A: Parameter-Efficient Fine-Tuning via Circular Convolution (Chen et al., ACL 2025,
arXiv:2407.19342).

Why: LoRA's update ``B A`` has rank at most ``r``; a circulant matrix built from one length-``b``
kernel can have full rank ``b`` for ``b`` numbers, and is applied in ``O(b log b)`` by the FFT. C3A
cuts a frozen ``W`` (out x in) into ``(out / b) x (in / b)`` blocks of size ``b x b`` and makes each
block of the update a circulant matrix of a trained kernel ``w[i, j]`` (length ``b``)::

    delta W = C / in,    C[i*b + s, j*b + t] = w[i, j, (t - s) mod b]

so output block ``i`` gains ``sum_j w[i, j] (*) x_j / in``, with ``(*)`` the circular
cross-correlation ``y[s] = sum_u w[u] x[(s + u) mod b]``. The forward never forms ``delta W``: it
takes the FFT of each input block, multiplies by the kernels' spectra, sums over ``j`` and
transforms back (in float32, as PEFT: the FFT of half precision is not widely available); merging
adds the explicit circulant ``delta W`` to ``W`` (it is linear in the kernels). A layer trains
``out * in / b`` numbers and its update's rank can reach ``min(out, in)``.

Block size: it must divide both ``in`` and ``out``. Here ``block_size`` is the largest allowed, and
each layer takes the largest common divisor of its ``in`` and ``out`` not above it (the value
itself wherever it divides both), so one setting fits every layer of any model; a ``block_size_pattern``
sets it per module (a name suffix or regex), with the same rounding down.

Reads and writes HF PEFT's ``C3A`` format exactly (``formats/hf_c3a.py``): the kernels are
``c3a_kernel`` (out / b, in / b, b), always float32, and ``block_size``, ``block_size_pattern``,
``init_weights`` mean what they mean there. Differences from HF PEFT:
- PEFT refuses a layer that its ``block_size`` does not divide; peftlab rounds down per layer as
  above, and the file records each layer whose size differs from the most common one in
  ``block_size_pattern`` under its full name, so PEFT reads it unchanged;
- the default init is ``zeros`` (PEFT's ``init_weights=True``), so the model is exactly the base at
  step 0 (the kernels still get gradients there: the update is linear in them); PEFT's default
  ``xavier_uniform`` (also its ``init_weights=False``), ``kaiming_uniform`` and ``gaussian`` are
  settings;
- ``nn.Linear`` only, as PEFT, but quantized linear bases are taken too (the forward never reads
  ``W``); GPT-2's ``Conv1D`` is refused clearly; ``bias`` training has no setting here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from ..quant.layers import parameter_shape
from .lora import MergesDelta, _pattern_value
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Chen et al., 2025 (arXiv:2407.19342)"
MERGEABLE = True
# HF PEFT's C3A docs: "a LR of 1e-1 for C3A is a good starting point" (the update is divided by `in`)
DEFAULT_LR = 1e-1
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny BERT barely reacts
INVALID_SETTINGS = ("block_size=0", "block_size=2.5", "init=ones", "block_size_pattern=3")
INITS = ("zeros", "xavier_uniform", "kaiming_uniform", "gaussian")


@dataclass
class C3AConfig(MethodConfig):
    """block_size: the largest circulant block (each layer takes the largest common divisor of its in
    and out not above it; PEFT's default 256); init: zeros (the base at step 0), xavier_uniform (PEFT's
    default), kaiming_uniform or gaussian; block_size_pattern: per-module block sizes keyed by a
    module-name suffix or regex."""

    method: ClassVar[str] = "c3a"
    block_size: int = 256
    init: str = "zeros"
    block_size_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        pattern = self.block_size_pattern
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ConfigError(f"c3a: block_size_pattern must map module names (suffixes or regexes) to block sizes, "
                              f"e.g. {{'down_proj': 64}}; got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as error:
                raise ConfigError(f"c3a: block_size_pattern key {k!r} is not a valid regex ({error})") from None
        sizes = [self.block_size, *pattern.values()]
        if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes):
            raise ConfigError(f"c3a: block_size must be a positive integer (a common divisor of the layers' in and out "
                              f"sizes, or larger: each layer rounds down to one), got {sizes}")
        if self.init not in INITS:
            raise ConfigError(f"c3a: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def block_for(self, module_name: str, out_features: int, in_features: int) -> int:
        """The layer's block size: its pattern's or ``block_size``, rounded down to a common divisor."""
        return fitting_block(_pattern_value(self.block_size_pattern, module_name, self.block_size), out_features, in_features)


# ---- pure math -------------------------------------------------------------------------------

def fitting_block(block_size: int, out_features: int, in_features: int) -> int:
    """The largest common divisor of ``out_features`` and ``in_features`` that is at most ``block_size``."""
    g = math.gcd(out_features, in_features)
    return max(d for d in range(1, min(block_size, g) + 1) if g % d == 0)


def block_circular(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``C x`` by FFT for ``x`` (..., n * b) and kernels (m, n, b): output block ``i`` is
    ``sum_j y_ij``, ``y_ij[s] = sum_u kernel[i, j, u] x_j[(s + u) mod b]``; shape (..., m * b), float32."""
    m, n, b = kernel.shape
    blocks = x.float().reshape(*x.shape[:-1], n, b)
    spectrum = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(blocks), torch.fft.fft(kernel.float()))
    return torch.fft.fft(spectrum).real.reshape(*x.shape[:-1], m * b)


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """The explicit block-circulant ``C`` (m*b x n*b): block (i, j) has ``C[s, t] = kernel[i, j, (t - s) mod b]``."""
    m, n, b = kernel.shape
    s = torch.arange(b, device=kernel.device)
    shift = (s[None, :] - s[:, None]) % b  # (b x b): t - s
    blocks = kernel[:, :, shift]  # (m, n, b, b)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


def init_kernel(kernel: torch.Tensor, init: str, out_features: int, in_features: int) -> None:
    """Fill ``kernel`` in place as PEFT's ``init_weights`` does."""
    with torch.no_grad():
        if init == "zeros":
            kernel.zero_()
        elif init == "gaussian":
            kernel.normal_()
        else:
            bound = (math.sqrt(6.0 / (in_features + out_features)) if init == "xavier_uniform"
                     else math.sqrt(1.0 / in_features))
            kernel.uniform_(-bound, bound)


# ---- module ----------------------------------------------------------------------------------

class C3ALinear(MergesDelta, nn.Module):
    """C3A for ``nn.Linear``: returns ``C x / in`` computed by FFT."""

    def __init__(self, base: nn.Module, block_size: int, init: str = "zeros"):
        super().__init__()
        self.out_features, self.in_features = weight_shape(base)
        self.block_size, self.init = block_size, init
        b = block_size
        kernel = torch.empty(self.out_features // b, self.in_features // b, b, dtype=torch.float32, device=base.weight.device)
        init_kernel(kernel, init, self.out_features, self.in_features)
        self.c3a_kernel = nn.Parameter(kernel)  # float32 whatever the base: the FFT's dtype (as PEFT)

    def delta_weight(self) -> torch.Tensor:
        return circulant(self.c3a_kernel) / self.in_features

    def forward(self, x, base_out):
        out = block_circular(x, self.c3a_kernel) / self.in_features
        return out.to(x.dtype if x.dtype.is_floating_point else out.dtype)


def weight_shape(base: nn.Module) -> tuple:
    """(out, in) of the base weight (a quantized base's full-precision shape)."""
    return tuple(parameter_shape(base, "weight", base.weight))


# ---- method protocol -------------------------------------------------------------------------

Config = C3AConfig


def make_adapter(module: nn.Module, config: C3AConfig, name: str) -> nn.Module:
    refuse_non_linear("c3a", module, name)
    out_features, in_features = weight_shape(module)
    return C3ALinear(module, config.block_for(name, out_features, in_features), config.init)
