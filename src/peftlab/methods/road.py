"""RoAd: 2D rotary adaptation (Liao et al., 2025, "3-in-1: 2D Rotary Adaptation for Efficient
Finetuning, Efficient Batching and Composability", arXiv:2409.00119).

RoAd leaves the weight alone and turns the layer's OUTPUT: the ``out`` output features are split
into pairs and each pair ``(h_i, h_j)`` is multiplied by its own trained 2 x 2 matrix, a rotation
with a scale::

    [y_i]   [a_i cos t_i   -a_i sin t_i] [h_i]
    [y_j] = [a_j sin t_j    a_j cos t_j] [h_j],      h = W x + b,  y = R h

The paper's observation is that fine-tuning changes the angle of a hidden vector's pieces far more
than their length, so an angle and a scale per pair are enough (under 0.1% of the parameters). As
in the paper and HF PEFT, the features are grouped in ``group_size`` blocks and feature ``i`` of a
block is paired with feature ``i + group_size / 2`` (the way rotary embeddings pair halves), which
makes ``R h`` two elementwise products: ``h * c + rotate_half(h) * s``. Three variants:

- ``road_1``: one angle and one scale per pair (``out / 2`` of each): a scaled rotation;
- ``road_2``: one angle and one scale per feature (``out`` each): each row of the 2 x 2 its own;
- ``road_4``: per feature, two angles and two scales (``2 out`` each): the cosine entry and the
  sine entry of each row from their own angle and scale.

Angles start at 0 and scales at 1, so ``R = I`` and the model is exactly the base at step 0. Each
row of the batch is transformed by its own adapter with elementwise work only, which is RoAd's
selling point for serving many adapters in one batch: ``peftlab.routing`` runs it per row. Since
``R (W x + b) = (R W) x + R b``, RoAd merges into the weight (rows mixed pairwise) and the bias;
unmerge applies the 2 x 2 inverses (a pair whose determinant is 0 cannot be merged: a clear error).

Reads and writes HF PEFT's ``ROAD`` format exactly (``formats/hf_road.py``): ``road_theta`` and
``road_alpha`` per layer in PEFT's layout, ``variant`` and ``group_size`` meaning what they mean
there. Differences from HF PEFT:
- ``group_size`` unset (0, the default) is automatic: PEFT's 64 where it divides a layer's output
  width, else the largest even divisor of the width below 64 (PEFT refuses such a layer), so the
  defaults attach to tiny models. PEFT's format holds one group size for all layers; an adapter
  whose layers ended up with different sizes (only possible with the automatic size on widths 64
  does not divide) is saved in peftlab's own format, with a warning; give ``group_size`` (e.g. 16)
  to get a PEFT file;
- several RoAd adapters active on one layer each add their own change of the base output, where
  PEFT applies them one after another (``R_2 R_1 h``); one adapter, routed or not, is the same;
- ``nn.Linear`` only (quantized linear bases included); GPT-2's ``Conv1D`` is refused clearly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, StateError
from .bitfit import feature_dtype
from .lora import base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Liao et al., 2025 (arXiv:2409.00119)"
MERGEABLE = True
# HF PEFT's RoAd guide: "typically requires higher learning rate compared to LoRA ..., around 1e-3"
DEFAULT_LR = 1e-2  # SST-2, seed 0: 0.794 at 1e-2; at 1e-3 (peft's guide for LLMs) the loss did not move in 125 steps, ours and peft's alike
INVALID_SETTINGS = ("variant=road_3", "group_size=3", "group_size=-2", "init=zeros")
# RoAd turns a layer's output, as (IA)^3 scales it: on a tiny random model (weights at 0.02) the
# outputs it turns barely move the loss; at a pretrained weight scale they do
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
VARIANTS = ("road_1", "road_2", "road_4")
INITS = ("identity", "random")
DEFAULT_GROUP_SIZE = 64  # PEFT's group_size
PARAMS_PER_FEATURE = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass
class RoadConfig(MethodConfig):
    """variant: road_1 (an angle and a scale per pair of features), road_2 (per feature) or road_4
    (two per feature); group_size: features are paired i with i + group_size/2 inside blocks of
    this size (even, dividing every adapted output width; 0: 64 or the largest even divisor below);
    init: identity (angles 0, scales 1: the base model) or random (PEFT's init_weights=False)."""

    method: ClassVar[str] = "road"
    variant: str = "road_1"
    group_size: int = 0
    init: str = "identity"

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ConfigError(f"road: variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        g = self.group_size
        if not (isinstance(g, int) and not isinstance(g, bool) and g >= 0 and g % 2 == 0):
            raise ConfigError(f"road: group_size must be an even positive integer (features are paired within groups), "
                              f"or 0 for automatic; got {g!r}")
        if self.init not in INITS:
            raise ConfigError(f"road: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def group_size_for(self, out_features: int, module_name: str = "") -> int:
        """The group size of a layer with ``out_features`` outputs (ConfigError where none fits)."""
        where = f"'{module_name}'" if module_name else "a layer"
        if self.group_size:
            if out_features % self.group_size:
                raise ConfigError(f"road: group_size={self.group_size} does not divide the {out_features} outputs of {where}; "
                                  "choose an even divisor of every adapted width, or leave group_size unset (automatic)")
            return self.group_size
        if out_features % DEFAULT_GROUP_SIZE == 0:
            return DEFAULT_GROUP_SIZE
        even = [d for d in range(2, DEFAULT_GROUP_SIZE, 2) if out_features % d == 0]
        if not even:
            raise ConfigError(f"road: {where} has {out_features} outputs, an odd number; RoAd pairs output features, "
                              "so leave this layer out with 'exclude'")
        return even[-1]


# ---- pure math -------------------------------------------------------------------------------

def parameter_size(variant: str, out_features: int) -> int:
    """Entries of ``road_theta`` (and of ``road_alpha``) for a layer with ``out_features`` outputs."""
    return int(out_features * PARAMS_PER_FEATURE[variant])


def columns(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c, s)``, each (out,): ``R h = h * c + rotate_half(h) * s``. Row ``p`` of ``R`` holds
    ``c_p`` on the diagonal and ``s_p`` against its partner (with a minus sign in a block's first half)."""
    if variant == "road_1":  # one (angle, scale) per pair: a block's two halves share them
        half = group_size // 2
        theta, alpha = (t.reshape(-1, 1, half).expand(-1, 2, half).reshape(-1) for t in (theta, alpha))
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    # road_4: per block, group_size entries for the cosine column, then group_size for the sine column
    theta, alpha = theta.reshape(-1, 2, group_size), alpha.reshape(-1, 2, group_size)
    return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)


def rotate_half(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per block of the last dimension, ``(h_1, h_2) -> (-h_2, h_1)`` (h_1, h_2 its two halves)."""
    blocks = h.unflatten(-1, (-1, 2, group_size // 2))
    return torch.stack((-blocks[..., 1, :], blocks[..., 0, :]), dim=-2).flatten(-3)


def swap_halves(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each entry's partner's value: the two halves of every block exchanged."""
    return v.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)


def apply_road(h: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R h`` over the last dimension of ``h``: two elementwise products."""
    return h * c + rotate_half(h, group_size) * s


def determinants(c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each entry's 2 x 2 block determinant ``c_i c_j + s_i s_j`` (i, j partners)."""
    return c * swap_halves(c, group_size) + s * swap_halves(s, group_size)


def inverse_columns(c: torch.Tensor, s: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c', s')`` of ``R^{-1}`` (blockwise 2 x 2 inverses), in the same two-vector form."""
    det = determinants(c, s, group_size)
    return swap_halves(c, group_size) / det, -s / det


def rotate_weight(W: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """``R W`` (W: out x in): each column of ``W`` turned as an output would be."""
    return apply_road(W.t(), c, s, group_size).t()


# ---- module ----------------------------------------------------------------------------------

class RoadLinear(nn.Module):
    """RoAd for ``nn.Linear``: returns ``R h - h`` for the base output ``h``."""

    def __init__(self, base: nn.Module, variant: str, group_size: int, init: str = "identity"):
        super().__init__()
        self.out_features, self.in_features = base_weight(base).shape
        self.variant, self.group_size = variant, group_size
        size, device, dtype = parameter_size(variant, self.out_features), base.weight.device, feature_dtype(base)
        if init == "identity":
            theta, alpha = torch.zeros(size), torch.ones(size)
        else:  # PEFT's init_weights=False
            theta, alpha = torch.randn(size) * 0.5, 1 + torch.randn(size) * 0.5
        self.road_theta = nn.Parameter(theta.to(device, dtype))
        self.road_alpha = nn.Parameter(alpha.to(device, dtype))

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        return columns(self.variant, self.group_size, self.road_theta, self.road_alpha)

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        """``R h`` (in the adapter's dtype, returned in ``h``'s)."""
        c, s = self.columns()
        return apply_road(h.to(c.dtype), c, s, self.group_size).to(h.dtype)

    def forward(self, x, base_out):
        c, s = self.columns()
        h = base_out.to(c.dtype)
        return (h * (c - 1) + rotate_half(h, self.group_size) * s).to(base_out.dtype)

    def fused_forward(self, base: nn.Module, x):
        return self.transform(base(x))

    def merge(self, base: nn.Module) -> None:
        c, s = self.columns()
        if not determinants(c, s, self.group_size).all():
            raise StateError("road: a pair's 2 x 2 matrix is singular (a scale of 0), so merging could not be undone; "
                             "keep the adapter unmerged")
        self._fold(base, c, s)

    def unmerge(self, base: nn.Module) -> None:
        self._fold(base, *inverse_columns(*self.columns(), self.group_size))

    def _fold(self, base: nn.Module, c: torch.Tensor, s: torch.Tensor) -> None:
        with torch.no_grad():
            W = base_weight(base)
            set_base_weight(base, rotate_weight(W.to(c.dtype), c, s, self.group_size).to(W.dtype))
            bias = getattr(base, "bias", None)
            if bias is not None:
                bias.copy_(apply_road(bias.to(c.dtype), c, s, self.group_size))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = RoadConfig


def make_adapter(module: nn.Module, config: RoadConfig, name: str) -> nn.Module:
    refuse_non_linear("road", module, name)
    out_features = base_weight(module).shape[0]
    return RoadLinear(module, config.variant, config.group_size_for(out_features, name), config.init)
