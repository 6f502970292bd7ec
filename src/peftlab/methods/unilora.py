"""Uni-LoRA: One Vector is All You Need (Li et al., 2025, arXiv:2506.00799).

Every adapted layer's LoRA factors ``A`` (r x in) and ``B`` (out x r), flattened and stacked for
the whole model, form one vector of ``D`` numbers; Uni-LoRA trains a single vector ``theta_d`` of
``d << D`` numbers (``theta_d_length``) and reads the ``D`` numbers off it through a fixed
projection ``P`` (D x d)::

    vec([A_1, B_1, ..., A_L, B_L]) = P theta_d,   P[i, j] = 1 / sqrt(n_j) if position i reads entry j, else 0
    delta W_l = B_l A_l                            (no scale)

Each position reads exactly one entry, chosen by a seeded shuffle (``proj_seed``) that uses every
entry ``floor(D / d)`` or ``ceil(D / d)`` times; ``n_j`` is how often entry ``j`` is used. The
columns of ``P`` are then orthonormal (``P^T P = I``), so the projection is an isometry: distances
and gradient norms in ``theta_d``'s space are those of the LoRA space it spans, the paper's
argument for a well-conditioned "one vector" that is shared across all layers, not per layer.
What trains is ``d`` numbers for the whole model (256 by default); each layer keeps only integer
indices and scales, frozen. ``theta_d`` starts uniform in ``+-init_theta_d_bound`` (0.02), as in
PEFT: both factors start non-zero, so the model is close to, not exactly, the base at step 0
(``IDENTITY_AT_INIT = False``) and every entry gets a gradient from the first step. The update is
a weight, so it merges; the forward assembles the thin ``A`` and ``B`` and runs LoRA's fused kernel.

``theta_d`` is held like VB-LoRA's bank (``methods/vblora.py``): a parameter registered on the
first adapted layer (saved and trained once, moved with ``.to()``) and referenced by the others.

Reads and writes HF PEFT's ``UNILORA`` format exactly (``formats/hf_unilora.py``); the index
assignment reproduces PEFT's (NumPy's ``default_rng(proj_seed)``, layers in model order, each
layer's A then B), so a file without indices (PEFT's default) gives the same adapter in both.
Differences from HF PEFT:
- defaults are PEFT's (r=4, theta_d_length=256, proj_seed=42, init_theta_d_bound=0.02,
  save_indices=False) except ``targets`` (peftlab's ``all-linear``); ``unilora_dropout`` is
  ``dropout`` here; PEFT's ``init_weights=False`` (a normal ``theta_d``) has no setting;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly;
  ``bias`` training has no setting here (use ``bitfit`` beside it);
- each named Uni-LoRA adapter has its own vector and assignment (as in PEFT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import base_weight
from .lowrank import FactoredUpdate
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Li et al., 2025 (arXiv:2506.00799)"
MERGEABLE = True
IDENTITY_AT_INIT = False  # theta_d starts uniform in +-0.02, so A and B (and B A) start small, not zero
INVALID_SETTINGS = ("r=0", "theta_d_length=0", "dropout=1.5", "init_theta_d_bound=0", "proj_seed=1.5",
                    "save_indices=maybe")
# The authors train theta_d at 5e-3 (RoBERTa on GLUE, 80 epochs) and 2e-3 (7B models on MetaMathQA): the scripts of
# github.com/KaiyangLi1992/Uni-LoRA. Both factors start near zero (+-0.02 / sqrt(uses)), so their product learns
# slowly at first, and peftlab's budgets are short: twelve steps on the tiny Llama lower the loss 0.3% at 5e-3 and 5%
# at 2e-2. So 2e-2, for the SST-2 measurement to settle
DEFAULT_LR = 2e-2
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class UniLoRAConfig(MethodConfig):
    """r: rank of every layer's A and B; theta_d_length: size d of the one trained vector;
    proj_seed: seed of the fixed assignment of LoRA positions to its entries; dropout: on the
    adapter's input; init_theta_d_bound: theta_d starts uniform in +-bound; save_indices: HF files
    also hold each layer's indices and scales (else both sides regenerate them from proj_seed)."""

    method: ClassVar[str] = "unilora"
    r: int = 4
    theta_d_length: int = 256
    proj_seed: int = 42
    dropout: float = 0.0
    init_theta_d_bound: float = 0.02
    save_indices: bool = False

    def validate(self) -> None:
        super().validate()
        for key in ("r", "theta_d_length"):
            value = getattr(self, key)
            if not (_is_int(value) and value > 0):
                raise ConfigError(f"unilora: {key} must be a positive integer, got {value!r}")
        if not (_is_int(self.proj_seed) and 0 <= self.proj_seed < 2**128):
            raise ConfigError(f"unilora: proj_seed must be a non-negative integer seed, got {self.proj_seed!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise ConfigError(f"unilora: dropout must be in [0, 1), got {self.dropout!r}")
        bound = self.init_theta_d_bound
        if not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound > 0):
            raise ConfigError(f"unilora: init_theta_d_bound must be a finite number > 0 (a zero vector gives A, B and every "
                              f"gradient zero), got {bound!r}; the default is 0.02")
        if not isinstance(self.save_indices, bool):
            raise ConfigError(f"unilora: save_indices must be true or false, got {self.save_indices!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- pure math -------------------------------------------------------------------------------

def assign(count: int, length: int, seed: int) -> torch.Tensor:
    """Which entry of theta_d each of ``count`` flattened LoRA positions reads: every entry
    ``count // length`` times, ``count % length`` distinct entries (drawn) once more, shuffled;
    NumPy's ``default_rng(seed)``, so the assignment is HF PEFT's."""
    rng = np.random.default_rng(seed)
    entries = np.repeat(np.arange(length), count // length)
    if count % length:
        entries = np.concatenate([entries, rng.choice(length, size=count % length, replace=False)])
    rng.shuffle(entries)
    return torch.as_tensor(entries, dtype=torch.long, device="cpu")  # on CPU even under a meta default device


def inverse_sqrt_counts(indices: torch.Tensor, length: int) -> torch.Tensor:
    """``1 / sqrt(n_j)`` per entry j (0 where unused): the value of P's non-zeros in column j."""
    counts = torch.bincount(indices, minlength=length).float()
    return torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))


