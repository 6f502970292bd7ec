"""``combine(..., space="factor")``: HF PEFT's ``add_weighted_adapter``, reproduced on plain LoRA.

Users moving from HF PEFT may want its numbers, not ours (``space="update"``, the default, combines
the adapters' true updates; see ``combining.py``). This module recomputes what
``LoraModel.add_weighted_adapter`` (peft 0.21) computes, layer by layer, from the same factors:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the A factors
  and the B factors *separately*, each adapter's weight split as ``√|w s|`` on both (its sign on A),
  ``s`` the adapter's own LoRA scale. So ``linear`` over two adapters is
  ``(Σ √|w_i s_i| B_i)(Σ ±√|w_i s_i| A_i)``, cross terms ``B_1 A_2`` included (peft#3004), and the
  pruning acts on factor entries. Every adapter needs the same rank at a layer (the factors are
  stacked entry by entry).
- ``cat``: ``A`` rows ``w_i s_i A_i`` and ``B`` columns ``B_i`` stacked: exactly ``Σ w_i ΔW_i``.
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the dense
  ``ΔW_i = s_i B_i A_i`` combined (plain weights), then a full ``torch.linalg.svd`` of the result,
  truncated to ``rank`` (default: the largest input rank ``r`` of any adapter's config, as HF
  takes it), with ``B = U_k S_k`` and ``A = V_k^T``.
- With a single adapter HF always runs ``linear``; so does this.

The TIES here is HF's, which differs from the paper's and from ``algebra.ties``: the sign is elected
from the *unweighted* trimmed inputs (``total`` sum, ties going to +), then the weighted inputs that
agree are averaged (Yadav et al., 2023, arXiv:2306.01708). DARE (Yu et al., 2023, arXiv:2311.03099)
draws each keep mask with ``torch.bernoulli(density)`` from one generator seeded with ``seed``, in
HF's order: layers in model order; within a layer, each adapter's A, then each adapter's B (or each
dense update for the ``_svd`` types). HF draws from the global RNG after initializing the new
adapter, so its DARE numbers equal these when its global RNG is seeded with ``seed`` at that point
(the twin test does exactly that). A ``density`` of 1 prunes nothing and draws nothing, as in HF.

What is not reproduced: HF's result inherits the first adapter's rsLoRA setting (so its effective
update is ``√r`` times its factors when that adapter uses rsLoRA, peft#3761); here the factors are
HF's and the scale is 1. HF's ``svd_clamp`` and ``majority_sign_method="frequency"`` options are
not offered.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from . import algebra
from .algebra import LowRank

STACKED = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A and B combined separately
DENSE = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # ΔW combined, then SVD
METHODS = ("svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
           "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
PRUNING = ("ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd", "magnitude_prune",
           "magnitude_prune_svd")


@dataclass
class Factors:
    """One plain LoRA at one layer as HF PEFT holds it: ``ΔW = scale * B @ A``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


def combine_factors(model: nn.Module, adapters: list[str], weights: list[float], method: str, density, rank,
                    seed: int) -> tuple[dict, dict]:
    """The combined factors (``LowRank``, scale 1) at each layer, in model order, and the share of
    each layer's energy an SVD truncation dropped (0 for the other types)."""
    from ..core.adapters import adapter_layers

    layers = {}
    for module_name, layer in adapter_layers(model):
        held = [lora_factors(module_name, layer, a) if a in layer.adapters else None for a in adapters]
        if any(f is not None for f in held):
            layers[module_name] = held
    if not layers:
        raise ConfigError(f"the adapters {adapters} adapt no linear layer; combine merges weight updates")
    if len(adapters) == 1:
        method = "linear"  # HF PEFT's rule for a single adapter
    if method in DENSE and rank is None:
        rank = max(config_rank(model, a) for a in adapters)
    first = next(f for held in layers.values() for f in held if f is not None)
    generator = torch.Generator(device=first.A.device).manual_seed(seed)
    combined, dropped = {}, {}
    for module_name, held in layers.items():
        combined[module_name], dropped[module_name] = combine_layer(module_name, held, weights, method, density, rank,
                                                                    generator)
    return combined, dropped


