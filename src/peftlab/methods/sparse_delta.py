"""Weight deltas for the sparse selective methods (DiffPruning, FishMask); not a method itself.

Both methods learn a delta ``D`` of the same shape and layout as the weight of the module they
wrap (``nn.Linear``: out x in; GPT-2's ``Conv1D``: in x out; ``nn.Embedding``: vocab x dim), so
the adapted module computes with ``W + D``. This file holds what they share: the module's output
gained from ``D``, the one-matmul path through ``W + D`` for ``nn.Linear``, and the sparse storage
of a delta as the flat positions and values of its nonzero entries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.targets import is_linear
from ..errors import AdapterFormatError, IncompatibleBaseError
from ..quant.layers import is_quantized, parameter_shape
from .lora import base_weight, set_base_weight


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module) or isinstance(module, nn.Embedding)


def delta_dtype(base: nn.Module) -> torch.dtype:
    """The delta is kept in the weight's dtype (fp32 where the weight is not floating point)."""
    dtype = base.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


class WeightDelta(nn.Module):
    """An adapter whose contribution is ``delta_weight()`` added to the wrapped module's weight.
    Subclasses define ``current_delta()`` (what this forward uses) and ``delta_weight()`` (the
    deterministic delta that merging adds)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.kind = "embedding" if isinstance(base, nn.Embedding) else "conv1d" if type(base).__name__ == "Conv1D" else "linear"
        self.padding_idx = getattr(base, "padding_idx", None)
        self.weight_shape = parameter_shape(base, "weight", base.weight)  # a quantized base's: that of its full-precision weight
        self.weight_numel = torch.Size(self.weight_shape).numel()

    def forward(self, x, base_out):
        return output_delta(self.kind, x, self.current_delta(), self.padding_idx)

    def fused_forward(self, base: nn.Module, x):
        """``F.linear(x, W + D, b)``: one matmul forward and backward instead of two."""
        if type(base) is not nn.Linear or x.dtype != base.weight.dtype:
            return None
        return F.linear(x, self.adapted_weight(base.weight), base.bias)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.current_delta()

    def merge(self, base: nn.Module) -> None:
        add_to_weight(base, self.delta_weight())

    def unmerge(self, base: nn.Module) -> None:
        add_to_weight(base, -self.delta_weight())

    def detach_from(self, base: nn.Module) -> None:
        pass  # the base weight is never changed unmerged


def add_to_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """``W += delta`` (delta in the weight's own layout); a quantized base dequantizes, adds and requantizes."""
    if is_quantized(base):
        set_base_weight(base, base_weight(base) + delta)
    else:
        base.weight.data += delta.to(base.weight.dtype)


def output_delta(kind: str, x: torch.Tensor, delta: torch.Tensor, padding_idx=None) -> torch.Tensor:
    """What a module's output gains when its weight gains ``delta`` (same layout as the weight)."""
    if kind == "embedding":
        return F.embedding(x, delta, padding_idx)
    if kind == "conv1d":
        return x @ delta
    return F.linear(x, delta)


# ---- sparse storage --------------------------------------------------------------------------

def to_sparse(indices: torch.Tensor, values: torch.Tensor, numel: int) -> dict:
    """The tensors to save for entries ``values`` at flat ``indices`` of a weight of ``numel`` entries
    (positions stored as int32 where they fit)."""
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    return {"indices": indices.detach().to(index_dtype), "values": values.detach()}


def nonzero_entries(delta: torch.Tensor) -> dict:
    """``to_sparse`` of the nonzero entries of a dense delta."""
    flat = delta.detach().reshape(-1)
    positions = flat.nonzero().squeeze(1)
    return to_sparse(positions, flat[positions], flat.numel())


def read_sparse(tensors: dict, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 flat indices, values) that ``to_sparse`` stored, checked to fit a weight of ``shape``."""
    if set(tensors) != {"indices", "values"}:
        raise AdapterFormatError(f"a sparse delta needs the tensors 'indices' and 'values', found {sorted(tensors)}; "
                                 "the file was not written by this peftlab method")
    indices, values = tensors["indices"], tensors["values"]
    if (indices.dim() != 1 or values.shape != indices.shape or indices.dtype.is_floating_point
            or not values.dtype.is_floating_point):
        raise AdapterFormatError(f"a sparse delta holds {tuple(indices.shape)} {indices.dtype} indices and "
                                 f"{tuple(values.shape)} {values.dtype} values; expected as many integer indices as "
                                 "floating-point values (a corrupt file?)")
    numel = torch.Size(shape).numel()
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
        raise IncompatibleBaseError(f"a sparse delta points past a weight of shape {tuple(shape)} ({numel} entries); "
                                    "the adapter was saved for another base model (or the file is corrupt)")
    return indices.long(), values


def dense_from_sparse(tensors: dict, shape, dtype: torch.dtype, device) -> torch.Tensor:
    indices, values = read_sparse(tensors, shape)
    dense = torch.zeros(torch.Size(shape).numel(), dtype=dtype, device=device)
    dense[indices.to(device)] = values.to(device=device, dtype=dtype)
    return dense.view(shape)
