"""O-LoRA: Orthogonal Subspace Learning for Language Model Continual Learning (Wang et al., EMNLP
2023 Findings, arXiv:2310.14152).

Why: a LoRA's ``A`` (r x in) spans the input subspace its update reads from. O-LoRA gives every
task its own LoRA; the LoRAs of earlier tasks stay attached and active but frozen, and the new
task's ``A`` is pushed to be orthogonal to theirs, so the new update reads (mostly) from directions
earlier tasks' updates ignore, and what the earlier LoRAs learned keeps working. Inference needs
no task identity: every LoRA is always on.

What, per the paper (section 3.3, eq. 7-8): the loss of task t is

    L = L_task + lambda1 * sum_{layers} sum_{i<t} ||A_t A_i^T||_F^2 + lambda2 * ||theta_t||_2^2

``A_t A_i^T`` (r x r) holds the inner products of the new and the old rows; it is zero exactly when
the subspaces are orthogonal. ``theta_t`` is the new LoRA's parameters. Defaults as the authors'
scripts: lambda1 = 0.5, lambda2 = 0. The LoRAs sit on the attention's query and value projections.
"""
from __future__ import annotations

import torch

import peftlab

from ..core.adapters import adapter_layers, all_adapters
from .methods import ContinualMethod, lora_spec


def orthogonality(A_new: torch.Tensor, A_old: list) -> torch.Tensor:
    """``sum_i ||A_new A_i^T||_F^2`` for one layer (rows of each A span its subspace)."""
    total = A_new.new_zeros(())
    for A in A_old:
        total = total + (A_new @ A.detach().t()).pow(2).sum()
    return total


def olora_penalty(model, new: str, old: list, lambda1: float, lambda2: float) -> torch.Tensor:
    """The O-LoRA regularizer of adapter ``new`` against the frozen adapters ``old``, over every layer."""
    total = None
    for _, layer in adapter_layers(model, new):
        A_new = layer.adapters[new].lora_A.weight
        term = lambda1 * orthogonality(A_new, [layer.adapters[o].lora_A.weight for o in old if o in layer.adapters])
        total = term if total is None else total + term
    if lambda2:
        l2 = sum(p.pow(2).sum() for _, adapter in all_adapters(model, new) for p in adapter.parameters())
        total = l2 * lambda2 if total is None else total + lambda2 * l2
    return total if total is not None else torch.zeros(())


def freeze(model, names: list) -> None:
    """Stop the adapters ``names`` from training (they stay active)."""
    for name in names:
        for _, adapter in all_adapters(model, name):
            for p in adapter.parameters():
                p.requires_grad_(False)


class OLora(ContinualMethod):
    name = "o-lora"
    paper = "Wang et al., 2023 (arXiv:2310.14152)"
    summary = ("a new LoRA per task, earlier ones frozen and kept active; the new A kept orthogonal to the earlier "
               "A's by a penalty")
    OPTIONS = {"lr": 5e-3, "r": 8, "alpha": 16, "lambda1": 0.5, "lambda2": 0.0}

    def before_stage(self, model, stage: int) -> None:
        names = [f"task{i}" for i in range(stage + 1)]
        peftlab.attach(model, lora_spec(self), name=names[-1])
        peftlab.set_active(model, names)  # every LoRA applies; set_active makes them all trainable...
        freeze(model, names[:-1])  # ...so the earlier ones are frozen again
        model.penalty = lambda: olora_penalty(model, names[-1], names[:-1], self.lambda1, self.lambda2)

    def after_stage(self, model, stage: int, rows: list) -> None:
        model.penalty = None
