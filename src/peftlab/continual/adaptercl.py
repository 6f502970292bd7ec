"""AdapterCL: Continual Learning in Task-Oriented Dialogue Systems (Madotto et al., EMNLP 2021,
arXiv:2012.15504).

Why: an adapter per task, each trained alone on its task and then left alone, cannot forget; the
price is choosing which adapter to use for a test row whose task is unknown. The paper runs the
input through every adapter and picks the one under which the (language-model) input is least
surprising, the lowest perplexity.

What here: each task trains a Pfeiffer bottleneck adapter (``methods/pfeiffer.py``) with only that
adapter active. This model classifies rather than generating, so there is no perplexity of the
input to compare; the stand-in is the same idea on the output: every adapter predicts the row, and
the adapter whose prediction over the shared label space has the lowest entropy (is the most
confident) answers. Task-free at test time; it costs one forward per adapter.
"""
from __future__ import annotations

import torch

import peftlab

from ..core.state import require_state
from .methods import ContinualMethod


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row (rows x labels -> rows)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def select_by_entropy(per_adapter: torch.Tensor) -> tuple:
    """``per_adapter`` (adapters x rows x labels) -> (chosen adapter per row, its logits per row)."""
    choice = entropy(per_adapter).argmin(0)
    rows = torch.arange(per_adapter.shape[1], device=per_adapter.device)
    return choice, per_adapter[choice, rows]


class AdapterCL(ContinualMethod):
    name = "adaptercl"
    paper = "Madotto et al., 2021 (arXiv:2012.15504)"
    summary = "an adapter per task, trained alone; at test time the adapter with the lowest prediction entropy answers"
    OPTIONS = {"lr": 5e-3, "bottleneck": 32}

    def __init__(self, **options):
        super().__init__(**options)
        self.names = []

    def before_stage(self, model, stage: int) -> None:
        self.names.append(f"task{stage}")
        peftlab.attach(model, f"pfeiffer[bottleneck={self.bottleneck}]", name=self.names[-1])  # active alone

    def logits(self, model, batch: dict):
        state = require_state(model)
        previous = list(state.active)
        per_adapter = []
        try:
            for name in self.names:
                peftlab.set_active(model, name)
                per_adapter.append(model(**batch).logits)
        finally:
            peftlab.set_active(model, previous)
        return select_by_entropy(torch.stack(per_adapter))[1]
