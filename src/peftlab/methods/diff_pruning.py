"""DiffPruning: Parameter-Efficient Transfer Learning with Diff Pruning (Guo, Rush & Kim, ACL 2021,
arXiv:2012.07463).

Why: a task needs only a small change to a pretrained model, so store the change, not the model.
Each targeted weight ``W`` (all linear layers by default; embeddings too if targeted) stays frozen
and gains a task-specific diff ``delta = z * w``: ``w`` is a dense trainable tensor that starts at 0
(so the model is exactly the base model at step 0) and ``z`` is one hard-concrete gate per entry
(Louizos, Welling & Kingma, 2018, arXiv:1712.01312) with a trainable ``log alpha``::

    u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log alpha) / beta),  z = clamp(s (r - l) + l, 0, 1)

with Guo et al.'s ``l = -1.5``, ``r = 1.5``, ``beta = 1``. In training each forward draws fresh
gates; the loss gains ``l0_weight`` times the expected number of nonzero gates,
``sum sigmoid(log alpha - beta log(-l / r))`` (the ``regularization`` hook, which
``peftlab.train`` adds to the loss), so training learns which entries to switch off. In eval the
gates are Louizos' deterministic test-time estimate ``clamp(sigmoid(log alpha) (r - l) + l, 0, 1)``.

The paper then projects the diff onto a target sparsity by magnitude (``target_sparsity``,
e.g. 0.995 keeps the 0.5% largest ``|delta|`` entries of the whole adapter): ``peftlab.train`` does it
after its last step, ``finalize(model, name)`` does it any time. Projection opens the kept gates and
closes the others for good (``log alpha = +-30``, where the stretched sigmoid is clamped to exactly
1 or 0 whatever the noise), so the diff is exactly sparse in training and in eval, and training
further (a second ``peftlab.train``) is the paper's fine-tuning with a fixed mask: only the kept
entries move. ``diff_sparsity(model, name)`` reports the fraction of zero entries.

Learning rates: Guo et al.'s code trains ``log alpha`` at lr 0.1 and ``w`` at 1e-5 (BERT-large).
peftlab's trainer has one learning rate, and AdamW's step does not depend on the gradient's scale,
so the parameter holds ``log alpha / alpha_lr_ratio``: ``log alpha`` then moves ``alpha_lr_ratio``
times faster than ``w`` (the default 100 with ``DEFAULT_LR`` 1e-3 gives ``log alpha`` their 0.1;
with another lr, keep lr * alpha_lr_ratio near 0.1). A
trainer ``weight_decay`` (0 by default) would also pull ``log alpha`` toward 0, where the eval gate
is closed.

Storage: a saved adapter holds only the nonzero entries of the eval-time diff (flat positions and
values, ``export_state``), a small file after projection. A loaded adapter has those entries with
their gates fixed open and every other gate closed: the same outputs, and further training is
fixed-mask fine-tuning; the gates' training state lives in checkpoints (``peftlab.train``'s
``out_dir``), which hold every parameter densely.

Mergeable: merging adds the eval-time diff to ``W`` (and unmerging subtracts it). Biases and norms
get no diff here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapters import adapter_layers
from ..core.config import MethodConfig
from ..core.state import require_state
from ..errors import ConfigError, StateError
from .sparse_delta import WeightDelta, delta_dtype, dense_from_sparse, nonzero_entries
from .sparse_delta import can_wrap  # noqa: F401  (the method protocol)

CATEGORY = "selective"
PAPER = "Guo et al., 2021 (arXiv:2012.07463)"
MERGEABLE = True
INVALID_SETTINGS = ("l0_weight=-1", "target_sparsity=1.0", "alpha_lr_ratio=0", "alpha_init=inf")
DEFAULT_LR = 1e-3

STRETCH_LOW, STRETCH_HIGH, BETA = -1.5, 1.5, 1.0  # hard-concrete stretch interval and temperature (Guo et al.)
SATURATED = 30.0  # |log alpha| beyond which a gate is exactly 0 or 1 whatever the noise
NOISE_EPS = 1e-6


@dataclass
class DiffPruningConfig(MethodConfig):
    """l0_weight: weight of the gates' expected L0 norm in the loss (a sum over every diff entry;
    Guo et al. use 1.25e-7 on BERT-large); target_sparsity: after training keep only the
    (1 - target_sparsity) largest |diff| entries (0.995 in the paper; none = no projection);
    alpha_init: initial log alpha of every gate (5: nearly all open); alpha_lr_ratio: how many
    times faster log alpha learns than the diff."""

    method: ClassVar[str] = "diff_pruning"
    l0_weight: float = 1.25e-7
    target_sparsity: float | None = None
    alpha_init: float = 5.0
    alpha_lr_ratio: float = 100.0

    def validate(self) -> None:
        super().validate()
        if not (_is_number(self.l0_weight) and self.l0_weight >= 0):
            raise ConfigError(f"{self.method}: l0_weight must be a number >= 0 (0 turns the L0 penalty off), got {self.l0_weight!r}")
        if self.target_sparsity is not None:
            check_sparsity(self.target_sparsity, "target_sparsity")
        if not (_is_number(self.alpha_init) and math.isfinite(self.alpha_init)):
            raise ConfigError(f"{self.method}: alpha_init must be a finite number (the paper uses 5), got {self.alpha_init!r}")
        if not (_is_number(self.alpha_lr_ratio) and 0 < self.alpha_lr_ratio < math.inf):
            raise ConfigError(f"{self.method}: alpha_lr_ratio must be a positive number, got {self.alpha_lr_ratio!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_sparsity(value, key: str) -> None:
    if not (_is_number(value) and 0 <= value < 1):
        raise ConfigError(f"diff_pruning: {key} must be in [0, 1), the fraction of diff entries set to zero "
                          f"(e.g. 0.995 keeps 0.5%), got {value!r}")


# ---- pure math -------------------------------------------------------------------------------

def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """One hard-concrete draw per entry: exactly 0 or 1 with positive probability, in between otherwise."""
    u = torch.rand_like(log_alpha).clamp(NOISE_EPS, 1 - NOISE_EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0, 1)


def eval_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """Louizos et al.'s deterministic test-time gates."""
    return (torch.sigmoid(log_alpha) * (STRETCH_HIGH - STRETCH_LOW) + STRETCH_LOW).clamp(0, 1)


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) per entry; its sum is the expected L0 norm of the gates."""
    return torch.sigmoid(log_alpha - BETA * math.log(-STRETCH_LOW / STRETCH_HIGH))


def magnitude_masks(deltas: list, sparsity: float) -> list:
    """Keep masks for the ``round((1 - sparsity) * N)`` largest |entries| of all ``deltas`` together."""
    magnitudes = torch.cat([d.detach().abs().reshape(-1).float() for d in deltas])
    keep = round((1 - sparsity) * magnitudes.numel())
    chosen = torch.zeros_like(magnitudes, dtype=torch.bool)
    chosen[magnitudes.topk(keep).indices] = True
    return [mask.view_as(d) for mask, d in zip(chosen.split([d.numel() for d in deltas]), deltas)]


# ---- module ----------------------------------------------------------------------------------

class DiffPruningDelta(WeightDelta):
    """The gated diff ``z * w`` of one weight."""

    def __init__(self, base: nn.Module, alpha_init: float, alpha_lr_ratio: float):
        super().__init__(base)
        like = dict(dtype=delta_dtype(base), device=base.weight.device)
        self.alpha_lr_ratio = alpha_lr_ratio
        self.diff = nn.Parameter(torch.zeros(self.weight_shape, **like))
        self.scaled_log_alpha = nn.Parameter(torch.full(self.weight_shape, alpha_init / alpha_lr_ratio, **like))

    def log_alpha(self) -> torch.Tensor:
        return self.scaled_log_alpha * self.alpha_lr_ratio

    def current_delta(self) -> torch.Tensor:
        gates = sample_gates(self.log_alpha()) if self.training else eval_gates(self.log_alpha())
        return gates * self.diff

    def delta_weight(self) -> torch.Tensor:
        """The eval-time diff: what merging adds and saving stores."""
        with torch.no_grad():
            return eval_gates(self.log_alpha()) * self.diff

    def expected_l0(self) -> torch.Tensor:
        return open_probability(self.log_alpha()).sum()

    def fix(self, delta: torch.Tensor, keep: torch.Tensor) -> None:
        """Make the diff ``delta`` on the ``keep`` entries and exactly 0 elsewhere, gates fixed."""
        with torch.no_grad():
            self.diff.copy_(torch.where(keep, delta, torch.zeros_like(delta)))
            self.scaled_log_alpha.copy_((keep.to(self.diff.dtype) * 2 - 1) * (SATURATED / self.alpha_lr_ratio))

    def export_state(self) -> dict:
        return nonzero_entries(self.delta_weight())

    def import_state(self, tensors: dict) -> None:
        delta = dense_from_sparse(tensors, self.weight_shape, self.diff.dtype, self.diff.device)
        self.fix(delta, delta != 0)


# ---- training hooks and reports --------------------------------------------------------------

def regularization(model: nn.Module, name: str, config: DiffPruningConfig):
    """``l0_weight`` times the expected number of open gates of adapter ``name``."""
    deltas = _deltas(model, name)
    if not config.l0_weight or not deltas:
        return None
    return config.l0_weight * sum(d.expected_l0() for d in deltas)


def after_step(model: nn.Module, name: str, config: DiffPruningConfig, step: int, total_steps: int) -> None:
    if config.target_sparsity is not None and step == total_steps:
        finalize(model, name)


def finalize(model: nn.Module, name: str = "default", sparsity: float | None = None) -> None:
    """Project adapter ``name``'s diff onto ``sparsity`` (default: its ``target_sparsity``) by
    magnitude, over all its modules together, and fix the mask (see the module notes)."""
    state = require_state(model)
    state.check_known([name])
    if name in state.merged:
        raise StateError(f"adapter {name!r} is merged; peftlab.unmerge it before finalizing its diff")
    if sparsity is None:
        configs = [c for c in state.configs[name] if isinstance(c, DiffPruningConfig)]
        sparsity = configs[0].target_sparsity if configs else None
    if sparsity is None:
        raise ConfigError("diff_pruning: finalize needs a sparsity; pass sparsity=0.995 or attach with "
                          "diff_pruning[target_sparsity=0.995]")
    check_sparsity(sparsity, "sparsity")
    deltas = _require_deltas(model, name)
    current = [d.delta_weight() for d in deltas]
    for module, delta, keep in zip(deltas, current, magnitude_masks(current, sparsity)):
        module.fix(delta, keep)


def diff_sparsity(model: nn.Module, name: str = "default") -> float:
    """The fraction of entries of adapter ``name``'s eval-time diff that are exactly zero."""
    deltas = [d.delta_weight() for d in _require_deltas(model, name)]
    zeros = sum(int((d == 0).sum()) for d in deltas)
    return zeros / sum(d.numel() for d in deltas)


def _deltas(model: nn.Module, name: str) -> list:
    return [layer.adapters[name] for _, layer in adapter_layers(model, name)
            if isinstance(layer.adapters[name], DiffPruningDelta)]


def _require_deltas(model: nn.Module, name: str) -> list:
    require_state(model).check_known([name])
    deltas = _deltas(model, name)
    if not deltas:
        raise StateError(f"adapter {name!r} has no diff_pruning modules")
    return deltas


# ---- method protocol -------------------------------------------------------------------------

Config = DiffPruningConfig


def make_adapter(module: nn.Module, config: DiffPruningConfig, name: str) -> nn.Module:
    return DiffPruningDelta(module, config.alpha_init, config.alpha_lr_ratio)
