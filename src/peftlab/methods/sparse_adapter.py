"""SparseAdapter: "SparseAdapter: An Easy Approach for Improving the Parameter-Efficiency of Adapters"
(He, Ding, Dong, Zhang & Tao, Findings of EMNLP 2022, arXiv:2210.04284).

Why: adapters grow their bottleneck to match full fine-tuning, which defeats their purpose. He et al.
look at adapters through network pruning: prune each adapter's weights once, at initialization, and
train only what is left. Up to 80% sparsity the pruned adapter matches the dense one (40% often beats
it), and "Large-Sparse", a wider bottleneck pruned harder for the same budget (2x the width at 50%
sparsity), beats the dense adapter of that budget: ``sparse_adapter[bottleneck=128,sparsity=0.5]``
stores about as many weights as a dense bottleneck of 64.

What: a bottleneck adapter (``adapter`` = ``houlsby``, ``pfeiffer`` or ``parallel``, placed and built
exactly as that method does; ``targets`` default to its placement) whose two projection weights are
pruned to ``sparsity`` when the adapter is attached, by ``criterion`` (the paper also prunes LoRA
and MAM this way; for LoRA peftlab offers structured rank pruning instead, ``peftlab.prune_ranks``):

- ``snip`` (Lee et al., 2019, arXiv:1810.02340; the paper's best): the score of a weight is its
  connection sensitivity ``|w * dL/dw|``, the gradient summed over the first training batches. It is
  computed by the ``calibrate`` hook, which ``peftlab.train`` runs once before the first step (a
  hand-written loop calls ``peftlab.core.adapters.calibrate``); until then the mask is the magnitude
  one, so an adapter that is never calibrated is still sparse;
- ``magnitude``: ``|w|``;
- ``random``: a uniform draw from torch's generator (seeded runs repeat it).

Each projection keeps its ``round((1 - sparsity) * numel)`` highest-scoring weights. The paper's code
ranks all adapter weights of the model together by default; ranking within each matrix instead gives
every matrix the target sparsity exactly and keeps saved shapes fixed, whatever the data picks. Biases
stay dense (as in the paper's code: ``prune_bias`` off).

The mask is a boolean buffer of each projection (``SparseLinear``): the forward multiplies the weight by
it, so a pruned weight contributes nothing and gets a zero gradient; its stored value is set to 0 when
the mask becomes final (calibration, the first training step) and kept at 0 after every step
(``after_step``), whatever the optimizer does (weight decay, MeZO's perturbations). A mask is chosen
only before training: calibrating a trained or loaded adapter keeps its mask.

Init: the paper's code (``--ffn_adapter_init_option bert``) draws both projections from N(0, 0.02) with
zero biases. The dense family starts its up-projection at zero instead, but every score of a zero
matrix is zero, and so is every SNIP score of the down-projection that feeds it, which would leave
the mask to chance. So the model starts near the base model, not exactly at it
(``IDENTITY_AT_INIT = False``).

Storage: saving writes each projection's kept weights as flat positions and values (about 8 bytes per
kept weight) plus its bias; ``peftlab.summary`` still counts the dense parameter tensors, ``sparsity``
here counts what is kept. Not mergeable: the nonlinearity between the projections cannot be folded
into a weight. Settings: ``adapter``, ``sparsity``, ``criterion``, ``scale`` (parallel only) and those of
``bottleneck.BottleneckConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapters as core
from ..core import targets
from ..errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError
from ..prune import BINARIZED
from . import houlsby, parallel, pfeiffer
from .bottleneck import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the property tests' model)
from .bottleneck import BottleneckAdapter
from .parallel import ParallelAdapter, ParallelConfig
from .sparse_delta import read_sparse, to_sparse

CATEGORY = "additive"
PAPER = "He et al., 2022 (arXiv:2210.04284)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # both projections start random (see the module notes)
INVALID_SETTINGS = ("sparsity=1", "sparsity=-0.2", "criterion=grasp", "adapter=lora", "reduction=0")
EXAMPLE_SETTINGS = "bottleneck=8"  # reduction 16 leaves a bottleneck of 2 on the tiny hidden-32 models
DEFAULT_LR = 5e-3
ADAPTERS = {"houlsby": houlsby, "pfeiffer": pfeiffer, "parallel": parallel}
CRITERIA = ("snip", "magnitude", "random")
INIT_STD = 0.02
# ``peftlab.prune.binarize`` records a binarized adapter as this part of its configs, so that loading
# rebuilds its 1-bit layers; listed here to be found by the registry (``methods/__init__.py``).
PARTS = {"binarized": BINARIZED}


@dataclass
class SparseAdapterConfig(ParallelConfig):
    """adapter: the adapter made sparse (houlsby, pfeiffer or parallel), whose placement ``targets``
    default to; sparsity: the fraction of each projection's weights pruned (the paper: 40% is best, up
    to 80% matches the dense adapter); criterion: snip, magnitude or random; scale: the parallel
    adapter's output factor (ignored by the serial ones)."""

    method: ClassVar[str] = "sparse_adapter"
    targets: Any = None
    adapter: str = "houlsby"
    sparsity: float = 0.4
    criterion: str = "snip"

    def validate(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ConfigError(f"{self.method}: adapter must be one of {', '.join(ADAPTERS)} (the bottleneck adapter to "
                              f"prune), got {self.adapter!r}")
        if self.targets is None:
            self.targets = ADAPTERS[self.adapter].Config().targets
        super().validate()
        if not (isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
                and 0 <= self.sparsity < 1):
            raise ConfigError(f"{self.method}: sparsity is the fraction of weights pruned, in [0, 1) (e.g. 0.4 or 0.8), "
                              f"got {self.sparsity!r}")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"{self.method}: criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")


