"""PVeRA: Probabilistic Vector-Based Random Matrix Adaptation (Fillioux et al., WACV 2026,
arXiv:2512.07703).

VeRA (``methods/vera.py``) with a random latent: the shared frozen ``A`` has ``2r`` rows instead
of ``r``, and what ``diag(d) A x`` gives is read as the mean and the log-variance of a Gaussian
over the r-dimensional latent that ``B`` maps back out::

    [mu; logvar] = diag(d) A x,      A: 2r x in,  d: 2r
    z = mu + eps * exp(logvar / 2),  eps ~ N(0, I)    (training; the mean mu in evaluation)
    delta(x) = diag(b) B z,          B: out x r,  b: out

A layer trains ``2r + out`` numbers; ``A`` and ``B`` are one frozen pair for the whole adapter,
sized by the widest adapted layers and sliced per layer, drawn from ``projection_prng_key`` (A,
then B, Kaiming-uniform, VeRA's draw with ``2r`` rows for A), exactly HF PEFT's matrices. Sampling
in training is the reparameterisation trick, so gradients reach both halves of ``d``; evaluation
uses the mean, unless ``sample_at_inference`` asks for draws (Monte Carlo confidence estimates,
as the paper does). ``b`` starts at zero and ``d`` at ``d_initial``, so the model is exactly the
base at step 0 (with or without sampling). The mean path is the VeRA update of the first ``r``
rows, ``diag(b) B diag(d[:r]) A[:r]``: that is what merges (so a merged model equals the unmerged
one in evaluation, not its training-time samples) and what runs through LoRA's fused kernel.

Reuses VeRA's module (the shared pair held by the first layer and referenced by the rest, the
per-layer slicing, merging) and its Kaiming draw; only the latent differs.

Reads and writes HF PEFT's ``PVERA`` format exactly (``formats/hf_pvera.py``). Differences from
HF PEFT:
- defaults are PEFT's (r=256, d_initial=0.1, projection_prng_key=0, save_projection=True,
  sample_at_inference=False, generator_seed=None) except ``targets`` (peftlab's ``all-linear``);
  ``pvera_dropout`` is ``dropout`` here;
- the paper also regularises the latent with a KL term; neither PEFT nor peftlab adds it (the
  loss is the task's), so files and training match PEFT's;
- with ``generator_seed`` the draws come from one CPU generator per layer (PEFT: per layer and
  adapter, also on CPU), reproducible run to run; without it they come from torch's global
  generator, which gradient checkpointing replays exactly;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly;
  ``bias`` training has no setting here (use ``bitfit`` beside it); each named PVeRA adapter has
  its own pair (PEFT shares the first adapter's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lora import _FusedLoraLinear, base_weight
from .vera import VeraConfig, VeraLinear, can_wrap, kaiming_uniform, refuse_non_linear  # noqa: F401  (can_wrap: protocol)

CATEGORY = "reparameterized"
PAPER = "Fillioux et al., 2026 (arXiv:2512.07703)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "d_initial=0", "dropout=1.5", "projection_prng_key=1.5", "save_projection=maybe",
                    "sample_at_inference=maybe", "generator_seed=1.5")
# The authors search one grid for VeRA and PVeRA (1e-3 to 1e-5, AdamW, up to 500 epochs on VTAB-1k: config/adapters.yaml
# of github.com/leofillioux/pvera); at peftlab's short budgets VeRA trains at 1e-2, and PVeRA's sampled latent (noise
# of std ~1 at init against a mean of ~0.1 A x) weakens each step's signal: twelve steps on the tiny Llama lower the
# loss 2% at 1e-2, 9% at 2e-2, 15% at 3e-2. So 2e-2, for the SST-2 measurement to settle
DEFAULT_LR = 2e-2
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class PveraConfig(VeraConfig):
    """VeRA's settings (r: latent size; A has 2r rows, for the mean and the log-variance), plus
    sample_at_inference: draw the latent in evaluation too (else its mean); generator_seed: seed
    of the draws (none: torch's global generator)."""

    method: ClassVar[str] = "pvera"
    sample_at_inference: bool = False
    generator_seed: int | None = None

    def validate(self) -> None:
        try:
            super().validate()
        except ConfigError as error:
            raise ConfigError(str(error).replace("vera:", "pvera:", 1)) from None
        if not isinstance(self.sample_at_inference, bool):
            raise ConfigError(f"pvera: sample_at_inference must be true or false, got {self.sample_at_inference!r}")
        seed = self.generator_seed
        if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and -2**63 <= seed < 2**64):
            raise ConfigError(f"pvera: generator_seed must be an integer seed or none, got {seed!r}")


