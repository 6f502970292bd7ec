"""Shrinking trained adapters: structured rank pruning of LoRA, and 1-bit (binarized) adapters.

**Rank pruning** (``prune_ranks``), in the spirit of structured LoRA pruning (SPLoRA, Hedegaard et al.,
2022, arXiv:2211.10155; LoRAPrune, Zhang et al., 2023, arXiv:2305.18403): a LoRA update
``s * B A = s * sum_i B[:, i] A[i, :]`` is a sum of ``r`` rank-one terms, and after training some of
them matter much less than others. ``prune_ranks`` scores each term per module and physically removes
the low ones, so ``A`` and ``B`` become ``r' x in`` and ``out x r'``:

- ``criterion="norm"``: ``||B[:, i]|| * ||A[i, :]||``, the Frobenius norm of the term's update;
- ``criterion="taylor"``: ``|sum_j A[i, j] * dL/dA[i, j]|``, the first-order change of the loss when
  the term is removed (LoRAPrune's gradient-times-weight importance, here for a whole rank), its
  absolute value summed over ``batches``.

``keep`` (a fraction) or ``target_r`` sets each module's new rank (at least 1). The update's scale
``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA) is kept by setting ``alpha`` to
``s * r'`` (``s * sqrt(r')``), and the adapter's config (``r``, ``alpha``, ``rank_pattern``,
``alpha_pattern``) is rewritten to the new ranks, so ``peftlab.save`` writes a valid, smaller Hugging
Face LoRA that ``peft`` loads. It works on ``lora`` and ``dora`` adapters (linear and embedding LoRA;
DoRA keeps its magnitudes). Prune after training, or between two ``peftlab.train`` calls (each builds a
new optimizer) to let the remaining ranks recover. AdaLoRA, SoRA and DyLoRA choose or order their
ranks themselves; PiSSA's adapter is tied to the residual it left in the base; both are refused.

**Binarization** (``binarize``), after BI-Adapter (Jie, Wang & Deng, ICCV 2023, "Revisiting the
Parameter Efficiency of Adapters from the Perspective of Precision Redundancy", arXiv:2307.16867):
adapters converge to flat minima, so they tolerate low precision, down to one bit. ``binarize``
replaces every linear weight inside the adapter's per-layer modules (LoRA's A and B, a bottleneck's
two projections, ...) by ``sign(W) * scale`` with ``scale`` the mean absolute value of ``W``, per
matrix or per output row (``per``); for fixed signs this scale minimizes the squared error (XNOR-Net,
Rastegari et al., 2016). Biases and vectors (DoRA's magnitudes) stay as they are. The paper trains with
the quantizer in the loop (straight-through gradients) and a Gaussian codebook; this is the
post-training form, applied once to a trained adapter (``benchmarks/prune.py`` measures what it costs).
The 1-bit layers (``BinaryLinear``) hold the signs packed 8 per byte (``uint8``) and the scales, as
buffers: in memory and in the saved file a weight costs 1 bit instead of 32. ``binarize`` records
itself as one more entry of the adapter's configs (the part ``binarized``), so ``peftlab.save`` writes
peftlab's format (the packed bits under ``<module>.<layer>.bits``) and ``peftlab.load`` rebuilds the
1-bit layers before reading them. Merging a binarized LoRA merges ``sign(W) * scale``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .core import adapters as core
from .core.config import MethodConfig
from .core.state import require_state
from .core.targets import get_submodule_parent
from .errors import ConfigError, StateError
from .methods.dora import DoraLinear
from .methods.lora import LoraEmbedding, LoraLinear

RANK_CRITERIA = ("norm", "taylor")
PRUNABLE = (LoraLinear, DoraLinear, LoraEmbedding)  # exact types: LoRA variants subclass LoraLinear
BINARY_SCALES = ("matrix", "row")


# ---- rank pruning: pure math -----------------------------------------------------------------

def rank_norms(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``||B[:, i]|| * ||A[i, :]||`` for each rank ``i`` (A: r x in, B: out x r)."""
    return torch.linalg.vector_norm(B.detach(), dim=0) * torch.linalg.vector_norm(A.detach(), dim=1)


def taylor_scores(A: torch.Tensor, grad_A: torch.Tensor) -> torch.Tensor:
    """``|sum_j A[i, j] * dL/dA[i, j]|`` for each rank ``i``: the first-order loss change of removing it."""
    return (A.detach() * grad_A).sum(1).abs()


