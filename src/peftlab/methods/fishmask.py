"""FishMask: Training Neural Networks with Fixed Sparse Masks (Sung, Nair & Raffel, NeurIPS 2021,
arXiv:2111.09839).

Why: most of a pretrained model's parameters barely matter for a new task, and the ones that do
can be found before training. FishMask (the paper's "FISH mask") ranks the entries of the targeted
weights (all linear layers by default; embeddings too if targeted) by their empirical Fisher
information, the mean over examples of the squared gradient of the example's loss,

    F_j = 1/N sum_i (d loss(x_i, y_i) / d W_j)^2,

computed here per example, as the paper defines it (each calibration batch is split into its rows),
and then trains only the top entries; every other entry stays bit-identical to the base.

Each targeted weight keeps ``k = max(1, round(density * numel))`` entries (``density`` = 0.005 by
default: the paper's 0.5%), chosen within that weight. The paper ranks all entries together; ranking
per weight keeps every adapter tensor's shape fixed from the moment the adapter is attached, so an
optimizer made before calibration, checkpoints and their exact resume, and saved files all stay
valid whatever the data picks. A weight's trainable state is ``values`` (k numbers, starting at 0,
so the model is exactly the base at step 0) scattered at ``indices`` (a persistent buffer of flat
positions into the weight), so checkpoints and saved adapters store k positions and k values.

Calibration is the ``calibrate`` hook: ``peftlab.train`` calls it once before training with the
first training batches (in eval mode); a hand-written loop calls
``peftlab.core.adapters.calibrate(model, batches, loss_fn)``. It needs gradients with respect to
the frozen base weights, so it switches ``requires_grad`` on for them and back off afterwards, and
takes the gradients with ``torch.autograd.grad``, leaving every ``.grad`` untouched. Until it runs,
the mask is the k largest-magnitude entries of each weight (chosen when the adapter is attached,
deterministic), so an adapter that is never calibrated still trains a fixed sparse set. The mask is
chosen from data only while the adapter is untrained (all values 0): calibrating a trained or loaded
adapter (a second ``peftlab.train`` call, say) keeps its mask and values.

Mergeable: merging adds the k values to their entries of ``W`` (unmerging subtracts them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.adapters import adapter_layers
from ..core.config import MethodConfig
from ..errors import ConfigError, IncompatibleBaseError, StateError
from ..quant.layers import is_quantized
from .sparse_delta import WeightDelta, delta_dtype, read_sparse, to_sparse
from .sparse_delta import can_wrap  # noqa: F401  (the method protocol)

CATEGORY = "selective"
PAPER = "Sung et al., 2021 (arXiv:2111.09839)"
MERGEABLE = True
INVALID_SETTINGS = ("density=0", "density=1.5")
EXAMPLE_SETTINGS = "density=0.5"  # a tiny hidden-32 model learns too little in a few steps at 0.5%
DEFAULT_LR = 2e-3


@dataclass
class FishMaskConfig(MethodConfig):
    """density: the fraction of each targeted weight's entries that train (the paper: 0.005)."""

    method: ClassVar[str] = "fishmask"
    density: float = 0.005

    def validate(self) -> None:
        super().validate()
        if not (isinstance(self.density, (int, float)) and not isinstance(self.density, bool) and 0 < self.density <= 1):
            raise ConfigError(f"{self.method}: density must be in (0, 1], the fraction of each weight's entries that "
                              f"train (the paper uses 0.005), got {self.density!r}")


# ---- pure math -------------------------------------------------------------------------------

def entries_to_train(numel: int, density: float) -> int:
    return max(1, min(numel, round(density * numel)))


