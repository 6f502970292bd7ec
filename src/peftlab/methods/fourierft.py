"""FourierFT: Parameter-Efficient Fine-Tuning with Discrete Fourier Transform (Gao et al., ICML 2024,
arXiv:2405.03003).

A frozen weight ``W`` (out x in) is adapted by an update that lives in the frequency domain: ``n``
trained spectral coefficients ``c`` sit at ``n`` fixed random positions ``(u_k, v_k)`` of an
otherwise zero out x in spectrum ``F``, and::

    delta W = scaling * Re(IDFT2(F)),    F[u_k, v_k] = c_k

so a layer trains ``n`` numbers whatever its size (1000 for a RoBERTa layer matches LoRA r=8,
which trains 16x as many). The positions are the first ``n`` of a random permutation of the
``out * in`` entries drawn from a CPU ``torch.Generator`` seeded with ``random_loc_seed``, row
``p // in``, column ``p % in``: HF PEFT's positions for the same seed and shape, so they are never
saved. The spectrum starts at zero here (``init=zeros``), so the model is exactly the base model
at step 0; ``delta W`` is linear in ``c``, so it merges into ``W``. The forward forms ``delta W``
by one inverse FFT (in float32, as PEFT) and adds it to ``W`` before the one matmul.

Reads and writes HF PEFT's ``FOURIERFT`` format exactly (``formats/hf_fourierft.py``): the
coefficients are ``fourierft_spectrum``, and ``n_frequency``, ``n_frequency_pattern``,
``scaling``, ``random_loc_seed`` mean what they mean there. Differences from HF PEFT:
- defaults are PEFT's (n_frequency=1000, scaling=150, random_loc_seed=777) except ``targets``
  (peftlab's ``all-linear``) and the init: PEFT's default ``init_weights=False`` starts the
  spectrum at standard-normal values, so its model is not the base at step 0; here that is
  ``init=gaussian`` and the default is ``init=zeros`` (PEFT's ``init_weights=True``);
- a layer with fewer than ``n_frequency`` entries (``out * in``) gets all of them, so the defaults
  attach to small layers (PEFT refuses such a layer); the file records that layer's count in
  ``n_frequency_pattern``, so PEFT reads it unchanged;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D``, which PEFT takes with
  ``fan_in_fan_out``, is refused with a clear error; ``bias`` training has no setting here.
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
from .lora import MergesDelta, _pattern_value, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Gao et al., 2024 (arXiv:2405.03003)"
MERGEABLE = True
DEFAULT_LR = 5e-2  # the inverse DFT divides by out x in, so the coefficients need a large step; 1e-3 is far too small (SST-2: 0.80 at 5e-2, seed 0)
INVALID_SETTINGS = ("n_frequency=0", "scaling=0", "random_loc_seed=none", "init=ones", "n_frequency_pattern=3")
INITS = ("zeros", "gaussian")


@dataclass
class FourierFTConfig(MethodConfig):
    """n_frequency: trained spectral coefficients per layer (capped at the layer's out * in);
    scaling: the update's scale (PEFT: 100-150 for RoBERTa, 300 for LLaMA); random_loc_seed: seed of
    the coefficients' positions; init: zeros (the base at step 0) or gaussian (PEFT's default);
    n_frequency_pattern: per-module counts keyed by a module-name suffix or regex."""

    method: ClassVar[str] = "fourierft"
    n_frequency: int = 1000
    scaling: float = 150.0
    random_loc_seed: int = 777
    init: str = "zeros"
    n_frequency_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        pattern = self.n_frequency_pattern
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ConfigError(f"fourierft: n_frequency_pattern must map module names (suffixes or regexes) to counts, "
                              f"e.g. {{'down_proj': 500}}; got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as error:
                raise ConfigError(f"fourierft: n_frequency_pattern key {k!r} is not a valid regex ({error})") from None
        counts = [self.n_frequency, *pattern.values()]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
            raise ConfigError(f"fourierft: n_frequency must be a positive integer, got {counts}")
        s = self.scaling
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s != 0):
            raise ConfigError(f"fourierft: scaling must be a finite non-zero number (PEFT suggests 100-300), got {s!r}")
        seed = self.random_loc_seed
        if not (isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64):
            raise ConfigError(f"fourierft: random_loc_seed must be an integer seed, got {seed!r}")
        if self.init not in INITS:
            raise ConfigError(f"fourierft: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def n_for(self, module_name: str, out_features: int, in_features: int) -> int:
        """The layer's coefficient count: its pattern's or ``n_frequency``, capped at ``out * in``."""
        return min(_pattern_value(self.n_frequency_pattern, module_name, self.n_frequency), out_features * in_features)


# ---- pure math -------------------------------------------------------------------------------

def spectral_indices(out_features: int, in_features: int, n: int, seed: int) -> torch.Tensor:
    """(2 x n) rows and columns of the trained coefficients: the first ``n`` entries of a random
    permutation of the ``out * in`` positions (CPU generator seeded with ``seed``; HF PEFT's)."""
    flat = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([flat // in_features, flat % in_features])


def dense_spectrum(spectrum: torch.Tensor, indices: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The (out x in) float32 spectrum: ``spectrum`` at ``indices``, zero elsewhere."""
    dense = torch.zeros(out_features, in_features, device=spectrum.device, dtype=torch.float32)
    return dense.index_put((indices[0], indices[1]), spectrum.float())


def delta_weight(spectrum, indices, out_features: int, in_features: int, scale: float) -> torch.Tensor:
    """The update ``scale * Re(IDFT2(F))`` in (out x in) layout, in the spectrum's dtype."""
    dense = dense_spectrum(spectrum, indices, out_features, in_features)
    return (torch.fft.ifft2(dense).real * scale).to(spectrum.dtype)


# ---- module ----------------------------------------------------------------------------------

class FourierFTLinear(MergesDelta, nn.Module):
    """FourierFT for ``nn.Linear``: returns ``delta W x`` with ``delta W`` formed by one inverse FFT."""

    def __init__(self, base: nn.Module, n_frequency: int, scaling: float, random_loc_seed: int, init: str = "zeros"):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.n_frequency, self.scaling, self.random_loc_seed, self.init = n_frequency, scaling, random_loc_seed, init
        # derived from the seed and the shape, so never saved
        self.register_buffer("indices", spectral_indices(self.out_features, self.in_features, n_frequency, random_loc_seed)
                             .to(w.device), persistent=False)
        start = torch.zeros(n_frequency) if init == "zeros" else torch.randn(n_frequency)
        self.fourierft_spectrum = nn.Parameter(start.to(w.device, dtype))

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.fourierft_spectrum, self.indices, self.out_features, self.in_features, self.scaling)

    def forward(self, x, base_out):
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W + delta W``; None where it does not apply."""
        if type(base) is not nn.Linear or x.dtype != self.fourierft_spectrum.dtype or x.dtype != base.weight.dtype:
            return None
        return F.linear(x, base.weight + self.delta_weight(), base.bias)


# ---- method protocol -------------------------------------------------------------------------

Config = FourierFTConfig


def make_adapter(module: nn.Module, config: FourierFTConfig, name: str) -> nn.Module:
    refuse_non_linear("fourierft", module, name)
    out_features, in_features = base_weight(module).shape
    return FourierFTLinear(module, config.n_for(name, out_features, in_features), config.scaling,
                           config.random_loc_seed, config.init)
