"""``peftlab.combine``: several adapters into one plain LoRA, computed on their true weight updates.

Each input adapter's update at a layer is read through its method's own math: a LoRA's
``s B A`` with its own scale (rsLoRA's ``alpha / sqrt(r)`` included; PiSSA as the plain LoRA it is
saved as), the low-rank variants' effective factors, DoRA's effective update
``m (W + sBA) / ||W + sBA|| - W`` (not low-rank), (IA)^3's rescaled rows or columns of ``W``
(where the layer has no bias for it to rescale), ``delta_weight()`` of the other
weight-update methods (KronA, LoKr, HRA, ...), and for a method that only says how it merges (OFT,
BOFT, RoAd, AdaMSS) the merged copy of the layer minus the layer; AdaLoRA's ``P diag(λ) Q`` with its own ``alpha / ranknum`` is
read as the low-rank product it is, its masked triplets left out. The combination (``algebra.py``) runs layer by layer,
and the result is attached as a plain LoRA whose scale is 1 (``alpha = r`` per layer, through
``rank_pattern`` / ``alpha_pattern``), so it saves as an ordinary HF PEFT LoRA that
``peft.PeftModel.from_pretrained`` (and vLLM) load. Nothing is inherited from the first input:
HF PEFT's result keeps the first adapter's rsLoRA/DoRA settings, so one adapter merged at weight
1.0 does not give it back there (peft#3761); here it does (a test).

Methods (``weights`` default to 1 each):

- ``linear``: ``Σ w_i ΔW_i`` exactly, at its true rank (at most ``Σ r_i``), or truncated to ``rank``.
- ``cat``: the same sum as the stacked factors, rank ``Σ r_i``, with no rank reduction at all.
- ``svd``: the sum's best approximation of rank ``rank`` (default: the largest input rank).
- ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: pruned entry by entry on each
  dense ``ΔW_i`` (``density`` required), then factorized, exactly unless ``rank`` is given.

Wherever a rank is imposed, ``Combined.energy_dropped`` holds the share of each layer's update
energy that the truncation dropped. A layer some inputs do not adapt counts as a zero update for
them.

``space="factor"`` instead reproduces HF PEFT's ``add_weighted_adapter`` numbers on plain LoRA
adapters, for every combination type it has (``factor_space.py``: its ``linear`` and pruning types
combine the A and B factors separately; its ``_svd`` types take a full SVD of the dense result).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError
from . import algebra, factor_space
from .algebra import LowRank

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = {"ties": algebra.ties, "dare_linear": algebra.dare_linear, "dare_ties": algebra.dare_ties,
           "magnitude_prune": algebra.magnitude_prune}
SPACES = ("update", "factor")


@dataclass
class Combined:
    """What ``combine`` made: the new adapter's ``name``, its rank per layer, and the share of each
    layer's update energy a rank limit dropped (0 where nothing was dropped)."""

    name: str
    method: str
    ranks: dict = field(default_factory=dict)
    energy_dropped: dict = field(default_factory=dict)

    @property
    def max_energy_dropped(self) -> float:
        return max(self.energy_dropped.values(), default=0.0)


def combine(model: nn.Module, adapters: list[str], weights: list[float] | None = None, method: str = "linear",
            density: float | None = None, rank: int | None = None, seed: int = 0, name: str = "combined",
            space: str = "update") -> Combined:
    """Combine the adapters named ``adapters`` (attached to ``model``) into a new plain LoRA adapter
    ``name`` on the same model, made active. See the module docstring for the methods and spaces."""
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    check_arguments(model, adapters, weights, method, density, rank, name, space)
    if space == "factor":
        factors, dropped = factor_space.combine_factors(model, adapters, weights, method, density, rank, seed)
    else:
        factors, dropped = combine_updates(model, adapters, weights, method, density, rank, seed)
    result = Combined(name, method, energy_dropped=dropped)
    result.ranks = attach_lowrank(model, factors, name)
    return result


def attach_lowrank(model: nn.Module, factors: dict, name: str) -> dict:
    """Attach ``factors`` (module name -> ``LowRank``) to ``model`` as a plain LoRA ``name`` whose
    scale is 1 at every layer (``alpha = r`` through ``rank_pattern`` / ``alpha_pattern``), made
    active and frozen; it saves as an ordinary HF PEFT LoRA. Returns the rank per layer."""
    import peftlab
    from ..methods.lora import LoraConfig

    ranks = {module_name: update.rank for module_name, update in factors.items()}
    config = LoraConfig(r=max(ranks.values()), alpha=max(ranks.values()), targets=sorted(ranks),
                        rank_pattern=dict(ranks), alpha_pattern={k: float(v) for k, v in ranks.items()})
    peftlab.attach(model, config, name=name)
    with torch.no_grad():
        for module_name, update in factors.items():
            adapter = model.get_submodule(module_name).adapters[name]
            adapter.lora_A.weight.copy_(update.A)
            adapter.lora_B.weight.copy_(update.B)
    peftlab.set_active(model, name)
    for p in (p for n, p in model.named_parameters() if f".{name}." in n):
        p.requires_grad_(False)  # a result, not something to train by accident
    return ranks


