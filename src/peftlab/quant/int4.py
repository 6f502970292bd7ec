"""Group-wise asymmetric INT4: peftlab's own 4-bit format, the base QA-LoRA merges into.

Each output row's weights are cut into groups of ``group_size`` consecutive input features; a group
is stored as 4-bit codes ``q`` in 0..15 plus its own scale and offset (the group's minimum)::

    W[o, i] = scale[o, g] * q[o, i] + offset[o, g]        g = i // group_size

the min-max asymmetric scheme of GPTQ-style INT4 checkpoints (their zero point ``z`` is
``-offset / scale``). Codes are packed two per byte; scales and offsets are kept in fp32 so that an
update constant within each group (QA-LoRA's merged adapter) folds into the offsets exactly:
``offset' = offset + delta`` and the codes and scales do not change (in fp16 the merged offsets
would be rounded). A weight takes 4 + 64 / group_size bits: 6 with the default groups of 32, 5 with 64.

bitsandbytes' NF4 has no offsets (its blocks are scaled symmetrically), which is why QA-LoRA uses
this format instead.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import DequantizedMatmul, QuantizedLinear

LEVELS = 15  # codes 0..15


def quantize_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes (out x in, uint8 in 0..15), scales, offsets (out x in/group_size, fp32)) of ``weight``."""
    rows, cols = weight.shape
    groups = weight.detach().float().reshape(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = (high - low) / LEVELS
    steps = torch.where(scales > 0, scales, torch.ones_like(scales))  # a constant group: every code 0
    codes = ((groups - low[..., None]) / steps[..., None]).round_().clamp_(0, LEVELS).to(torch.uint8)
    return codes.reshape(rows, cols), scales, low


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    rows, cols = codes.shape
    groups = codes.reshape(rows, scales.shape[1], -1).float()
    return (groups * scales[..., None] + offsets[..., None]).reshape(rows, cols)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (out x in) -> (out x in/2)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


class GroupInt4Linear(QuantizedLinear, nn.Linear):
    """A linear layer with group-wise asymmetric INT4 weights (see the module notes)."""

    format = "int4"

    def __init__(self, in_features: int, out_features: int, group_size: int, device=None):
        super().__init__(in_features, out_features, bias=False, device="meta")  # from_linear gives it the bias
        self.group_size = group_size
        groups = (out_features, in_features // group_size)
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("scales", torch.zeros(groups, device=device))
        self.register_buffer("offsets", torch.zeros(groups, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "GroupInt4Linear":
        layer = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        layer.bias = linear.bias
        layer.quantize_weight(linear.weight.detach())
        layer.train(linear.training)
        return layer

    def quantize_weight(self, weight: torch.Tensor) -> None:
        codes, scales, offsets = quantize_groups(weight, self.group_size)
        self.weight.data = pack(codes)
        self.scales.copy_(scales)
        self.offsets.copy_(offsets)

    def codes(self) -> torch.Tensor:
        return unpack(self.weight.data)

    def dequantize(self) -> torch.Tensor:
        return dequantize_groups(self.codes(), self.scales, self.offsets)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return dequantize_groups(unpack(self.weight.data[rows]), self.scales[rows], self.offsets[rows])

    def shift_groups(self, delta: torch.Tensor) -> None:
        """Add ``delta`` (out x in/group_size: one value per group) to every weight of its group,
        exactly, by moving the group's offset; codes and scales stay as they are."""
        with torch.no_grad():
            self.offsets += delta.to(self.offsets.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizedMatmul.apply(x, self.bias, self)

    def stored_bytes(self) -> int:
        bias = self.bias.nbytes if self.bias is not None else 0
        return self.weight.data.nbytes + self.scales.nbytes + self.offsets.nbytes + bias

    def recipe(self) -> dict:
        return {"format": "int4", "group_size": self.group_size}