# ---- pure math -------------------------------------------------------------------------------

def kept_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights survive pruning to ``sparsity`` (at least one)."""
    return max(1, numel - round(sparsity * numel))


def top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """A boolean mask of the ``keep`` highest scores."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.reshape(-1).topk(keep).indices] = True
    return mask.view(scores.shape)


def snip_scores(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """SNIP's connection sensitivity ``|w * dL/dw|``."""
    return (weight.detach() * grad).abs()


# ---- modules ---------------------------------------------------------------------------------

class SparseLinear(nn.Linear):
    """``nn.Linear`` that computes with ``weight * mask``; ``final`` is False while a SNIP mask waits
    for calibration."""

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None):
        super().__init__(in_features, out_features, device=device, dtype=dtype)
        self.register_buffer("mask", torch.ones(out_features, in_features, dtype=torch.bool, device=device))
        self.final = True

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

    def set_mask(self, mask: torch.Tensor, final: bool = True) -> None:
        self.mask.copy_(mask)
        self.final = final
        if final:
            self.settle()

    def settle(self) -> None:
        """Make the mask final and the pruned weights exactly 0."""
        self.final = True
        with torch.no_grad():
            self.weight.mul_(self.mask)

    def kept(self) -> int:
        return int(self.mask.sum())