def combine_updates(model: nn.Module, adapters: list[str], weights: list[float], method: str, density, rank,
                    seed: int) -> tuple[dict, dict]:
    """``space="update"``: each layer's combined update (low rank) and the energy a rank limit dropped."""
    layers = {}  # module name -> [update of each input, or None]
    for i, adapter_name in enumerate(adapters):
        for module_name, update in updates_of(model, adapter_name).items():
            layers.setdefault(module_name, [None] * len(adapters))[i] = update
    if not layers:
        raise ConfigError(f"the adapters {adapters} adapt no linear layer; combine merges weight updates")
    factors, dropped = {}, {}
    for index, (module_name, updates) in enumerate(sorted(layers.items())):
        factors[module_name], dropped[module_name] = combine_layer(updates, weights, method, density, rank, seed + index)
    return factors, dropped


def combine_layer(updates: list, weights: list[float], method: str, density, rank, seed: int) -> tuple[LowRank, float]:
    """One layer's combined update (as low rank) and the share of its energy a rank limit dropped."""
    present = [(u, w) for u, w in zip(updates, weights) if u is not None]
    if method in PRUNING:
        shape = next(_shape(u) for u, _ in present)
        dense = [_dense(u) if u is not None else None for u in updates]
        dense = [d if d is not None else torch.zeros(shape, dtype=_dtype(present)) for d in dense]
        prune = PRUNING[method]
        merged = prune(dense, weights, density, seed) if method.startswith("dare") else prune(dense, weights, density)
        return algebra.factorize(merged, rank)
    if all(isinstance(u, LowRank) for u, _ in present):
        summed = algebra.linear([u for u, _ in present], [w for _, w in present])
        if method == "cat":
            return summed, 0.0
        if method == "svd":
            return algebra.compress(summed, rank or max(u.rank for u, _ in present))
        return algebra.compress(summed, rank)
    # a dense update among them (DoRA's): the sum is dense
    merged = sum(w * _dense(u) for u, w in present)
    if method == "cat":
        raise ConfigError("cat stacks LoRA factors, but a DoRA (or another dense) update has none; use linear or svd")
    return algebra.factorize(merged, rank or (max(_rank(u) for u, _ in present) if method == "svd" else None))


def updates_of(model: nn.Module, name: str) -> dict:
    """Adapter ``name``'s update at each layer it adapts: ``LowRank`` where the method's update is a
    low-rank product, else a dense (out x in) tensor."""
    from ..core.adapters import adapter_layers

    found = {}
    for module_name, layer in adapter_layers(model, name):
        found[module_name] = layer_update(module_name, layer, layer.adapters[name], name)
    return found


def layer_update(module_name: str, layer: nn.Module, adapter: nn.Module, name: str):
    from ..methods.adalora import AdaLoraLinear
    from ..methods.dora import DoraLinear, weight_norm
    from ..methods.ia3 import IA3Linear
    from ..methods.lora import LoraLinear, base_weight, scaling
    from ..methods.lowrank import FactoredUpdate

    base = layer.base_layer
    if isinstance(base, nn.Embedding) or not hasattr(base, "weight"):
        raise ConfigError(f"adapter {name!r} adapts {module_name} ({type(base).__name__}); combine merges updates of "
                          "linear layers only: leave that module out of the adapters' targets")
    with torch.no_grad():
        if isinstance(adapter, DoraLinear):  # m (W + sBA) / ||W + sBA|| - W, per output row
            W = base_weight(base)
            moved = W + adapter.delta_weight()
            return moved * (adapter.lora_magnitude_vector / weight_norm(W, adapter.delta_weight()))[:, None] - W
        if isinstance(adapter, IA3Linear):  # W diag(l) - W (input scaling), or diag(l) W - W (output)
            W, scale = base_weight(base), adapter.ia3_l - 1
            if adapter.feedforward:
                return W * scale[None, :]
            if getattr(base, "bias", None) is not None and bool(base.bias.any()):
                raise ConfigError(f"adapter {name!r} ((IA)^3) rescales the bias of {module_name} too, which a LoRA cannot "
                                  "carry; combine (IA)^3 adapters of bias-free layers only")
            return scale[:, None] * W
        if type(adapter) is LoraLinear:  # PiSSA comes out as the plain LoRA it is saved as
            tensors, r, alpha = adapter.hf_state()
            if "lora_B.bias" in tensors:
                raise ConfigError(f"adapter {name!r} has a lora_B bias (lora_bias=true) at {module_name}, which a plain LoRA "
                                  "cannot carry; merge it into the base (peftlab merge) instead of combining it")
            return LowRank(tensors["lora_B.weight"] * scaling(alpha, r, adapter.rslora), tensors["lora_A.weight"].clone())
        if isinstance(adapter, AdaLoraLinear):  # P diag(λ) Q alpha / ranknum, masked triplets (λ = 0) left out
            kept = adapter.lora_E[:, 0] != 0
            kept[0] |= not bool(kept.any())  # all masked: a zero update, still rank 1 in a file
            return LowRank(adapter.lora_B[:, kept] * adapter.scale(), (adapter.lora_A * adapter.lora_E)[kept].clone())
        if isinstance(adapter, FactoredUpdate):
            A, B, scale = adapter.factors()
            return LowRank(B * scale, A.clone())
        if hasattr(adapter, "delta_weight"):
            return adapter.delta_weight().detach().clone()
        if hasattr(adapter, "merge"):
            return merged_difference(module_name, base, adapter, name)
    raise ConfigError(f"adapter {name!r} ({type(adapter).__name__} at {module_name}) has no weight update to combine: "
                      "combine takes weight-update methods (LoRA and its variants, DoRA, AdaLoRA, KronA, ...)")


