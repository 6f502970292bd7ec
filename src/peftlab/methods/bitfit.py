"""BitFit: train only the bias terms of the model.

Ben Zaken, Ravfogel and Goldberg, 2022, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models" (arXiv:2106.10199) fine-tune BERT on GLUE by training
only its biases (under 0.1% of the parameters) and come close to full fine-tuning, arguing that
fine-tuning mostly exposes knowledge the model already has rather than learning new features.

Here each targeted module gets a trainable bias delta, zero at init, added to its output, instead
of unfreezing the base biases in place. That keeps peftlab's guarantees: several named BitFit
adapters share one base, ``disabled()`` is exactly the base, and only the deltas are saved.

Targets: every linear layer except the output head, and every norm that has a bias
(``targets=[all-linear,norms]``). Llama-style models have no biases at all: ``add_missing``
(on by default) gives a bias-free linear layer a zero bias that trains, so BitFit on a Llama is
"add and train a bias in every linear layer". RMSNorm has no bias slot and is left out; a bias
after it would only add a constant to the next linear layers' outputs, which their own bias
deltas already can. ``add_missing=false`` is strict BitFit: a targeted layer without a bias is
an error.

Mergeable: merging adds the delta to the module's bias; a layer without one gets a bias
parameter at merge, which unmerging removes again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import ALL_LINEAR, is_linear, is_norm
from ..errors import ConfigError, TargetError
from .lora import base_weight

CATEGORY = "selective"
PAPER = "Ben Zaken et al., 2022 (arXiv:2106.10199)"
MERGEABLE = True
INVALID_SETTINGS = ("add_missing=maybe", "add_missing=1", "targets=[]")
DEFAULT_LR = 2e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class BitFitConfig(MethodConfig):
    """targets: modules whose bias trains (default: every linear layer but the head, and the
    norms that have a bias); add_missing: give targeted layers without a bias a zero one."""

    method: ClassVar[str] = "bitfit"
    targets: Any = field(default_factory=lambda: [ALL_LINEAR, "norms"])
    add_missing: bool = True

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.add_missing, bool):
            raise ConfigError(f"bitfit: add_missing must be true or false, got {self.add_missing!r}")


# ---- pure math -------------------------------------------------------------------------------

def shift_bias(base: nn.Module, delta: torch.Tensor) -> None:
    """``bias += delta``. A module without a bias gets one, marked as added, which goes away once
    it is zero again, so that shifting by ``delta`` and then by ``-delta`` leaves the module as it was."""
    with torch.no_grad():
        if base.bias is None:
            base.bias = nn.Parameter(torch.zeros_like(delta), requires_grad=False)
            base.bias.peftlab_added = True
        base.bias.add_(delta)
        if getattr(base.bias, "peftlab_added", False) and not base.bias.any():
            base.bias = None


def output_shape(base: nn.Module) -> tuple:
    """The shape of the features a linear layer or a norm outputs (what its bias adds to)."""
    return (base_weight(base).shape[0],) if is_linear(base) else tuple(base.weight.shape)


def feature_dtype(base: nn.Module) -> torch.dtype:
    """Per-feature vectors are kept in the weight's dtype (fp32 where it is not floating point)."""
    dtype = base.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


# ---- module ----------------------------------------------------------------------------------

class BiasDelta(nn.Module):
    """Adds a trainable bias delta (zero at init) to the wrapped module's output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.bias_delta = nn.Parameter(torch.zeros(output_shape(base), dtype=feature_dtype(base), device=base.weight.device))

    def forward(self, x, base_out):
        return self.bias_delta.expand(base_out.shape)

    def merge(self, base: nn.Module) -> None:
        shift_bias(base, self.bias_delta)

    def unmerge(self, base: nn.Module) -> None:
        shift_bias(base, -self.bias_delta)

    def detach_from(self, base: nn.Module) -> None:
        pass


# ---- method protocol -------------------------------------------------------------------------

Config = BitFitConfig


def can_wrap(module: nn.Module) -> bool:
    """Linear layers and affine norms that have a bias slot (filled, or empty as in ``bias=False``)."""
    return (is_linear(module) or is_norm(module)) and "bias" in module._parameters and getattr(module, "weight", None) is not None


def make_adapter(module: nn.Module, config: BitFitConfig, name: str) -> BiasDelta:
    if module.bias is None and not config.add_missing:
        raise TargetError(f"bitfit: '{name}' has no bias and add_missing=false; set add_missing=true to give it a "
                          "zero bias that trains, or leave it out of targets")
    return BiasDelta(module)