def sparse_projection(dense: nn.Linear, config: SparseAdapterConfig) -> SparseLinear:
    """A projection of ``dense``'s shape, drawn from N(0, INIT_STD), pruned by magnitude or at random
    (SNIP: by magnitude until calibrated)."""
    weight = dense.weight
    layer = SparseLinear(dense.in_features, dense.out_features, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        nn.init.normal_(layer.weight, std=INIT_STD)
        nn.init.zeros_(layer.bias)
    scores = torch.rand_like(layer.weight) if config.criterion == "random" else layer.weight.detach().abs()
    layer.set_mask(top_mask(scores, kept_count(weight.numel(), config.sparsity)), final=config.criterion != "snip")
    return layer


class SparseStorage:
    """Saving writes each projection's kept weights (flat positions and values) and its bias."""

    PROJECTIONS = ("down", "up")

    def export_state(self) -> dict:
        tensors = {}
        for key in self.PROJECTIONS:
            layer = getattr(self, key)
            kept = layer.mask.reshape(-1).nonzero().squeeze(1)
            for part, value in to_sparse(kept, layer.weight.detach().reshape(-1)[kept], layer.weight.numel()).items():
                tensors[f"{key}.{part}"] = value
            tensors[f"{key}.bias"] = layer.bias.detach()
        return tensors

    def import_state(self, tensors: dict) -> None:
        expected = {f"{key}.{part}" for key in self.PROJECTIONS for part in ("indices", "values", "bias")}
        if set(tensors) != expected:
            raise AdapterFormatError(f"{self.method}: expected the tensors {sorted(expected)}, found {sorted(tensors)}; "
                                     "the file was not written by this method")
        for key in self.PROJECTIONS:
            layer = getattr(self, key)
            indices, values = read_sparse({p: tensors[f"{key}.{p}"] for p in ("indices", "values")}, layer.weight.shape)
            bias = tensors[f"{key}.bias"]
            if bias.shape != layer.bias.shape:
                raise IncompatibleBaseError(f"{self.method}: the saved {key}-projection bias has shape {tuple(bias.shape)}, "
                                            f"this adapter's {tuple(layer.bias.shape)}; it was saved for another base "
                                            "model or another bottleneck")
            mask = torch.zeros(layer.weight.numel(), dtype=torch.bool, device=layer.mask.device)
            mask[indices.to(mask.device)] = True
            with torch.no_grad():
                layer.weight.zero_().view(-1)[indices.to(mask.device)] = values.to(layer.weight)
                layer.bias.copy_(bias)
            layer.set_mask(mask.view_as(layer.weight))


class SparseSerialAdapter(SparseStorage, BottleneckAdapter):
    """A Houlsby or Pfeiffer adapter with pruned projections."""


class SparseParallelAdapter(SparseStorage, ParallelAdapter):
    """A parallel adapter with pruned projections."""


# ---- method protocol -------------------------------------------------------------------------

Config = SparseAdapterConfig


def find_targets(model: nn.Module, config: SparseAdapterConfig) -> list[str]:
    """The modules the chosen adapter can wrap (parallel adapters also take whole blocks)."""
    return targets.find_targets(model, config, ADAPTERS[config.adapter].can_wrap)


def make_adapter(module: nn.Module, config: SparseAdapterConfig, name: str) -> nn.Module:
    dense = ADAPTERS[config.adapter].make_adapter(module, config, name)  # the placement, widths and checks
    down, up = sparse_projection(dense.down, config), sparse_projection(dense.up, config)
    if isinstance(dense, ParallelAdapter):
        return SparseParallelAdapter(down, up, config, name, dense.wraps_block)
    return SparseSerialAdapter(down, up, config, name)


def after_attach(model: nn.Module, name: str, config: SparseAdapterConfig) -> None:
    """What the chosen adapter sets up once attached (a parallel adapter's FFN-input hooks, robust AdapterDrop)."""
    ADAPTERS[config.adapter].after_attach(model, name, config)


def projections(model: nn.Module, name: str) -> list[SparseLinear]:
    """The pruned projections of adapter ``name``, in module order."""
    return [getattr(adapter, key) for _, adapter in core.method_adapters(model, name, Config.method)
            for key in SparseStorage.PROJECTIONS]


def sparsity(model: nn.Module, name: str = "default") -> dict:
    """``{"kept", "total", "sparsity"}`` over the projection weights of adapter ``name``."""
    layers = projections(model, name)
    kept, total = sum(layer.kept() for layer in layers), sum(layer.weight.numel() for layer in layers)
    return {"kept": kept, "total": total, "sparsity": 1 - kept / max(total, 1)}


# ---- training hooks --------------------------------------------------------------------------

def loss_gradients(model: nn.Module, weights: list, batches, loss_fn) -> list:
    """The gradient of the loss summed over ``batches`` for each of ``weights`` (``.grad`` untouched)."""
    totals = [torch.zeros_like(w) for w in weights]
    with torch.enable_grad():
        for batch in batches:
            loss = loss_fn(model, batch)
            if loss is None or not torch.isfinite(loss):  # e.g. a batch whose labels are all masked
                continue
            for total, grad in zip(totals, torch.autograd.grad(loss, weights, allow_unused=True)):
                if grad is not None:
                    total += grad
    return totals


def calibrate(model: nn.Module, name: str, config: SparseAdapterConfig, batches, loss_fn) -> None:
    """SNIP: choose each projection's mask by ``|w * dL/dw|`` of the dense adapter on ``batches``; a
    no-op for the other criteria and for an adapter whose masks are final (trained or loaded)."""
    layers = projections(model, name)
    if config.criterion != "snip" or all(layer.final for layer in layers):
        return
    batches = list(batches)
    if not batches:
        raise StateError(f"{config.method}: SNIP calibration needs at least one batch")
    for layer in layers:
        layer.mask.fill_(True)  # score every weight of the dense adapter
    weights = [layer.weight for layer in layers]
    for layer, weight, grad in zip(layers, weights, loss_gradients(model, weights, batches, loss_fn)):
        layer.set_mask(top_mask(snip_scores(weight, grad), kept_count(weight.numel(), config.sparsity)))


def after_step(model: nn.Module, name: str, config: SparseAdapterConfig, step: int, total_steps: int) -> None:
    """Keep the pruned weights exactly 0 (and the masks final) whatever the optimizer did."""
    for layer in projections(model, name):
        layer.settle()
