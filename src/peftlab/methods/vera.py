"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al., ICLR 2024, arXiv:2310.11454).

LoRA's update ``B A`` with both matrices frozen at random values and shared by every adapted
layer; what trains is two scaling vectors per layer::

    delta W = Lambda_b B Lambda_d A,    A: r x in,  B: out x r,  Lambda_d = diag(d) (r),  Lambda_b = diag(b) (out)

so a layer costs ``r + out`` trained parameters, whatever ``in`` (LoRA: ``r (in + out)``), and a
high ``r`` (default 256) is cheap. ``A`` and ``B`` are one pair of tensors for the whole adapter,
sized by the largest input and output widths among the adapted layers; a layer uses the top-left
corner (``A[:, :in]``, ``B[:out, :]``), as HF PEFT does. They are drawn Kaiming-uniform (fan-in,
gain sqrt(2)) from a CPU ``torch.Generator`` seeded with ``projection_prng_key``, ``A`` first, so
a key reproduces HF PEFT's matrices exactly. ``b`` starts at zero and ``d`` at ``d_initial``
(0.1), so the model is exactly the base model at step 0 and both vectors get gradients from the
first step (``d_initial = 0`` would give neither one a gradient, and is refused). The update is a
weight, so it merges into ``W``. The forward never forms ``delta W``: ``diag(d) A`` and
``diag(b) B`` are a LoRA pair (scale 1) and run through LoRA's fused kernel.

Reads and writes HF PEFT's ``VERA`` format exactly (``formats/hf_vera.py``): the vectors carry
PEFT's names (``vera_lambda_b``, ``vera_lambda_d``), and with ``save_projection`` (the default,
as in PEFT) the shared pair is saved once as ``base_model.vera_A`` / ``base_model.vera_B``;
without it the file holds only the vectors and both libraries regenerate the pair from
``projection_prng_key`` (tested equal to PEFT's). Differences from HF PEFT:
- defaults are PEFT's (r=256, d_initial=0.1, projection_prng_key=0, save_projection=True) except
  ``targets``, which is peftlab's ``all-linear``; PEFT's ``vera_dropout`` is ``dropout`` here;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D``, which PEFT takes with
  ``fan_in_fan_out``, is refused with a clear error; ``bias`` training ('all', 'vera_only') has no
  setting here (train biases with ``bitfit`` beside it);
- each named VeRA adapter has its own pair (PEFT shares the first adapter's pair with later ones
  and requires one key for all); a file holds one adapter, so files move both ways unchanged.
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

CATEGORY = "reparameterized"
PAPER = "Kopiczko et al., 2024 (arXiv:2310.11454)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "d_initial=0", "dropout=1.5", "projection_prng_key=1.5", "save_projection=maybe")
# only scaling vectors train, and b starts at zero, so VeRA wants rates far above LoRA's (its paper's are of order 1e-2)
DEFAULT_LR = 1e-2
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class VeraConfig(MethodConfig):
    """r: rank of the shared random projections (cheap: a layer trains r + out numbers);
    d_initial: the start value of every d; dropout: on the adapter's input; projection_prng_key:
    seed of the shared random A and B; save_projection: write A and B into the file (else they are
    regenerated from the key on load, as in PEFT)."""

    method: ClassVar[str] = "vera"
    r: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"vera: rank r must be a positive integer, got {self.r!r}")
        d = self.d_initial
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) and d != 0):
            raise ConfigError(f"vera: d_initial must be a finite non-zero number (b starts at 0, so d = 0 would give neither "
                              f"vector a gradient); got {d!r}; the paper recommends 0.1 or less")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"vera: dropout must be in [0, 1), got {self.dropout!r}")
        key = self.projection_prng_key
        if not (isinstance(key, int) and not isinstance(key, bool) and -2**63 <= key < 2**64):
            raise ConfigError(f"vera: projection_prng_key must be an integer seed, got {key!r}")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"vera: save_projection must be true or false, got {self.save_projection!r}")


# ---- pure math -------------------------------------------------------------------------------