def combine_layer(module_name: str, held: list, weights: list[float], method: str, density, rank: int | None,
                  generator: torch.Generator) -> tuple[LowRank, float]:
    present = [(f, w) for f, w in zip(held, weights) if f is not None]
    if method == "cat":
        return LowRank(torch.cat([f.B for f, _ in present], dim=1),
                       torch.cat([f.A * w * f.scale for f, w in present], dim=0)), 0.0
    if method in STACKED:
        ranks = sorted({f.A.shape[0] for f, _ in present})
        if len(ranks) > 1:
            raise ConfigError(f"space='factor' {method} combines the factors entry by entry, so every adapter needs the same "
                              f"rank at a layer, but {module_name} has ranks {ranks}; use cat or svd, or space='update'")
        split = [math.sqrt(abs(w * f.scale)) for f, w in present]
        signs = [1.0 if w * f.scale >= 0 else -1.0 for f, w in present]
        A = merge(method, [f.A for f, _ in present], [s * v for s, v in zip(signs, split)], density, generator)
        B = merge(method, [f.B for f, _ in present], split, density, generator)
        return LowRank(B, A), 0.0
    deltas = [(f.B @ f.A) * f.scale for f, _ in present]
    combination = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = merge(combination, deltas, [w for _, w in present], density, generator)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, S.shape[0])
    energy = float((S ** 2).sum())
    dropped = float((S[keep:] ** 2).sum()) / energy if energy > 0 else 0.0
    return LowRank(U[:, :keep] * S[:keep], Vh[:keep].clone()), dropped


def merge(method: str, tensors: list[torch.Tensor], weights: list[float], density, generator) -> torch.Tensor:
    """HF PEFT's ``merge_utils`` combinations on equally shaped tensors (weights in the tensors' dtype)."""
    w = torch.tensor(weights, dtype=tensors[0].dtype, device=tensors[0].device).view(-1, *[1] * tensors[0].dim())
    if method in ("ties", "magnitude_prune"):
        tensors = [algebra._top(t, density) for t in tensors]  # the exact top ⌊density·n⌋ by magnitude
    elif method in ("dare_linear", "dare_ties"):
        tensors = [drop_and_rescale(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    if method in ("ties", "dare_ties"):
        majority = torch.where(stacked.sum(dim=0) >= 0, 1.0, -1.0)
        agree = stacked.sign() == majority
        return (stacked * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)
    return (stacked * w).sum(dim=0)


def drop_and_rescale(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop: keep each entry with probability ``density`` and rescale by ``1 / density``."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def lora_factors(module_name: str, layer: nn.Module, name: str) -> Factors:
    from ..methods.lora import LoraLinear, scaling

    adapter = layer.adapters[name]
    if type(adapter) is not LoraLinear:
        raise ConfigError(f"space='factor' reproduces HF PEFT's add_weighted_adapter, which combines plain LoRA factors, but "
                          f"adapter {name!r} is {type(adapter).__name__} at {module_name}; use space='update'")
    with torch.no_grad():
        tensors, r, alpha = adapter.hf_state()  # PiSSA as the plain LoRA it is saved as
        if "lora_B.bias" in tensors:
            raise ConfigError(f"adapter {name!r} has a lora_B bias (lora_bias=true) at {module_name}; add_weighted_adapter's "
                              "factor sums have no place for it: merge it into the base instead")
        return Factors(tensors["lora_A.weight"].clone(), tensors["lora_B.weight"].clone(), scaling(alpha, r, adapter.rslora))


def config_rank(model: nn.Module, name: str) -> int:
    """An adapter's rank as HF PEFT reads it from its config: the largest of ``r`` and its rank pattern."""
    from ..core.state import require_state

    config = require_state(model).configs[name]
    return max(config.r, *getattr(config, "rank_pattern", {}).values())