def top_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat positions of the k largest scores, in increasing order."""
    return scores.reshape(-1).topk(k).indices.sort().values


def split_examples(batch: dict) -> list:
    """One single-row batch per example (tensors whose first dimension is the batch's rows are sliced)."""
    rows = next((v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0), None)
    if rows is None:
        raise StateError(f"fishmask: a calibration batch has no batched tensor (keys: {sorted(batch)})")

    def row(value, i):
        return value[i:i + 1] if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == rows else value

    return [{key: row(value, i) for key, value in batch.items()} for i in range(rows)]


def empirical_fisher(model: nn.Module, weights: list, batches, loss_fn) -> list:
    """Mean over the examples of ``batches`` of each weight's squared per-example loss gradient
    (``loss_fn(model, batch)`` returns a scalar). The weights need ``requires_grad``."""
    fisher = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    examples = 0
    with torch.enable_grad():
        for batch in batches:
            for example in split_examples(batch):
                loss = loss_fn(model, example)
                if loss is None or not torch.isfinite(loss):  # e.g. a row whose labels are all masked
                    continue
                grads = torch.autograd.grad(loss, weights, allow_unused=True)
                for total, grad in zip(fisher, grads):
                    if grad is not None:
                        total += grad.float().square()
                examples += 1
    if not examples:
        raise StateError("fishmask: calibration found no example with a finite loss; give it batches with labels")
    return [total / examples for total in fisher]


# ---- module ----------------------------------------------------------------------------------

class FishMaskDelta(WeightDelta):
    """k trainable values at fixed flat positions of one weight."""

    def __init__(self, base: nn.Module, density: float):
        if is_quantized(base):
            raise ConfigError("fishmask: a quantized base has no gradient for its weight entries, which FishMask picks by; "
                              "use it on a full-precision model (or peftlab.quant.dequantize the base first)")
        super().__init__(base)
        weight = base.weight
        k = entries_to_train(weight.numel(), density)
        self.register_buffer("indices", top_positions(weight.detach().abs(), k))  # until calibrated
        self.values = nn.Parameter(torch.zeros(k, dtype=delta_dtype(base), device=weight.device))

    def current_delta(self) -> torch.Tensor:
        flat = self.values.new_zeros(self.weight_numel)
        return flat.scatter(0, self.indices, self.values).view(self.weight_shape)

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(-1).scatter_add(0, self.indices, self.values).view_as(weight)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.current_delta()

    def merge(self, base: nn.Module) -> None:
        base.weight.data.view(-1).index_add_(0, self.indices, self.values.detach().to(base.weight.dtype))

    def unmerge(self, base: nn.Module) -> None:
        base.weight.data.view(-1).index_add_(0, self.indices, -self.values.detach().to(base.weight.dtype))

    def export_state(self) -> dict:
        return to_sparse(self.indices, self.values, self.weight_numel)

    def import_state(self, tensors: dict) -> None:
        indices, values = read_sparse(tensors, self.weight_shape)
        if indices.numel() != self.values.numel():
            raise IncompatibleBaseError(f"fishmask: the file holds {indices.numel()} entries for a weight of shape "
                                        f"{self.weight_shape}, this adapter trains {self.values.numel()}; it was saved "
                                        "with another density or for another base model")
        with torch.no_grad():
            self.indices.copy_(indices)
            self.values.copy_(values)

    def select(self, positions: torch.Tensor) -> None:
        """Train the entries at ``positions`` from now on, starting from 0."""
        with torch.no_grad():
            self.indices.copy_(positions)
            self.values.zero_()


# ---- training hook ---------------------------------------------------------------------------

def calibrate(model: nn.Module, name: str, config: FishMaskConfig, batches, loss_fn) -> None:
    """Choose each weight's mask of adapter ``name`` by empirical Fisher information on ``batches``
    (see the module notes); a no-op for an adapter that has trained already."""
    pairs = [(layer.base_layer, layer.adapters[name]) for _, layer in adapter_layers(model, name)
             if isinstance(layer.adapters[name], FishMaskDelta)]
    if not pairs or any(bool(adapter.values.detach().ne(0).any()) for _, adapter in pairs):
        return
    batches = list(batches)
    if not batches:
        raise StateError("fishmask: calibrate needs at least one batch")
    weights = list({id(base.weight): base.weight for base, _ in pairs}.values())
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        fisher = dict(zip(map(id, weights), empirical_fisher(model, weights, batches, loss_fn)))
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    for base, adapter in pairs:
        adapter.select(top_positions(fisher[id(base.weight)], adapter.values.numel()))


# ---- method protocol -------------------------------------------------------------------------

Config = FishMaskConfig


def make_adapter(module: nn.Module, config: FishMaskConfig, name: str) -> nn.Module:
    return FishMaskDelta(module, config.density)