def kaiming_uniform(shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform for a ReLU gain (bound sqrt(6 / fan_in), fan_in = ``shape[1]``) drawn from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def projections(r: int, in_features: int, out_features: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen pair ``(A, B)``, A: r x in, B: out x r, drawn in that order from a CPU
    generator seeded with ``key`` (float32): HF PEFT's matrices for the same key and sizes."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    A = kaiming_uniform((r, in_features), generator)
    B = kaiming_uniform((out_features, r), generator)
    return A, B


def scaled_pair(A, B, lambda_d, lambda_b) -> tuple[torch.Tensor, torch.Tensor]:
    """``(diag(d) A, diag(b) B)`` for one layer (A and B already sliced to it): a LoRA pair, scale 1."""
    return lambda_d[:, None] * A, lambda_b[:, None] * B


def delta_weight(A, B, lambda_d, lambda_b) -> torch.Tensor:
    """The update ``diag(b) B diag(d) A`` in (out x in) layout."""
    A2, B2 = scaled_pair(A, B, lambda_d, lambda_b)
    return B2 @ A2


# ---- module ----------------------------------------------------------------------------------

class VeraLinear(MergesDelta, nn.Module):
    """VeRA for ``nn.Linear``: returns ``b * (B[:out] (d * (A[:, :in] x)))``. The first layer of an
    adapter holds the shared ``vera_A`` / ``vera_B`` buffers; the others read them from it."""

    def __init__(self, base: nn.Module, r: int, d_initial: float = 0.1, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        w = base.weight
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        self.r = r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=dtype))
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=w.device, dtype=dtype))

    # the shared pair: registered on one layer (so it moves with .to() and is saved once), referenced by the rest
    def own_projections(self, A: torch.Tensor, B: torch.Tensor) -> None:
        like = self.vera_lambda_d
        self.register_buffer("vera_A", A.to(like.device, like.dtype))
        self.register_buffer("vera_B", B.to(like.device, like.dtype))

    def use_projections_of(self, owner: "VeraLinear") -> None:
        self.__dict__["projection_owner"] = owner  # a plain reference, not a submodule: the pair is stored once

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared ``(A, B)`` whole (r x max in, max out x r)."""
        owner = self.__dict__.get("projection_owner", self)
        return owner._buffers["vera_A"], owner._buffers["vera_B"]

    def _sliced(self):
        A, B = self.projections()
        return A[:, : self.in_features], B[: self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(*self._sliced(), self.vera_lambda_d, self.vera_lambda_b)

    def forward(self, x, base_out):
        A, B = self._sliced()
        h = F.linear(self.dropout(x), A) * self.vera_lambda_d
        return F.linear(h, B) * self.vera_lambda_b

    def fused_forward(self, base: nn.Module, x):
        """The whole layer through LoRA's fused kernel with ``(diag(d) A, diag(b) B)``; None where it does not apply."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.vera_lambda_d.dtype:
            return None
        if torch.is_grad_enabled() and self.vera_lambda_d.requires_grad:
            # training: the fused kernel would compute full (r x in) and (out x r) gradients of the scaled
            # pair only to reduce them to d and b; the plain forward gives d and b theirs directly (with
            # VeRA's large r that saved a fifth of the SST-2 step, benchmarks/twin_step.py)
            return None
        A2, B2 = scaled_pair(*self._sliced(), self.vera_lambda_d, self.vera_lambda_b)
        return _FusedLoraLinear.apply(x, base.weight, base.bias, A2, B2, 1.0)


# ---- method protocol -------------------------------------------------------------------------

Config = VeraConfig


def refuse_non_linear(method: str, module: nn.Module, name: str) -> None:
    """VeRA and FourierFT: nn.Linear (quantized included) only."""
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"{method}: '{name}' is a {type(module).__name__}; peftlab's {method} adapts nn.Linear layers only "
                          "(HF PEFT's also takes GPT-2's Conv1D with fan_in_fan_out, which peftlab does not yet); "
                          "leave it out with 'exclude' or choose other targets")


def can_wrap(module: nn.Module) -> bool:
    # Conv1D is matched too, so that naming one gives the clear refusal of make_adapter, not "nothing matched"
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def make_adapter(module: nn.Module, config: VeraConfig, name: str) -> nn.Module:
    refuse_non_linear("vera", module, name)
    return VeraLinear(module, config.r, config.d_initial, config.dropout)


def after_attach(model: nn.Module, name: str, config: VeraConfig) -> None:
    """Draw the one shared (A, B) pair, sized by the widest adapted layers, and give it to every layer."""
    from ..core.adapters import method_adapters

    adapters = [adapter for _, adapter in method_adapters(model, name, "vera")]
    if not adapters:
        return
    max_in = max(a.in_features for a in adapters)
    max_out = max(a.out_features for a in adapters)
    A, B = projections(config.r, max_in, max_out, config.projection_prng_key)
    adapters[0].own_projections(A, B)
    for adapter in adapters[1:]:
        adapter.use_projections_of(adapters[0])
