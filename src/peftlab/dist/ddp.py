"""Data parallel (DDP) under ``torchrun``: the process group, the wrapped loss, the collectives.

A step's rows are the single-process order's rows, split by rank: with ``batch_size`` b per rank
and R ranks, micro-batch m of a step at data position p gives rank r the rows
``p + (m R + r) b ... + b``. So R ranks at batch b see exactly the batches one process sees at
batch R b, and since each rank's loss is its batch's mean and DDP averages the ranks' gradients,
the update is the one process's update wherever the ranks' batches weigh alike (the same
convention as ``grad_accum``: each micro-batch's mean counts once).

Only the trainable parameters enter DDP's gradient buckets and its start-up broadcast: the frozen
base is the same on every rank already (every rank loads it), and broadcasting or bucketing it
would move hundreds of MB for nothing. The model is wrapped in ``LossModule`` so that DDP's own
forward runs the loss peftlab trains with (the blockwise one included): DDP only synchronises
gradients of a forward that went through it.
"""
from __future__ import annotations

import atexit
import datetime
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, TrainingError

TIMEOUT_ENV = "PEFTLAB_DIST_TIMEOUT"  # seconds a collective may wait for a missing rank (default 300)


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that writes files and prints: rank 0."""
        return self.rank == 0


def world() -> World:
    """The world torchrun (or Ray Train, or any launcher setting the same variables) started us in."""
    try:
        return World(rank=int(os.environ.get("RANK", 0)), size=int(os.environ.get("WORLD_SIZE", 1)),
                     local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them); got "
                          f"{os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}, "
                          f"{os.environ.get('LOCAL_RANK')!r}") from None


def device_for(place: World, device: torch.device) -> torch.device:
    """Each rank's device: its own GPU (``cuda:LOCAL_RANK``) on a CUDA machine, else ``device``."""
    if place.distributed and device.type == "cuda" and device.index is None:
        return torch.device("cuda", place.local_rank)
    return device


def setup(place: World, device: torch.device) -> None:
    """Join the process group (gloo on CPU, nccl on GPU) unless a launcher already did (Ray Train)."""
    import torch.distributed as dist

    if not place.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    seconds = float(os.environ.get(TIMEOUT_ENV, 300))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=place.rank, world_size=place.size,
                            timeout=datetime.timedelta(seconds=seconds))
    atexit.register(_leave)  # the group is ours to close; a script may still use it until it exits


def _leave() -> None:
    """At exit: let gloo's worker threads finish every collective still in flight, and drop what
    they hold, before Python shuts down. A gloo thread releases a finished collective's tensors,
    which needs the interpreter; one that does so while Python is finalizing aborts the process
    ("terminate called without an active exception"), turning a finished run into a failed one.
    FSDP keeps the process group alive through its sharded parameters, so closing the group does
    not stop those threads: the barrier waits for the collectives, the pause hands the threads the
    interpreter to release them. A rank that is already gone delays the exit by the barrier's timeout."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=10))
        except RuntimeError:
            pass  # some rank already left
        time.sleep(0.1)
    dist.destroy_process_group()


class LossModule(nn.Module):
    """The training loss of ``model`` on a batch, as a module DDP can wrap."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def wrap(model: nn.Module, loss_fn, device: torch.device) -> nn.Module:
    """``LossModule(model)`` in ``DistributedDataParallel``, bucketing the trainable parameters only."""
    from torch.nn.parallel import DistributedDataParallel

    module = LossModule(model, loss_fn)
    frozen = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    buffers = [f"model.{name}" for name, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def require_gradients(params: dict) -> None:
    """Under DDP every trainable parameter must get a gradient on every step, or the ranks' gradient
    buckets never fill; say which did not (HF PEFT issues #899 and #905 hang here instead)."""
    missing = [name for name, p in params.items() if p.grad is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise TrainingError(f"data-parallel training needs a gradient for every trainable parameter, but {shown} got "
                            "none in this step (an adapter that is not active, or a module the loss never reaches); "
                            "freeze them (requires_grad_(False)) or detach the adapter")


def mean(value: float, place: World) -> float:
    """The mean of a number over the ranks (the logged loss)."""
    return _all_reduce(torch.tensor([float(value)], dtype=torch.float64), place) / place.size


def total(value: int, place: World) -> int:
    """The sum of a count over the ranks (tokens seen)."""
    return int(_all_reduce(torch.tensor([int(value)], dtype=torch.int64), place))


def _all_reduce(tensor: torch.Tensor, place: World):
    if not place.distributed:
        return tensor.item()
    import torch.distributed as dist

    if dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item()


def barrier(place: World) -> None:
    if place.distributed:
        import torch.distributed as dist

        dist.barrier()
