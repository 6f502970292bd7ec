"""What peftlab needs from a quantized linear layer, whatever its storage format.

A quantized layer is an ``nn.Linear`` subclass (so target roles, ``all-linear`` and every method's
``can_wrap`` see a linear layer) that also inherits ``QuantizedLinear`` and provides:

- ``dequantize()``: the weight in (out x in) layout and floating point, what the layer computes with;
- ``dequantize_rows(rows)``: some of its rows (a quantized embedding table's lookup); by default
  the rows of ``dequantize()``, overridden where the format makes single rows cheap;
- ``quantize_weight(weight)``: store ``weight`` (out x in) in the layer's format, replacing what it held;
- ``stored_bytes()``: the bytes its weight and bias take, quantization constants included;
- ``recipe()``: the settings that quantize a weight the same way (saved with adapters).

Methods never see the format: ``methods/lora.py``'s ``base_weight`` / ``set_base_weight`` (which every
merge goes through) call ``dequantize`` / ``requantize``. This file imports no quantization library.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class QuantizedLinear:
    """Mixed into the quantized ``nn.Linear`` subclasses (``bnb.py``, ``int4.py``)."""

    format = ""
    requantization = None  # the last requantize()'s error (see requantization_error)
    loftq = None  # {"loftq_rank", "loftq_iter"} where quantize() chose the weight with LoftQ (loftq.py)

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self.dequantize()[rows]

    def quantize_weight(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def stored_bytes(self) -> int:
        raise NotImplementedError

    def recipe(self) -> dict:
        raise NotImplementedError

    @property
    def weight_shape(self) -> tuple:
        """The shape of the full-precision weight (out x in); ``self.weight`` holds packed codes."""
        return (self.out_features, self.in_features)

    def requantize(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (an updated weight: dequantized, changed, e.g. a merged adapter) in the
        layer's format, and record how far the stored weight is from it (``merge_report``)."""
        with torch.no_grad():
            before = self.dequantize()
            self.quantize_weight(weight)
            self.requantization = requantization_error(weight, self.dequantize(), before)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.recipe()}"


def requantization_error(intended: torch.Tensor, stored: torch.Tensor, before: torch.Tensor) -> dict:
    """How far the stored weight is from the one asked for, next to the size of the change asked
    for (a change much smaller than the quantization step is mostly lost)."""
    error = (stored.float() - intended.float()).abs()
    change = (intended.float() - before.float()).abs()
    return {"max_abs_error": error.max().item(), "mean_abs_error": error.mean().item(),
            "mean_abs_change": change.mean().item(), "count": error.numel()}


def is_quantized(module) -> bool:
    return isinstance(module, QuantizedLinear)


def parameter_shape(module, name: str, parameter: torch.Tensor) -> tuple:
    """A parameter's shape as the full-precision model has it (a quantized weight's packed codes
    have another shape), so that a quantized model and its original look alike."""
    if name == "weight" and is_quantized(module):
        return tuple(module.weight_shape)
    if name == "weight" and is_quantized(getattr(module, "table", None)):  # a QuantizedEmbedding (embedding.py)
        return tuple(module.table.weight_shape)
    return tuple(parameter.shape)


def parameter_count(model) -> int:
    """How many parameters ``model`` has, a quantized weight counted as its full-precision weight
    (its packed codes hold two or four weights per element) and a shared one once."""
    counts = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            counts.setdefault(id(p), torch.Size(parameter_shape(module, name, p)).numel())
    return sum(counts.values())


class DequantizedMatmul(torch.autograd.Function):
    """``x W^T + b`` with ``W = layer.dequantize()`` in ``x``'s dtype. Backward dequantizes again
    instead of keeping the full-precision weight alive between forward and backward, so training
    stores only the quantized weight (as bitsandbytes' own 4-bit matmul does)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return F.linear(x, layer.dequantize().to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize().to(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None
