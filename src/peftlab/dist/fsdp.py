"""Sharded data parallel (FSDP2) under ``torchrun``: ``strategy="fsdp"``.

Every parameter, the frozen base's included, is split across the ranks with PyTorch's
``torch.distributed.fsdp.fully_shard``: one group per transformer block (the classes a transformers
model lists in ``_no_split_modules``), then the root, which is the model wrapped in
``ddp.LossModule`` so that the root's own parameters (embeddings, final norm, head) are gathered
for the loss peftlab trains with, blockwise loss included. Each rank holds 1/R of the weights
between uses, and a block's full weights exist only while it runs. The data split, the logged loss
and rank 0's role are those of DDP (``ddp.py``).

Parameters become ``DTensor`` shards, so what leaves a rank goes through ``full`` (an all-gather:
every rank must take part) and what comes in through ``scatter`` (each rank keeps its own rows).
Checkpoints hold full tensors, the same files a single process writes, so a run resumes under any
strategy and any number of ranks; ``peftlab.save`` gathers too, and must be called on every rank
(rank 0 writes).

A quantized base is refused: bitsandbytes' packed 4- and 8-bit weights cannot be split row-wise
and sharding them silently corrupts them (accelerate#3983, bitsandbytes#1945); use DDP there.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError
from .ddp import LossModule


def dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    kind = dtensor_type()
    return kind is not None and isinstance(tensor, kind)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective), or ``tensor`` itself when it is not sharded."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def scatter(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``like`` is: this rank's shard when ``like`` is one."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(like.dtype), like.device_mesh, like.placements)


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Inside: every sharded group of ``model`` holds its whole parameters, plain tensors, on every
    rank (a collective: every rank must enter); outside: shards again. Nothing when not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        yield
        return
    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for group in groups:
        group.unshard()
    try:
        yield
    finally:
        for group in groups:
            group.reshard()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: its ``_no_split_modules`` classes, else checkpointable layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:
            GradientCheckpointingLayer = ()
        found = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    return found


def shard(model: nn.Module, loss_fn) -> nn.Module:
    """``LossModule(model)`` with each block and then the root sharded by ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard

    from ..quant.layers import is_quantized

    quantized = [name for name, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise ConfigError(f"strategy='fsdp' cannot shard a quantized base ({quantized[0]} and {len(quantized) - 1} more "
                          "quantized layers): packed 4/8-bit weights do not split row-wise; use strategy='ddp', which "
                          "keeps the base whole on every rank")
    found = blocks(model)
    if not found:
        raise ConfigError(f"strategy='fsdp' shards a model block by block, but {type(model).__name__} lists no block "
                          "classes (_no_split_modules) and has no checkpointable layers; use strategy='ddp'")
    for block in found:
        fully_shard(block)
    root = LossModule(model, loss_fn)
    fully_shard(root)
    return root
