"""WaveFT: Wavelet Fine-Tuning (Bilican et al., 2025, "Exploring Sparsity for Parameter Efficient Fine
Tuning Using Wavelets", arXiv:2505.12532).

FourierFT's wavelet sibling (``methods/fourierft.py``): a frozen weight ``W`` (out x in) is adapted
by ``n`` trained coefficients ``c`` at ``n`` fixed random positions of an otherwise zero matrix of
wavelet coefficients ``C``, mapped back to the weight domain by a one-level 2-D inverse discrete
wavelet transform::

    delta W = scaling * IDWT2(C),    C[u_k, v_k] = c_k

Where a Fourier coefficient spreads over the whole weight, a wavelet coefficient is local (a Haar
coefficient moves a 2 x 2 patch), so the update is sparse-ish yet of high rank, and ``n`` sets the
trained count to the single parameter (the paper's point: far fewer than LoRA's rank 1 allows).
The positions are FourierFT's: the first ``n`` of a random permutation of the ``out * in`` entries
(CPU generator seeded with ``random_loc_seed``), so they are never saved.

The transform is PyWavelets' single-level ``waverec2d`` convention, written here without pywt:
``C`` is the ``(out + e) x (in + e)`` coefficient matrix (``e = L - 2`` for a filter of length
``L``, each side rounded up to even), with the trained entries offset by ``e / 2`` to sit in its
centre; its quadrants are the approximation (top left), the detail high-pass along rows (top
right), the detail high-pass along columns (bottom left) and the diagonal detail (bottom right).
Each axis is synthesised as ``x[2p + a] += lo[p] rec_lo[a] + hi[p] rec_hi[a]`` with the first and
last ``L - 2`` samples dropped, and the result is cropped to ``out x in`` about its centre. The
Daubechies filters ``db1`` (Haar) ... ``db10`` are computed here from their defining polynomial
(spectral factorisation, the minimum-phase root of each pair), equal to PyWavelets' tables to
1e-11. With ``use_idwt=false`` the transform is skipped and ``C`` (cropped) is the update itself.
The update is linear in ``c``, so it merges into ``W``.

Reads and writes HF PEFT's ``WAVEFT`` format exactly (``formats/hf_waveft.py``): the coefficients
are ``waveft_spectrum``, and ``n_frequency``, ``n_frequency_pattern``, ``scaling``,
``wavelet_family``, ``use_idwt``, ``random_loc_seed`` mean what they mean there. Differences from
HF PEFT:
- defaults are PEFT's (n_frequency=2592, scaling=25, wavelet_family=db1, random_loc_seed=777,
  coefficients starting at zero: the base at step 0) except ``targets`` (peftlab's
  ``all-linear``); PEFT's ``init_weights=False`` (standard normal times 0.01) is ``init=gaussian``;
- a layer with fewer than ``n_frequency`` entries gets all of them (PEFT refuses such a layer), so
  the defaults attach to small layers; the file records that layer's count in
  ``n_frequency_pattern``. PEFT's ``proportional_parameters`` has no setting here; such a file
  loads with each layer's count read from its tensors;
- wavelet families: ``db1`` (Haar) to ``db10``; PEFT's symlets and coiflets are refused with a
  clear error (their filters are tables, not yet derived here);
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused with a clear
  error; ``bias`` training has no setting here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .fourierft import spectral_indices
from .lora import MergesDelta, _pattern_value, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Bilican et al., 2025 (arXiv:2505.12532)"
MERGEABLE = True
# neither the paper (SDXL personalisation) nor PEFT gives a rate for language models; a Haar
# coefficient moves a 2 x 2 patch by scaling / 2 = 12.5 times its own step (FourierFT's spreads
# scaling / (out in) over the whole weight and needs 5e-2), so LoRA's 1e-3 is the starting point
DEFAULT_LR = 1e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INVALID_SETTINGS = ("n_frequency=0", "scaling=0", "wavelet_family=sym4", "random_loc_seed=none", "init=ones",
                    "use_idwt=maybe", "n_frequency_pattern=3")
INITS = ("zeros", "gaussian")
FAMILIES = tuple(f"db{n}" for n in range(1, 11))


@dataclass
class WaveFTConfig(MethodConfig):
    """n_frequency: trained wavelet coefficients per layer (capped at the layer's out * in);
    scaling: the update's scale (PEFT: 25 for SDXL); wavelet_family: db1 (Haar) ... db10;
    use_idwt: false places the coefficients in the weight directly (no transform); random_loc_seed:
    seed of the coefficients' positions; init: zeros (the base at step 0) or gaussian (std 0.01);
    n_frequency_pattern: per-module counts keyed by a module-name suffix or regex."""

    method: ClassVar[str] = "waveft"
    n_frequency: int = 2592
    scaling: float = 25.0
    wavelet_family: str = "db1"
    use_idwt: bool = True
    random_loc_seed: int = 777
    init: str = "zeros"
    n_frequency_pattern: dict = field(default_factory=dict)

    def validate(self) -> None:
        super().validate()
        pattern = self.n_frequency_pattern
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ConfigError(f"waveft: n_frequency_pattern must map module names (suffixes or regexes) to counts, "
                              f"e.g. {{'down_proj': 500}}; got {pattern!r}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error as error:
                raise ConfigError(f"waveft: n_frequency_pattern key {k!r} is not a valid regex ({error})") from None
        counts = [self.n_frequency, *pattern.values()]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts):
            raise ConfigError(f"waveft: n_frequency must be a positive integer, got {counts}")
        s = self.scaling
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s != 0):
            raise ConfigError(f"waveft: scaling must be a finite non-zero number (PEFT's default is 25), got {s!r}")
        if self.wavelet_family not in FAMILIES:
            raise ConfigError(f"waveft: wavelet_family {self.wavelet_family!r} is not available; peftlab derives the "
                              f"Daubechies filters db1 (Haar) to db10 (PEFT's symlets and coiflets are not implemented)")
        if not isinstance(self.use_idwt, bool):
            raise ConfigError(f"waveft: use_idwt must be true or false, got {self.use_idwt!r}")
        seed = self.random_loc_seed
        if not (isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64):
            raise ConfigError(f"waveft: random_loc_seed must be an integer seed, got {seed!r}")
        if self.init not in INITS:
            raise ConfigError(f"waveft: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def n_for(self, module_name: str, out_features: int, in_features: int) -> int:
        """The layer's coefficient count: its pattern's or ``n_frequency``, capped at ``out * in``."""
        return min(_pattern_value(self.n_frequency_pattern, module_name, self.n_frequency), out_features * in_features)


# ---- pure math -------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def daubechies(family: str) -> tuple[tuple, tuple]:
    """``(rec_lo, rec_hi)`` of ``dbN`` (``db1``: Haar), PyWavelets' convention, in float64.

    The low-pass filter is ``sqrt(2) ((1 + z) / 2)^N Q(z)``, with ``|Q|^2`` the Daubechies
    polynomial ``P(y) = sum_k C(N - 1 + k, k) y^k`` at ``y = (2 - z - 1/z) / 4``: each root ``y_i``
    gives a pair of roots ``z, 1/z`` and the one inside the unit circle is kept (minimum phase).
    ``rec_hi[i] = (-1)^i rec_lo[L - 1 - i]``."""
    N = int(family[2:])
    roots = []
    for y in np.roots([math.comb(N - 1 + k, k) for k in reversed(range(N))]) if N > 1 else []:
        pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        roots.append(pair[np.argmin(np.abs(pair))])
    poly = np.poly(roots) if roots else np.ones(1)
    for _ in range(N):
        poly = np.convolve(poly, [1.0, 1.0])
    lo = np.real(poly) / np.real(poly).sum() * math.sqrt(2.0)
    hi = [(-1) ** i * lo[len(lo) - 1 - i] for i in range(len(lo))]
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


def synthesis(lo: torch.Tensor, hi: torch.Tensor, rec_lo: torch.Tensor, rec_hi: torch.Tensor) -> torch.Tensor:
    """One inverse DWT step along the last axis: ``x[2p + a] += lo[p] rec_lo[a] + hi[p] rec_hi[a]``,
    without the first and last ``L - 2`` samples (length ``2 n + 2 - L``)."""
    n, L = lo.shape[-1], rec_lo.shape[0]
    pair = torch.stack([lo, hi], -2).reshape(-1, 2, n)
    x = F.conv_transpose1d(pair, torch.stack([rec_lo, rec_hi])[:, None, :], stride=2)[:, 0]
    x = x[:, L - 2: x.shape[-1] - (L - 2)]
    return x.reshape(*lo.shape[:-1], x.shape[-1])


def idwt2(coefficients: torch.Tensor, family: str) -> torch.Tensor:
    """The one-level 2-D inverse DWT of an even-sized coefficient matrix whose quadrants are
    (approximation, row detail / column detail, diagonal) as PEFT lays them out: top left is
    low-pass on both axes, top right high-pass along rows, bottom left high-pass along columns."""
    lo_f, hi_f = (torch.tensor(f, dtype=coefficients.dtype, device=coefficients.device) for f in daubechies(family))
    H2, W2 = coefficients.shape[0] // 2, coefficients.shape[1] // 2
    cA, cH = coefficients[:H2, :W2], coefficients[:H2, W2:]
    cV, cD = coefficients[H2:, :W2], coefficients[H2:, W2:]
    rows_lo = synthesis(cA, cV, lo_f, hi_f)   # the blocks low-pass along rows, synthesised along columns
    rows_hi = synthesis(cH, cD, lo_f, hi_f)   # the blocks high-pass along rows
    return synthesis(rows_lo.T, rows_hi.T, lo_f, hi_f).T


def padded_shape(out_features: int, in_features: int, family: str, use_idwt: bool = True) -> tuple[int, int]:
    """The coefficient matrix's size: the weight's grown by ``L - 2`` per axis, rounded up to even."""
    if not use_idwt:
        return out_features, in_features
    extra = len(daubechies(family)[0]) - 2
    return tuple(n + extra + (n + extra) % 2 for n in (out_features, in_features))


def delta_weight(spectrum, indices, out_features: int, in_features: int, scale: float, family: str,
                 use_idwt: bool = True) -> torch.Tensor:
    """``scale * IDWT2(C)`` cropped to (out x in) about its centre, in the spectrum's dtype."""
    rows, cols = padded_shape(out_features, in_features, family, use_idwt)
    top, left = (rows - out_features) // 2, (cols - in_features) // 2
    dense = torch.zeros(rows, cols, device=spectrum.device, dtype=torch.float32)
    dense = dense.index_put((indices[0] + top, indices[1] + left), spectrum.float())
    full = idwt2(dense, family) if use_idwt else dense
    top, left = (full.shape[0] - out_features) // 2, (full.shape[1] - in_features) // 2
    return (full[top:top + out_features, left:left + in_features] * scale).to(spectrum.dtype)


# ---- module ----------------------------------------------------------------------------------

class WaveFTLinear(MergesDelta, nn.Module):
    """WaveFT for ``nn.Linear``: returns ``delta W x`` with ``delta W`` formed by one inverse DWT."""

    def __init__(self, base: nn.Module, n_frequency: int, scaling: float, wavelet_family: str = "db1",
                 use_idwt: bool = True, random_loc_seed: int = 777, init: str = "zeros"):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.n_frequency, self.scaling, self.wavelet_family = n_frequency, scaling, wavelet_family
        self.use_idwt, self.random_loc_seed, self.init = use_idwt, random_loc_seed, init
        # derived from the seed and the shape, so never saved
        self.register_buffer("indices", spectral_indices(self.out_features, self.in_features, n_frequency, random_loc_seed)
                             .to(w.device), persistent=False)
        start = torch.zeros(n_frequency) if init == "zeros" else torch.randn(n_frequency) * 0.01
        self.waveft_spectrum = nn.Parameter(start.to(w.device, dtype))

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.waveft_spectrum, self.indices, self.out_features, self.in_features, self.scaling,
                            self.wavelet_family, self.use_idwt)

    def forward(self, x, base_out):
        delta = self.delta_weight()
        return F.linear(x.to(delta.dtype), delta)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer in one matmul with ``W + delta W``; None where it does not apply."""
        if type(base) is not nn.Linear or x.dtype != self.waveft_spectrum.dtype or x.dtype != base.weight.dtype:
            return None
        return F.linear(x, base.weight + self.delta_weight(), base.bias)


# ---- method protocol -------------------------------------------------------------------------

Config = WaveFTConfig


def make_adapter(module: nn.Module, config: WaveFTConfig, name: str) -> nn.Module:
    refuse_non_linear("waveft", module, name)
    out_features, in_features = base_weight(module).shape
    return WaveFTLinear(module, config.n_for(name, out_features, in_features), config.scaling, config.wavelet_family,
                        config.use_idwt, config.random_loc_seed, config.init)
