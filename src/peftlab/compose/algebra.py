"""The algebra of combining weight updates: what ``peftlab.combine`` computes, layer by layer.

Every combination here works on the updates themselves, ``ΔW_i`` of each adapter, never on their
factors one by one. HF PEFT's ``add_weighted_adapter`` weights the A and B factors separately, so
its ``linear`` over two LoRAs adds cross terms ``B_1 A_2`` that neither adapter has (peft#3004),
and its TIES/DARE prune the factors rather than the update the papers prune.

- ``linear`` (task arithmetic, Ilharco et al., 2023, arXiv:2212.04089): ``Σ w_i ΔW_i``, exactly.
  For low-rank updates ``B_i A_i`` the sum is itself low-rank: ``[w_1 B_1 … w_k B_k] [A_1; …; A_k]``
  (rank ``Σ r_i``), which is also ``cat``. A negative weight subtracts a behaviour.
- ``compress``: the best rank-k approximation of a low-rank update without forming the dense
  matrix: QR of both stacked factors, SVD of the small ``Σr x Σr`` core (Eckart-Young on the core
  is Eckart-Young on the product, the Q's being orthonormal). It reports the share of the update's
  energy (squared Frobenius norm) it dropped. This is ``svd`` at a chosen rank.
- ``ties`` (Yadav et al., 2023, arXiv:2306.01708): trim each update to its ``density`` largest
  entries by magnitude, elect each entry's sign as the sign of the weighted sum, and average only
  the weighted values that agree with it (the disjoint mean).
- ``dare_linear`` / ``dare_ties`` (Yu et al., 2023, arXiv:2311.03099): drop each entry with
  probability ``1 - density`` and rescale the survivors by ``1 / density``, which keeps the
  expectation; then sum, or elect signs as TIES does. Deterministic for a ``seed``.
- ``magnitude_prune``: each update keeps exactly its ``⌊density · n⌋`` largest entries; then sum.

The pruning combinations are defined entry by entry, so they take dense updates (one layer's
``out x in`` matrix at a time); ``compress`` and ``factorize`` turn results back into low rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass
class LowRank:
    """An update ``ΔW = B @ A`` (``B``: out x r, ``A``: r x in), the form a LoRA file stores."""

    B: torch.Tensor
    A: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        return self.B @ self.A


def linear(updates: list[LowRank], weights: list[float]) -> LowRank:
    """``Σ w_i ΔW_i`` as one low-rank update of rank ``Σ r_i`` (exact: the factors are stacked)."""
    _check(updates, weights, [u.shape for u in updates])
    return LowRank(torch.cat([w * u.B for u, w in zip(updates, weights)], dim=1),
                   torch.cat([u.A for u in updates], dim=0))


def compress(update: LowRank, rank: int | None = None, tolerance: float | None = None) -> tuple[LowRank, float]:
    """``update`` at rank ``rank`` (default: its numerical rank: directions below ``tolerance`` times
    the largest singular value dropped, by default the dtype's epsilon times the larger side, the
    threshold LAPACK-based rank tests use), as the best approximation of that rank; and the share
    of the update's energy dropped. The result's factors share the singular values evenly (``√σ`` each)."""
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    q_b, r_b = torch.linalg.qr(update.B)
    q_a, r_a = torch.linalg.qr(update.A.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    energy = float((s ** 2).sum())
    if tolerance is None:
        tolerance = torch.finfo(s.dtype).eps * max(update.shape)
    real = int((s > tolerance * s[0]).sum()) if energy > 0 else 0
    keep = max(1, min(rank, real) if rank is not None else real)  # a file needs rank >= 1, even for a zero update
    root = s[:keep].sqrt()
    dropped = float((s[keep:] ** 2).sum()) / energy if energy > 0 else 0.0
    return LowRank(q_b @ (u[:, :keep] * root), (root[:, None] * vh[:keep]) @ q_a.T), dropped


def factorize(delta: torch.Tensor, rank: int | None = None, tolerance: float | None = None) -> tuple[LowRank, float]:
    """A dense update as low rank (truncated SVD), with the share of its energy dropped."""
    eye = torch.eye(delta.shape[1], dtype=delta.dtype, device=delta.device)
    return compress(LowRank(delta, eye), rank, tolerance)


def ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-merging: trim to ``density``, elect signs, disjoint mean of the agreeing weighted values."""
    _check_density(density)
    _check(deltas, weights, [d.shape for d in deltas])
    trimmed = [_top(d, density) for d in deltas]
    return _elect_and_average(torch.stack([w * d for d, w in zip(trimmed, weights)]))


def dare_linear(deltas: list[torch.Tensor], weights: list[float], density: float, seed: int = 0) -> torch.Tensor:
    """DARE: drop and rescale each update, then the weighted sum."""
    _check(deltas, weights, [d.shape for d in deltas])
    return sum(w * d for d, w in zip(_drop_and_rescale(deltas, density, seed), weights))


def dare_ties(deltas: list[torch.Tensor], weights: list[float], density: float, seed: int = 0) -> torch.Tensor:
    """DARE's drop and rescale, then TIES's sign election and disjoint mean."""
    _check(deltas, weights, [d.shape for d in deltas])
    dropped = _drop_and_rescale(deltas, density, seed)
    return _elect_and_average(torch.stack([w * d for d, w in zip(dropped, weights)]))


def magnitude_prune(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Each update pruned to exactly its ``⌊density · n⌋`` largest entries, then the weighted sum."""
    _check_density(density)
    _check(deltas, weights, [d.shape for d in deltas])
    return sum(w * _top(d, density) for d, w in zip(deltas, weights))


# ---- helpers ---------------------------------------------------------------------------------

def _top(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``⌊density · n⌋`` largest-magnitude entries zeroed (ties broken by
    position, so the count is exact)."""
    keep = math.floor(density * delta.numel())
    if keep >= delta.numel():
        return delta.clone()
    flat = torch.zeros_like(delta).flatten()
    if keep > 0:
        index = delta.abs().flatten().topk(keep).indices
        flat[index] = delta.flatten()[index]
    return flat.view_as(delta)


def _elect_and_average(weighted: torch.Tensor) -> torch.Tensor:
    """TIES's election over stacked weighted updates: each entry's sign is that of their sum; the
    result is the mean of the values with that sign (zero where none has it)."""
    sign = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == sign) & (weighted != 0)
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def _drop_and_rescale(deltas: list[torch.Tensor], density: float, seed: int) -> list[torch.Tensor]:
    _check_density(density)
    generator = torch.Generator().manual_seed(seed)
    kept = []
    for d in deltas:
        mask = torch.rand(d.shape, generator=generator) < density
        kept.append(d * mask.to(d.device, d.dtype) / density)
    return kept


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density must be in (0, 1] (the share of each update's entries kept), got {density!r}")


def _check(items: list, weights: list, shapes: list) -> None:
    if not items:
        raise ConfigError("nothing to combine: give at least one update")
    if len(weights) != len(items):
        raise ConfigError(f"{len(items)} updates but {len(weights)} weights; give one weight per update")
    if len(set(tuple(s) for s in shapes)) > 1:
        raise ConfigError(f"the updates' shapes differ ({sorted(set(tuple(s) for s in shapes))}); only updates of the "
                          "same layer combine")
