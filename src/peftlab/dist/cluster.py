"""Clusters through Ray: benchmark cells as Ray tasks, and training under Ray Train's ``TorchTrainer``.

Ray is the engine here, as ``torchrun`` is on one machine: it places the processes, reserves their
CPUs or GPUs, and (for training) starts the ``torch.distributed`` process group and sets the
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` variables torchrun would. The training loop already
reads those and already leaves a process group it did not create alone (``ddp.setup``), so under
Ray Train it runs exactly as under torchrun: the same data split, the same DDP or FSDP2 wrapping,
rank 0 alone writing. Nothing here schedules or launches anything itself.

Files: the workers read the data and write the adapter and checkpoints at the paths they are given,
so on a cluster of several machines those paths must be on storage every machine sees (as with
``torchrun --nnodes``), and every machine needs peftlab installed. Paths are made absolute before
they are sent, since a Ray worker's working directory is not the driver's.

Ray is optional (``pip install 'peftlab[dist]'``); this module imports it only when called.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..errors import ConfigError, PeftlabError

INSTALL_HINT = "Ray is not installed: pip install 'peftlab[dist]' (Ray Train with the version peftlab is tested with)"
PATH_OPTIONS = ("out", "data", "eval_data", "model", "config")


def connect(address: str | None = None):
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or start a local one for this
    process; a Ray this process already joined (a test's ``ray.init``) is used as it is."""
    try:
        import ray
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    if ray.is_initialized():
        return ray
    import warnings
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"worker_process_setup_hook": quiet_worker})
    except ConnectionError as error:
        raise PeftlabError(f"could not join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')}: {error}. "
                           "Start one with 'ray start --head' (or leave --address out to run on a local Ray)") from None
    return ray


def quiet_worker() -> None:
    """Run in every Ray worker process of a peftlab job. Ray Train's placement-group cleaner asks
    Ray's state API about the controller once a second, and without Ray's dashboard (``ray[default]``,
    which peftlab does not need) every ask fails with a warning: hundreds of identical lines."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# ---- benchmark cells ---------------------------------------------------------------------------------

def run_cells(cells: list, threads: int, timeout: float, address: str | None = None):
    """Each cell as a Ray task reserving ``threads`` CPUs, which runs it in a process of its own
    (``runner.run_in_process``, as the local runner does, so a cell's peak memory is still its own).
    Yields ``(cell, row)`` as cells finish, in whatever order they finish; a task that Ray loses (its
    node died) gives a failed row, not a stopped grid."""
    from ..bench.runner import run_in_process

    ray = connect(address)
    remote = ray.remote(num_cpus=threads, max_retries=0)(run_in_process)
    here = os.getcwd()
    pending = {remote.remote(cell, threads, timeout, here): cell for cell in cells}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(done[0])
        try:
            row = ray.get(done[0])
        except Exception as error:  # a dead worker or node: recorded, and the grid goes on
            row = {"key": cell.key, "task": cell.task.name, "method": cell.method, "seed": cell.seed,
                   "failed": f"the Ray task failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}"}
        yield cell, row


# ---- training ----------------------------------------------------------------------------------------

def train(options: dict, say=print) -> int:
    """``peftlab train --backend ray --workers N``: the same training run on N Ray Train workers."""
    ray = connect(options.get("address"))
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers, cpus = options["workers"], options["cpus_per_worker"]
    use_gpu = str(options["device"]).startswith("cuda")
    options = {**absolute_paths(options), "backend": "local", "nproc": 1}
    out = Path(options["out"])
    say(f"peftlab train: {workers} Ray Train workers ({cpus} CPU{'s' if cpus > 1 else ''}"
        f"{' and a GPU' if use_gpu else ''} each) on the Ray cluster at "
        f"{ray.get_runtime_context().gcs_address}")
    trainer = TorchTrainer(
        train_worker, train_loop_config=options,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"peftlab-{int(time.time())}", storage_path=str(out / "ray")))
    try:
        trainer.fit()
    except Exception as error:  # Ray Train's TrainingFailedError, with each failed worker's exception
        raise PeftlabError(f"training on Ray failed: {worker_error(error)}; the last checkpoint in {out / 'checkpoint'} "
                           "is intact, continue with --resume") from None
    return 0


def train_worker(options: dict) -> None:
    """One Ray Train worker: the loop ``peftlab train`` runs, in the process group Ray made."""
    import torch

    from ..cli import run_train

    torch.set_num_threads(options["cpus_per_worker"])
    try:
        run_train(options)
    except PeftlabError as error:  # one line on the driver, not a remote traceback
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


def worker_error(error: Exception) -> str:
    """The first failed worker's own message from Ray Train's error."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        lines = [line for line in str(failures[rank]).splitlines() if line.strip()]
        return f"worker {rank}: {lines[-1] if lines else type(failures[rank]).__name__}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def absolute_paths(options: dict) -> dict:
    """Local paths made absolute (a Ray worker starts in a folder of its own); hub names stay names."""
    resolved = dict(options)
    for name in PATH_OPTIONS:
        value = options.get(name)
        if name == "out" or (isinstance(value, str) and value and Path(value).exists()):
            resolved[name] = str(Path(value).resolve())
    return resolved