def merged_difference(module_name: str, base: nn.Module, adapter: nn.Module, name: str) -> torch.Tensor:
    """The update of a method that only says how it merges (OFT's and BOFT's rotations, RoAd, GLoRA,
    AdaMSS): merged into a copy of the layer, minus the layer's own weight. A method whose merge also
    moves the bias (GLoRA with its bias terms, SSF, BitFit) has no update a LoRA can carry."""
    from ..methods.lora import base_weight

    if base.weight.dim() != 2:
        raise ConfigError(f"adapter {name!r} adapts {module_name} ({type(base).__name__}); combine merges updates of "
                          "linear layers only: leave that module out of the adapters' targets")
    merged = copy.deepcopy(base)
    adapter.merge(merged)
    try:
        bias, moved_bias = getattr(base, "bias", None), getattr(merged, "bias", None)
        if moved_bias is not None and (bias is None or not torch.equal(bias, moved_bias)):
            raise ConfigError(f"adapter {name!r} ({type(adapter).__name__}) also changes the bias of {module_name}, which a "
                              "plain LoRA cannot carry; merge it into the base (peftlab merge) instead of combining it")
        return (base_weight(merged) - base_weight(base)).detach()
    finally:
        adapter.unmerge(merged)  # adapters that keep state while merged (a pre-merge copy) drop it


def check_arguments(model, adapters, weights, method, density, rank, name, space="update") -> None:
    from ..core.state import require_state

    if space not in SPACES:
        raise ConfigError(f"unknown space {space!r}: 'update' combines the true weight updates, 'factor' reproduces "
                          "HF PEFT's add_weighted_adapter")
    methods, pruning = (factor_space.METHODS, factor_space.PRUNING) if space == "factor" else (METHODS, tuple(PRUNING))
    if space == "update" and method in factor_space.METHODS and method not in METHODS:
        raise ConfigError(f"{method} is an HF PEFT combination type (space='factor'); in space='update' "
                          f"{method.removesuffix('_svd')} already prunes the true update, and rank= truncates it")
    if method not in methods:
        raise ConfigError(f"unknown combination method {method!r}; choose one of {', '.join(methods)}")
    if not adapters:
        raise ConfigError("nothing to combine: name at least one adapter")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
    state = require_state(model)
    state.check_known(list(adapters))
    if name in state.configs:
        raise ConfigError(f"the model already has an adapter named {name!r}; choose another name for the result")
    if method in pruning and density is None:
        raise ConfigError(f"{method} prunes each update to a share of its entries: give density (e.g. 0.2)")
    if method not in pruning and density is not None:
        raise ConfigError(f"density applies to {', '.join(pruning)}; {method} does not prune")
    if density is not None:
        algebra._check_density(density)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if method == "cat" and rank is not None:
        raise ConfigError("cat keeps every factor (rank = the sum of the inputs' ranks); use svd or linear to set a rank")
    if space == "factor" and rank is not None and method not in factor_space.DENSE:
        raise ConfigError(f"in space='factor' only the svd types take a rank (HF PEFT's svd_rank); {method} does not")


def _dense(update) -> torch.Tensor:
    return update.dense() if isinstance(update, LowRank) else update


def _shape(update) -> tuple:
    return tuple(update.shape)


def _rank(update) -> int:
    return update.rank if isinstance(update, LowRank) else min(update.shape)


def _dtype(present: list) -> torch.dtype:
    first = present[0][0]
    return first.A.dtype if isinstance(first, LowRank) else first.dtype