def new_rank(r: int, keep: float | None, target_r: int | None) -> int:
    return max(1, min(r, target_r)) if target_r is not None else max(1, round(keep * r))


def kept_ranks(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in their original order."""
    return scores.topk(count).indices.sort().values


def alpha_for_scale(scale: float, r: int, rslora: bool) -> float:
    """The ``alpha`` that gives the update scale ``scale`` at rank ``r``."""
    return scale * (math.sqrt(r) if rslora else r)


# ---- rank pruning ----------------------------------------------------------------------------

def factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors (A: r x in, B: out x r) of a linear or embedding LoRA, as parameters."""
    if isinstance(adapter, LoraEmbedding):
        return adapter.lora_embedding_A, adapter.lora_embedding_B
    return adapter.lora_A.weight, adapter.lora_B.weight


def shrink(adapter: nn.Module, kept: torch.Tensor) -> None:
    """Keep only the ranks ``kept`` of ``adapter``, with the same update scale."""
    A, B = factors(adapter)
    new_A, new_B = A.detach()[kept].clone(), B.detach()[:, kept].clone()
    if isinstance(adapter, LoraEmbedding):
        adapter.lora_embedding_A = nn.Parameter(new_A, requires_grad=A.requires_grad)
        adapter.lora_embedding_B = nn.Parameter(new_B, requires_grad=B.requires_grad)
    else:
        bias = adapter.lora_B.bias  # lora_bias: the output-side bias does not depend on the rank
        adapter.lora_A = _linear_from(new_A, A.requires_grad)
        adapter.lora_B = _linear_from(new_B, B.requires_grad, bias)
    adapter.r = len(kept)
    adapter.alpha = alpha_for_scale(adapter.scaling, adapter.r, adapter.rslora)


def _linear_from(weight: torch.Tensor, requires_grad: bool, bias: nn.Parameter | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = bias
    return linear


def prune_ranks(model: nn.Module, name: str = "default", *, keep: float | None = None, target_r: int | None = None,
                criterion: str = "norm", batches=None, loss_fn=None) -> dict:
    """Remove the least important ranks of every LoRA / DoRA module of adapter ``name``.

    Give ``keep`` (the fraction of each module's rank to keep) or ``target_r`` (each module's new rank).
    ``criterion="taylor"`` needs ``batches`` and ``loss_fn(model, batch) -> loss``. Returns
    ``{"parameters_before", "parameters_after", "ranks": {module: [r_before, r_after]}}``.
    """
    _check_prune_settings(keep, target_r, criterion, batches, loss_fn)
    state = require_state(model)
    state.check_known([name])
    if name in state.merged:
        raise StateError(f"adapter {name!r} is merged into the base; peftlab.unmerge it before pruning its ranks")
    adapters = _prunable_adapters(model, name, state)
    before = _parameter_count(adapters.values())
    if criterion == "norm":
        scores = {m: rank_norms(*factors(a)) for m, a in adapters.items()}
    else:
        scores = _taylor_importance(model, name, adapters, state, batches, loss_fn)
    ranks = {}
    for module_name, adapter in adapters.items():
        r = adapter.r
        shrink(adapter, kept_ranks(scores[module_name], new_rank(r, keep, target_r)))
        ranks[module_name] = [r, adapter.r]
    _record_ranks(state.configs[name], model, name)
    return {"parameters_before": before, "parameters_after": _parameter_count(adapters.values()), "ranks": ranks}


def _check_prune_settings(keep, target_r, criterion, batches, loss_fn) -> None:
    if (keep is None) == (target_r is None):
        raise ConfigError("prune_ranks: give either keep (the fraction of each module's rank to keep, e.g. 0.5) or "
                          "target_r (each module's new rank), not both or neither")
    if keep is not None and not (isinstance(keep, (int, float)) and not isinstance(keep, bool) and 0 < keep <= 1):
        raise ConfigError(f"prune_ranks: keep must be a fraction in (0, 1], got {keep!r}")
    if target_r is not None and not (isinstance(target_r, int) and not isinstance(target_r, bool) and target_r > 0):
        raise ConfigError(f"prune_ranks: target_r must be a positive integer, got {target_r!r}")
    if criterion not in RANK_CRITERIA:
        raise ConfigError(f"prune_ranks: criterion must be one of {', '.join(RANK_CRITERIA)}, got {criterion!r}")
    if criterion == "taylor" and (batches is None or loss_fn is None):
        raise ConfigError("prune_ranks: criterion='taylor' scores ranks by gradients; pass batches and "
                          "loss_fn(model, batch) -> loss")


def _prunable_adapters(model, name, state) -> dict:
    methods = [c.method for c in state.configs[name]]
    if not {"lora", "dora"} & set(methods):
        raise StateError(f"prune_ranks works on lora and dora adapters; {name!r} uses {', '.join(methods)} "
                         "(AdaLoRA, SoRA and DyLoRA choose or order their ranks themselves)")
    adapters = {m: layer.adapters[name] for m, layer in core.adapter_layers(model, name)
                if type(layer.adapters[name]) in PRUNABLE}
    if not adapters:
        raise StateError(f"adapter {name!r} has no LoRA module to prune")
    if any(getattr(a, "alters_base", False) for a in adapters.values()):
        raise StateError(f"adapter {name!r} uses init=pissa, whose factors are tied to the residual it left in the base; "
                         "save it (peftlab.save writes the equivalent plain LoRA), load that, and prune the loaded adapter")
    return adapters


def _parameter_count(adapters) -> int:
    return sum(p.numel() for adapter in adapters for p in adapter.parameters())


def _taylor_importance(model, name, adapters: dict, state, batches, loss_fn) -> dict:
    if name not in state.active:
        raise StateError(f"prune_ranks(criterion='taylor') needs adapter {name!r} active; peftlab.set_active it first")
    params = [factors(a)[0] for a in adapters.values()]
    flags = [p.requires_grad for p in params]
    totals = [torch.zeros(p.shape[0], device=p.device) for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for batch in batches:
                loss = loss_fn(model, batch)
                if loss is None or not torch.isfinite(loss):
                    raise StateError("prune_ranks(criterion='taylor'): loss_fn gave no finite loss for a batch; "
                                     "give it batches with labels")
                for total, p, grad in zip(totals, params, torch.autograd.grad(loss, params, allow_unused=True)):
                    if grad is not None:
                        total += taylor_scores(p, grad).float()
    finally:
        model.train(was_training)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return dict(zip(adapters, totals))


def _record_ranks(configs, model, name) -> None:
    """Write every LoRA / DoRA module's current rank and alpha into its config: the most common as
    ``r`` / ``alpha``, the others as exact-name patterns."""
    for config in configs:
        kind = {"lora": (LoraLinear, LoraEmbedding), "dora": (DoraLinear,)}.get(config.method)
        if kind is None:
            continue
        ranks, alphas = {}, {}
        for module_name, layer in core.adapter_layers(model, name):
            adapter = layer.adapters[name]
            if type(adapter) in kind:
                ranks[module_name], alphas[module_name] = adapter.r, adapter.alpha
        if not ranks:
            continue
        config.r = Counter(ranks.values()).most_common(1)[0][0]
        config.alpha = Counter(alphas.values()).most_common(1)[0][0]
        config.rank_pattern = {re.escape(m): r for m, r in ranks.items() if r != config.r}
        config.alpha_pattern = {re.escape(m): a for m, a in alphas.items() if a != config.alpha}


# ---- binarization: pure math -----------------------------------------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Booleans -> ``uint8``, 8 per byte, the first in the lowest bit; the last byte is padded with 0."""
    flat = bits.reshape(-1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 8)).view(-1, 8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=bits.device)
    return (flat * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` booleans that ``pack_bits`` stored."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).reshape(-1)[:count].bool()


def binary_scale(weight: torch.Tensor, per: str) -> torch.Tensor:
    """Mean absolute value per output row (``per="row"``, shape out) or of the whole matrix (shape 1)."""
    magnitude = weight.detach().abs()
    return magnitude.mean(1) if per == "row" else magnitude.mean().reshape(1)


# ---- binarization: the 1-bit layer -----------------------------------------------------------

class BinaryLinear(nn.Module):
    """A linear layer with weight ``sign * scale``: the signs packed 8 per byte (``bits``), the scales
    per output row or per matrix (``scale``), both buffers; the bias, if any, as it was."""

    def __init__(self, in_features: int, out_features: int, per: str, bias: nn.Parameter | None, device=None,
                 dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.per = in_features, out_features, per
        self.register_buffer("bits", torch.zeros(math.ceil(in_features * out_features / 8), dtype=torch.uint8,
                                                 device=device))
        self.register_buffer("scale", torch.ones(out_features if per == "row" else 1, dtype=dtype, device=device))
        self.bias = bias

    @classmethod
    def like(cls, linear: nn.Linear, per: str) -> "BinaryLinear":
        """A 1-bit layer of ``linear``'s shape (and its bias), its signs and scales still to be set."""
        w = linear.weight
        return cls(linear.in_features, linear.out_features, per, linear.bias, device=w.device, dtype=w.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per: str) -> "BinaryLinear":
        layer = cls.like(linear, per)
        with torch.no_grad():
            layer.bits.copy_(pack_bits(linear.weight >= 0))
            layer.scale.copy_(binary_scale(linear.weight, per))
        return layer

    @property
    def weight(self) -> torch.Tensor:
        signs = unpack_bits(self.bits, self.in_features * self.out_features).view(self.out_features, self.in_features)
        return torch.where(signs, self.scale[:, None], -self.scale[:, None])

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, per={self.per}, bias={self.bias is not None}"


# ---- binarization ----------------------------------------------------------------------------

@dataclass
class BinarizedConfig(MethodConfig):
    """per: one scale per weight matrix, or per output row. Recorded by ``binarize``, not attached by hand."""

    method: ClassVar[str] = "binarized"
    per: str = "matrix"

    def validate(self) -> None:
        super().validate()
        if self.per not in BINARY_SCALES:
            raise ConfigError(f"binarize: per must be one of {', '.join(BINARY_SCALES)} (one scale per weight matrix or "
                              f"per output row), got {self.per!r}")


def binarize(model: nn.Module, name: str = "default", per: str = "matrix") -> dict:
    """Turn every linear weight of adapter ``name``'s per-layer modules into ``sign(W) * mean|W|``
    (``per`` matrix or output row), stored 1 bit per weight. Returns ``{"matrices", "weights",
    "bytes_before", "bytes_after"}`` (the weights' storage before and after)."""
    state = require_state(model)
    state.check_known([name])
    config = BinarizedConfig(per=per)
    config.validate()
    if name in state.merged:
        raise StateError(f"adapter {name!r} is merged into the base; peftlab.unmerge it before binarizing")
    if any(c.method == BinarizedConfig.method for c in state.configs[name]):
        raise StateError(f"adapter {name!r} is binarized already")
    report = {"matrices": 0, "weights": 0, "bytes_before": 0, "bytes_after": 0}

    def convert(linear: nn.Linear) -> BinaryLinear:
        layer = BinaryLinear.from_linear(linear, per)
        report["matrices"] += 1
        report["weights"] += linear.weight.numel()
        report["bytes_before"] += linear.weight.numel() * linear.weight.element_size()
        report["bytes_after"] += layer.bits.numel() + layer.scale.numel() * layer.scale.element_size()
        return layer

    _replace_linears(model, name, convert)
    if not report["matrices"]:
        raise StateError(f"adapter {name!r} ({', '.join(c.method for c in state.configs[name])}) has no linear weight "
                         "in its per-layer modules to binarize")
    state.configs[name].append(config)
    return report


def _replace_linears(model: nn.Module, name: str, make) -> None:
    """Replace every plain ``nn.Linear`` inside adapter ``name``'s per-layer modules by ``make(linear)``."""
    for _, layer in core.adapter_layers(model, name):
        adapter = layer.adapters[name]
        for child_name, child in list(adapter.named_modules()):
            if type(child) is nn.Linear:
                parent, attr = get_submodule_parent(adapter, child_name)
                setattr(parent, attr, make(child))


def _rebuild_binary_layers(model: nn.Module, name: str, config: BinarizedConfig) -> None:
    """On load: the adapter's linear layers become 1-bit layers, whose bits and scales are read next."""
    _replace_linears(model, name, lambda linear: BinaryLinear.like(linear, config.per))


# The registry part that a binarized adapter's saved configs name (listed in ``methods/sparse_adapter.py``):
# it wraps no module of its own and, once the adapter's other parts are attached, makes their
# linear layers 1-bit.
BINARIZED = SimpleNamespace(
    Config=BinarizedConfig, CATEGORY="additive", MERGEABLE=True,
    PAPER="Jie et al., 2023 (arXiv:2307.16867)",
    find_targets=lambda model, config: [], after_attach=_rebuild_binary_layers,
)
