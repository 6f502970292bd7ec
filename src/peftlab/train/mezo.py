"""MeZO: Fine-Tuning Language Models with Just Forward Passes (Malladi et al., 2023, arXiv:2305.17333).

Why: backpropagation keeps the activations of every layer for the backward pass, and Adam keeps
two more copies of the trainable parameters; MeZO needs neither. It estimates the gradient from
two forward passes (SPSA, Spall, 1992): with ``z ~ N(0, I)`` over all trainable parameters,

    g = (L(theta + eps z) - L(theta - eps z)) / (2 eps)     (a scalar: the gradient projected on z)
    theta <- theta - lr * g * z

whose expectation over z is the gradient itself (exactly, for a quadratic loss). The trick that
makes it memory-free is that ``z`` is never stored: it is regenerated from the step's seed each of
the four times it is needed (+eps, -2 eps, +eps to restore, then the update), one parameter at a
time, so training needs the memory of inference plus one parameter tensor. There are no gradients
(``.grad`` is never allocated: the passes run under ``torch.no_grad``) and no optimizer state.

It works with any method's parameters (LoRA, prefixes, full weights): it only needs the list of
trainable tensors and a loss. (A method whose training hooks read gradients sees none: AdaLoRA's
importance scores stay at zero, so its rank budget is cut without a ranking.) Both passes of a
step start from the same random state, so dropout and methods that sample while training
(DiffPruning's gates, DyLoRA's rank) see the same draws in ``L(theta + eps z)`` and
``L(theta - eps z)``. The step seed is a function of (run seed, step), so a resumed run draws the
same ``z`` as an uninterrupted one.

Learning rates: the estimate's variance grows with the number of parameters, so MeZO wants a much
smaller lr than Adam and many more steps (the paper trains for 20k-100k steps). The paper's search
grids for OPT: full fine-tuning lr 1e-7..1e-6 with eps 1e-3, LoRA 5e-5..1e-4 with eps 1e-2, prefix
tuning 1e-3..1e-2 with eps 1e-1. ``TrainConfig(optimizer="mezo", mezo_eps=1e-3)`` uses it in
``peftlab.train`` (CLI: ``--optimizer mezo --mezo-eps``); ``max_grad_norm`` does not apply.
"""
from __future__ import annotations

import math

import torch


def step_seed(seed: int, step: int) -> int:
    """The seed of ``z`` at (0-based) optimizer step ``step`` of a run seeded ``seed``."""
    return ((seed + 1) * 0x9E3779B97F4A7C15 + step) % 2**63  # apart from the small seeds of the data order


def noise(params, seed: int):
    """Yield ``(p, z)`` for every parameter, ``z ~ N(0, I)`` of ``p``'s shape drawn from ``seed``:
    the same ``z`` for the same seed and parameter order, one parameter's worth at a time."""
    generators = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        yield p, torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)


def perturb(params, seed: int, scale: float) -> None:
    """``p += scale * z`` for every parameter."""
    for p, z in noise(params, seed):
        p.add_(z, alpha=scale)


def spsa_losses(params, loss_fn, eps: float, seed: int) -> tuple[float, float]:
    """``(L(theta + eps z), L(theta - eps z))``; the parameters end where they started (up to float
    rounding). Both passes start from the same random state."""
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    perturb(params, seed, eps)
    with torch.random.fork_rng(devices=devices):
        loss_plus = float(loss_fn())
    perturb(params, seed, -2 * eps)
    loss_minus = float(loss_fn())
    perturb(params, seed, eps)
    return loss_plus, loss_minus


def projected_gradient(loss_plus: float, loss_minus: float, eps: float) -> float:
    return (loss_plus - loss_minus) / (2 * eps)


class MeZO(torch.optim.Optimizer):
    """The MeZO update as an optimizer with no state (its ``state_dict`` holds the settings only):
    ``step(loss_fn, seed)`` runs the two forward passes and the update. ``weight_decay`` is
    decoupled, per parameter group, as in AdamW."""

    def __init__(self, params, lr: float, eps: float = 1e-3, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.eps = eps

    @torch.no_grad()
    def step(self, loss_fn, seed: int) -> tuple[float, float]:
        """One step: ``loss_fn()`` returns the loss at the current parameters (forward only);
        return ``(L(theta + eps z), L(theta - eps z))``. A non-finite estimate updates nothing."""
        params = [p for group in self.param_groups for p in group["params"]]
        loss_plus, loss_minus = spsa_losses(params, loss_fn, self.eps, seed)
        grad = projected_gradient(loss_plus, loss_minus, self.eps)
        if not math.isfinite(grad):
            return loss_plus, loss_minus
        groups = [group for group in self.param_groups for _ in group["params"]]
        for (p, z), group in zip(noise(params, seed), groups):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(z, alpha=-group["lr"] * grad)
        return loss_plus, loss_minus