# ---- pure math -------------------------------------------------------------------------------

def projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair: A (2r x in: mean rows, then log-variance rows), B (out x r), drawn
    in that order from a CPU generator seeded with ``key``: HF PEFT's matrices for the same key."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    return kaiming_uniform((2 * r, in_features), generator), kaiming_uniform((out_features, r), generator)


def latent(x, A, lambda_d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mu, logvar)``, each (..., r): the two halves of ``diag(d) A x``."""
    return (F.linear(x, A) * lambda_d).chunk(2, dim=-1)


def sample(mu, logvar, eps) -> torch.Tensor:
    """The reparameterised draw ``mu + eps * exp(logvar / 2)``."""
    return mu + eps * torch.exp(0.5 * logvar)


def mean_pair(A, B, lambda_d, lambda_b) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean path as a LoRA pair (scale 1): ``(diag(d[:r]) A[:r], diag(b) B)``."""
    r = B.shape[1]
    return lambda_d[:r, None] * A[:r], lambda_b[:, None] * B


def delta_weight(A, B, lambda_d, lambda_b) -> torch.Tensor:
    """The mean update ``diag(b) B diag(d[:r]) A[:r]`` (out x in): what merges."""
    A2, B2 = mean_pair(A, B, lambda_d, lambda_b)
    return B2 @ A2


# ---- module ----------------------------------------------------------------------------------

class PveraLinear(VeraLinear):
    """PVeRA for ``nn.Linear``: VeRA's layer with a 2r-wide ``d`` and a sampled latent. The first
    layer of an adapter holds the shared ``pvera_A`` / ``pvera_B`` buffers; the others read them from it."""

    def __init__(self, base: nn.Module, config: PveraConfig):
        nn.Module.__init__(self)
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r = config.r
        self.sample_at_inference = config.sample_at_inference
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.pvera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=dtype))
        self.pvera_lambda_d = nn.Parameter(torch.full((2 * config.r,), float(config.d_initial), device=w.device, dtype=dtype))
        seed = config.generator_seed
        self.__dict__["generator"] = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)

    def own_projections(self, A: torch.Tensor, B: torch.Tensor) -> None:
        like = self.pvera_lambda_d
        self.register_buffer("pvera_A", A.to(like.device, like.dtype))
        self.register_buffer("pvera_B", B.to(like.device, like.dtype))

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared ``(A, B)`` whole (2r x max in, max out x r)."""
        owner = self.__dict__.get("projection_owner", self)
        return owner._buffers["pvera_A"], owner._buffers["pvera_B"]

    def sampling(self) -> bool:
        return self.training or self.sample_at_inference

    def noise(self, like: torch.Tensor) -> torch.Tensor:
        generator = self.__dict__["generator"]
        if generator is None:
            return torch.randn_like(like)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(*self._sliced(), self.pvera_lambda_d, self.pvera_lambda_b)

    def forward(self, x, base_out):
        A, B = self._sliced()
        mu, logvar = latent(self.dropout(x), A, self.pvera_lambda_d)
        z = sample(mu, logvar, self.noise(mu)) if self.sampling() else mu
        return F.linear(z, B) * self.pvera_lambda_b

    def fused_forward(self, base: nn.Module, x):
        """Evaluation without sampling: the mean path through LoRA's fused kernel; None otherwise."""
        if (self.sampling() or type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity)
                or x.dtype != self.pvera_lambda_d.dtype):
            return None
        A2, B2 = mean_pair(*self._sliced(), self.pvera_lambda_d, self.pvera_lambda_b)
        return _FusedLoraLinear.apply(x, base.weight, base.bias, A2, B2, 1.0)


# ---- method protocol -------------------------------------------------------------------------

Config = PveraConfig


def make_adapter(module: nn.Module, config: PveraConfig, name: str) -> nn.Module:
    refuse_non_linear("pvera", module, name)
    return PveraLinear(module, config)


def after_attach(model: nn.Module, name: str, config: PveraConfig) -> None:
    """Draw the one shared (A, B) pair, sized by the widest adapted layers, and give it to every layer."""
    from ..core.adapters import method_adapters

    adapters = [adapter for _, adapter in method_adapters(model, name, "pvera")]
    if not adapters:
        return
    A, B = projections(config.r, max(a.in_features for a in adapters), max(a.out_features for a in adapters),
                       config.projection_prng_key)
    adapters[0].own_projections(A, B)
    for adapter in adapters[1:]:
        adapter.use_projections_of(adapters[0])
