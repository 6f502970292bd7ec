"""bitsandbytes base layers: 4-bit NF4 / FP4 (QLoRA) and 8-bit (LLM.int8()) weights.

``Bnb4bitLinear`` and ``Bnb8bitLinear`` are bitsandbytes' own ``Linear4bit`` and ``Linear8bitLt``
(so anything that recognises those, HF PEFT included, recognises these) plus peftlab's
``QuantizedLinear`` interface. Two things differ from bitsandbytes' defaults, both so that a CPU computes in the input's
dtype (fp32 here) in training and evaluation alike:

- 4-bit: bitsandbytes repacks the weight for a bf16 CPU kernel the first time an AVX512-BF16 CPU
  runs the layer in eval mode; that repacking is turned off, so eval dequantizes to fp32 as
  training does (and the weight keeps its double-quantized scales).
- 8-bit: on CPU the layer multiplies by the dequantized weight instead of quantizing the
  activations to int8 as well (LLM.int8()'s GPU path, still used on GPUs).

Double quantization (Dettmers et al., 2023, arXiv:2305.14314, section 3) quantizes the 4-bit
blocks' fp32 scales (one per 64 weights) to 8 bits in blocks of 256: 4.127 bits per weight
instead of 4.5.
"""
from __future__ import annotations

import logging

import torch

# bitsandbytes warns on import that it cannot fetch an optional bf16 CPU kernel from the Hub;
# peftlab never uses that kernel (see the notes above), so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
import bitsandbytes as bnb  # noqa: E402
from torch import nn

from .layers import DequantizedMatmul, QuantizedLinear

BLOCKSIZE = 64  # weights per 4-bit block (QLoRA's)


class Bnb4bitLinear(QuantizedLinear, bnb.nn.Linear4bit):
    """A 4-bit linear layer: NF4 (``quant_type="nf4"``, QLoRA's NormalFloat) or FP4."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", double_quant: bool = True) -> "Bnb4bitLinear":
        layer = cls(linear.in_features, linear.out_features, bias=False, compress_statistics=double_quant,
                    quant_type=quant_type, device="meta")
        layer.support_avx512bf16_for_cpu = False  # no bf16 repacking in eval (see the module notes)
        layer.bias = linear.bias
        layer.quantize_weight(linear.weight.detach())
        layer.train(linear.training)
        return layer

    @property
    def format(self) -> str:
        return self.weight.quant_type

    def quantize_weight(self, weight: torch.Tensor) -> None:
        param = bnb.nn.Params4bit(weight.detach().contiguous(), requires_grad=False, blocksize=BLOCKSIZE,
                                  compress_statistics=self.weight.compress_statistics, quant_type=self.weight.quant_type,
                                  module=self)
        self.weight = param.to(weight.device)  # bitsandbytes quantizes on the move to a device

    def dequantize(self) -> torch.Tensor:
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Only the blocks of ``rows``, where no block spans two rows (the row width a multiple of 64)."""
        if self.in_features % BLOCKSIZE:
            return super().dequantize_rows(rows)
        state = self.weight.quant_state
        codes = self.weight.data.view(self.out_features, -1)[rows].reshape(-1, 1)
        scales = block_scales(state).view(self.out_features, -1)[rows].reshape(-1)
        picked = bnb.functional.QuantState(scales, shape=torch.Size((len(rows), self.in_features)), code=state.code,
                                           blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        return bnb.functional.dequantize_4bit(codes, picked)

    def stored_bytes(self) -> int:
        state = self.weight.quant_state.as_dict(packed=False)
        constants = sum(v.nbytes for v in state.values() if torch.is_tensor(v))
        return self.weight.data.nbytes + constants + (self.bias.nbytes if self.bias is not None else 0)

    def recipe(self) -> dict:
        return {"format": self.format, "double_quant": bool(self.weight.compress_statistics)}


def block_scales(state) -> torch.Tensor:
    """The fp32 scale of every 4-bit block (with double quantization, dequantized from 8 bits)."""
    if not state.nested:
        return state.absmax
    return bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset


class Bnb8bitLinear(QuantizedLinear, bnb.nn.Linear8bitLt):
    """An 8-bit linear layer: int8 weights with one fp32 scale per output row."""

    format = "int8"

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Bnb8bitLinear":
        layer = cls(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False, device="meta")
        layer.bias = linear.bias
        layer.quantize_weight(linear.weight.detach())
        layer.train(linear.training)
        return layer

    def quantize_weight(self, weight: torch.Tensor) -> None:
        # bitsandbytes quantizes an int8 weight on its move from the CPU to a device
        param = bnb.nn.Int8Params(weight.detach().cpu().contiguous(), requires_grad=False, has_fp16_weights=False)
        self.weight = param.to(weight.device)
        self.state.CB = self.state.SCB = None  # what a GPU forward cached from the previous weight

    def row_scales(self) -> torch.Tensor:
        # a GPU forward moves the scales from the weight to the layer's matmul state
        return self.weight.SCB if self.weight.SCB is not None else self.state.SCB

    def dequantize(self) -> torch.Tensor:
        return self.weight.data.float() * (self.row_scales() / 127.0)[:, None]

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight.data[rows].float() * (self.row_scales()[rows] / 127.0)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            return DequantizedMatmul.apply(x, self.bias, self)
        return super().forward(x)

    def stored_bytes(self) -> int:
        return self.weight.data.nbytes + self.row_scales().nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def recipe(self) -> dict:
        return {"format": "int8"}
