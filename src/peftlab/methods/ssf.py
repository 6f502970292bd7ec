"""SSF: Scaling & Shifting Your Features.

Lian et al., 2022, "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning"
(NeurIPS 2022, arXiv:2210.08823) observe that the features of a pretrained model only need to be
re-scaled and re-centred to fit a new task's distribution. After each operation (linear layers,
norms, ...) SSF inserts ``y = gamma * x + beta``, a learned scale and shift per feature, and trains
only those. As the transform is linear and follows a linear operation, it is folded into that
operation after training ("re-parameterized"), so the tuned model costs nothing extra at inference.

Here the adapter of a module adds ``(gamma - 1) * out + beta`` to the module's output ``out``, with
``gamma`` initialised to ones and ``beta`` to zeros, so the model equals the base at init (the
authors' code draws them from N(1, 0.02) and N(0, 0.02)). Default targets: every linear layer but
the output head, and every norm (``targets=[all-linear,norms]``), as the paper does.

Mergeable: for a linear layer ``W' = diag(gamma) W`` and ``b' = gamma * b + beta`` (a layer without
a bias gets one); for a norm, its weight becomes ``gamma * w`` and its bias ``gamma * b + beta``.
A norm without a bias slot (RMSNorm) gets a scale only: a shift after it could not be merged, and
would only add a constant to the next linear layers' outputs, which their own shifts already can.
The merge assumes the norm computes ``normalized * weight + bias`` (LayerNorm, Llama's RMSNorm),
not ``normalized * (1 + weight)`` (Gemma's). Unmerging divides by ``gamma``, so merging refuses a
scale of exactly zero (and leaves the model unmerged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import ALL_LINEAR, is_linear, is_norm
from ..errors import StateError
from .bitfit import feature_dtype, output_shape, shift_bias
from .lora import base_weight, set_base_weight

CATEGORY = "additive"
PAPER = "Lian et al., 2022 (arXiv:2210.08823)"
MERGEABLE = True
INVALID_SETTINGS = ("targets=[]", "layers=[-1]", "exclude=[1]")
DEFAULT_LR = 5e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class SsfConfig(MethodConfig):
    """targets: the operations to follow with a scale and shift (default: every linear layer but
    the head, and every norm)."""

    method: ClassVar[str] = "ssf"
    targets: Any = field(default_factory=lambda: [ALL_LINEAR, "norms"])


# ---- pure math -------------------------------------------------------------------------------

def scale_outputs(base: nn.Module, factor: torch.Tensor) -> None:
    """Fold ``out * factor`` into a linear layer or a norm: the weight's rows (a norm's weight
    itself) and the bias are multiplied by ``factor``."""
    with torch.no_grad():
        weight = base_weight(base)
        set_base_weight(base, weight * factor.reshape(*factor.shape, *[1] * (weight.dim() - factor.dim())))
        if getattr(base, "bias", None) is not None:
            base.bias.mul_(factor)


def check_invertible(factor: torch.Tensor, method: str) -> None:
    """Unmerging divides by the scales: refuse to merge a scale of exactly zero."""
    if not factor.all():
        raise StateError(f"{method}: a scale is exactly zero, so merging could not be undone; keep the adapter "
                         "unmerged, or set that scale to a tiny nonzero value")


# ---- module ----------------------------------------------------------------------------------

class ScaleShift(nn.Module):
    """``(gamma - 1) * out + beta`` added to the wrapped module's output ``out``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        shape, dtype, device = output_shape(base), feature_dtype(base), base.weight.device
        self.ssf_scale = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        shift = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)) if "bias" in base._parameters else None
        self.register_parameter("ssf_shift", shift)

    def forward(self, x, base_out):
        delta = (self.ssf_scale - 1) * base_out
        return delta if self.ssf_shift is None else delta + self.ssf_shift

    def merge(self, base: nn.Module) -> None:
        check_invertible(self.ssf_scale, "ssf")
        scale_outputs(base, self.ssf_scale)
        if self.ssf_shift is not None:
            shift_bias(base, self.ssf_shift)

    def unmerge(self, base: nn.Module) -> None:
        if self.ssf_shift is not None:
            shift_bias(base, -self.ssf_shift)
        scale_outputs(base, 1 / self.ssf_scale)

    def detach_from(self, base: nn.Module) -> None:
        pass


# ---- method protocol -------------------------------------------------------------------------

Config = SsfConfig


def can_wrap(module: nn.Module) -> bool:
    """Linear layers, and norms with a weight to fold the scale into."""
    return is_linear(module) or (is_norm(module) and getattr(module, "weight", None) is not None)


def make_adapter(module: nn.Module, config: SsfConfig, name: str) -> ScaleShift:
    return ScaleShift(module)
