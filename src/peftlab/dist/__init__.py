"""More than one process: data-parallel training on ``torch.distributed``.

Where it sits: ``train/loop.py`` asks ``ddp.World`` whether it runs under ``torchrun`` (the
``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` variables torchrun sets) and, when it does, trains the
same loop data-parallel: each rank takes its slice of the single-process data order, the trainable
parameters' gradients are averaged by ``torch.nn.parallel.DistributedDataParallel``, and rank 0
alone writes checkpoints and adapters. torch.distributed does the engine work (process group,
gradient buckets, all-reduce); this package holds only what is PEFT-specific: which parameters go
into the buckets (the trainable ones), how a step's rows are split, and who writes.

``cluster.py`` does the same on a Ray cluster: Ray Train's ``TorchTrainer`` places the processes
and makes the group, and the loop runs unchanged; benchmark cells become Ray tasks.

``many.py`` is the other way past one job per process: K adapters of one frozen base trained in
one pass (``train_many``), each row routed to its job's adapter.
"""
from .ddp import World, world
from .many import Job, JobOutcome, train_many

__all__ = ["World", "world", "Job", "JobOutcome", "train_many"]
