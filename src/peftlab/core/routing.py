"""Mixed-adapter batches: one adapter per batch row, grouped once per forward.

The grouping (a stable sort of rows by adapter, then contiguous segments) is computed when
the routing is set and cached per device, so every wrapped layer of the forward pass (and
every decoding step of ``generate``) reuses it instead of regrouping. Rows routed to ``None``
run the base model alone. This is the CPU path of the sort-and-segment scheme used by
multi-adapter servers (S-LoRA, Punica); a GPU kernel can replace ``Routing.segments`` users
behind the same data.
"""
from __future__ import annotations

import torch


class Routing:
    def __init__(self, row_adapters: list):
        self.row_adapters = list(row_adapters)
        self.rows = len(self.row_adapters)
        names = sorted({n for n in self.row_adapters if n is not None})
        ids = torch.tensor([-1 if n is None else names.index(n) for n in self.row_adapters])
        order = torch.sort(ids, stable=True).indices
        counts = torch.bincount(ids + 1, minlength=len(names) + 1).tolist()
        # segments[name] = the rows (in order) that use that adapter; base rows (id -1) come first
        self._segments_cpu = {}
        start = counts[0]
        for i, name in enumerate(names):
            stop = start + counts[i + 1]
            self._segments_cpu[name] = order[start:stop]
            start = stop
        self._by_device = {}
        self.spans = _contiguous_runs(self.row_adapters)

    def segments(self, device) -> dict:
        """``{adapter name: LongTensor of rows}`` on ``device``, built once per device."""
        cached = self._by_device.get(device)
        if cached is None:
            cached = {name: idx.to(device) for name, idx in self._segments_cpu.items()}
            self._by_device[device] = cached
        return cached

    def uses(self, name: str) -> bool:
        return name in self._segments_cpu

    def whole_batch(self, name: str) -> bool:
        idx = self._segments_cpu.get(name)
        return idx is not None and len(idx) == self.rows


def _contiguous_runs(row_adapters: list) -> list | None:
    """``[(name, start, stop), ...]`` when every adapter's rows (and the base rows) form one run of
    consecutive rows, as when batches are concatenated job by job (``train_many``); else None.
    Such a batch needs no gather or scatter: each run is a slice."""
    runs = []
    for row, name in enumerate(row_adapters):
        if runs and runs[-1][0] == name:
            runs[-1][2] = row + 1
        else:
            runs.append([name, row, row + 1])
    names = [run[0] for run in runs]
    return [tuple(run) for run in runs] if len(set(names)) == len(names) else None
