"""Per-row task ids, for the methods that condition on a task rather than on an adapter name:
Poly's task-skill routing (Ponti et al., 2023) and multitask prompt tuning (Wang et al., 2023).

HF PEFT passes ``task_ids=`` to its model's forward; transformers' ``forward`` and ``generate``
take no such argument, and peftlab never changes a model's signature. So, like ``routing``, the
ids are set once for every forward inside a block (each step of ``generate`` included)::

    with peftlab.task_ids(model, [0, 2, 1]):
        model(input_ids=...)

and every adapter that needs them reads the same ids from the model's state. The trainer does
this itself for a batch holding a ``task_ids`` column (``train.loss.training_loss``).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ConfigError, StateError
from .state import AdapterState, require_state


@contextlib.contextmanager
def task_ids(model: nn.Module, ids):
    """Within the block, batch row ``i`` is task ``ids[i]`` for every task-conditioned adapter
    (``ids``: a list or 1-D tensor of ints, one per row, or one int for every row)."""
    state = require_state(model)
    value = torch.as_tensor(ids)
    if value.is_floating_point() or value.dtype == torch.bool or value.dim() > 1 or value.numel() == 0:
        raise ConfigError(f"task_ids needs integer task ids, one per batch row (or one int for all rows); got {ids!r}")
    previous, state.task_ids = state.task_ids, value.long()
    try:
        yield model
    finally:
        state.task_ids = previous


def row_tasks(state: AdapterState | None, rows: int, device, *, n_tasks: int, method: str,
              adapter_name: str | None = None) -> torch.Tensor:
    """The task id of each of the ``rows`` rows an adapter of ``method`` (with ``n_tasks`` tasks)
    is given: the ids ``task_ids`` set, or task 0 when there is only one task. Under ``routing``,
    an adapter given some rows of the batch gets those rows' ids."""
    ids = None if state is None else state.task_ids
    if ids is None:
        if n_tasks == 1:
            return torch.zeros(rows, dtype=torch.long, device=device)
        raise StateError(f"{method}: this adapter has {n_tasks} tasks; give each batch row its task, e.g. "
                         "`with peftlab.task_ids(model, [0, 2, 1]): model(...)`")
    ids = ids.to(device)
    if ids.dim() == 0:
        ids = ids.expand(rows)
    elif len(ids) != rows:
        routed = state.routing
        picked = routed.segments(device).get(adapter_name) if routed is not None and routed.rows == len(ids) else None
        if picked is None or len(picked) != rows:
            raise StateError(f"{method}: task_ids gave {len(ids)} task ids but the batch has {rows} rows; give one per "
                             "row (beam search and num_return_sequences > 1 change the batch size)")
        ids = ids.index_select(0, picked)
    if bool((ids < 0).any()) or bool((ids >= n_tasks).any()):
        raise ConfigError(f"{method}: task ids must be in 0..{n_tasks - 1} (the adapter has {n_tasks} tasks), "
                          f"got {ids.tolist()}")
    return ids