def factor(theta: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One factor read off theta_d: ``theta[indices] * scales`` (P theta, restricted to its positions)."""
    return theta[indices] * scales


def delta_weight(theta, indices_A, indices_B, scales_A, scales_B) -> torch.Tensor:
    """The update ``B A`` (out x in)."""
    return factor(theta, indices_B, scales_B) @ factor(theta, indices_A, scales_A)


# ---- module ----------------------------------------------------------------------------------

class UniLoRALinear(FactoredUpdate, nn.Module):
    """Uni-LoRA for ``nn.Linear``: returns ``B (A dropout(x))`` with A and B read off the shared
    ``unilora_theta_d`` (held by the adapter's first layer) through this layer's indices and scales."""

    def __init__(self, base: nn.Module, config: UniLoRAConfig):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        self._like = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        self.r = config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        r, i, o = config.r, self.in_features, self.out_features
        # filled by after_attach, once every adapted layer of the adapter is known
        self.register_buffer("unilora_indices_A", torch.zeros(r, i, dtype=torch.long, device=w.device))
        self.register_buffer("unilora_indices_B", torch.zeros(o, r, dtype=torch.long, device=w.device))
        self.register_buffer("unilora_scales_A", torch.zeros(r, i, **self._like))
        self.register_buffer("unilora_scales_B", torch.zeros(o, r, **self._like))

    # the shared vector: registered on one layer (saved and trained once), referenced by the rest
    def own_theta(self, theta: torch.Tensor) -> None:
        self.unilora_theta_d = nn.Parameter(theta.to(**self._like))

    def use_theta_of(self, owner: "UniLoRALinear") -> None:
        self.__dict__["theta_owner"] = owner  # a plain reference, not a submodule: the vector is stored once

    def theta(self) -> torch.Tensor:
        return self.__dict__.get("theta_owner", self)._parameters["unilora_theta_d"]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, 1.0)``: forward, fused forward, delta and merging come from ``FactoredUpdate``."""
        theta = self.theta()
        return (factor(theta, self.unilora_indices_A, self.unilora_scales_A),
                factor(theta, self.unilora_indices_B, self.unilora_scales_B), 1.0)


# ---- method protocol -------------------------------------------------------------------------

Config = UniLoRAConfig


def make_adapter(module: nn.Module, config: UniLoRAConfig, name: str) -> nn.Module:
    refuse_non_linear("unilora", module, name)
    return UniLoRALinear(module, config)


def after_attach(model: nn.Module, name: str, config: UniLoRAConfig) -> None:
    """Assign every flattened LoRA position (layers in model order, each A then B) an entry of
    theta_d, set each layer's indices and scales, draw theta_d and give it to every layer."""
    from ..core.adapters import method_adapters

    adapters = [adapter for _, adapter in method_adapters(model, name, "unilora")]
    if not adapters:
        return
    buffers = [b for a in adapters for b in (a.unilora_indices_A, a.unilora_indices_B)]
    indices = assign(sum(b.numel() for b in buffers), config.theta_d_length, config.proj_seed)
    scales = inverse_sqrt_counts(indices, config.theta_d_length)
    start = 0
    for a in adapters:
        for key in ("A", "B"):
            target = getattr(a, f"unilora_indices_{key}")
            chunk = indices[start: start + target.numel()].view_as(target)
            start += target.numel()
            target.copy_(chunk)
            getattr(a, f"unilora_scales_{key}").copy_(scales[chunk])
    theta = torch.empty(config.theta_d_length).uniform_(-config.init_theta_d_bound, config.init_theta_d_bound)
    adapters[0].own_theta(theta)
    for adapter in adapters[1:]:
        adapter.use_theta_of(adapters[0])
