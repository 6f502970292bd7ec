"""AdaMSS: adaptive multi-subspace fine-tuning (Zheng et al., NeurIPS 2025, "AdaMSS: Adaptive
Multi-Subspace Approach for Parameter-Efficient Fine-Tuning"; HF PEFT's ``ADAMSS``, which follows the
authors' ``adamss_pkg`` code).

LoRA-like methods train one low-rank update in one big subspace of a layer's weights. AdaMSS splits
the weight's top singular space into several small subspaces, trains a tiny low-rank update in each,
and (with ASA) keeps training only the subspaces that matter for the task, for far fewer parameters.

A frozen linear layer, its bias taken as one more input column ``W~ = [W | b]`` (out x in+1),
is split into subspaces from its own singular vectors:

1. a rank-``R`` SVD ``W~ ~ U S V^T`` (``R = min(r, out, in+1)``; ``torch.svd_lowrank``, 2 power
   iterations, its random projection seeded with ``random_seed``);
2. the output rows are clustered by their rows of ``U`` (K-means into ``K = num_subspaces``
   groups, scikit-learn's, with PEFT's fixed settings), so rows that load on the same singular
   directions share a subspace;
3. subspace ``k`` (rows ``I_k``) trains a rank-``r_k`` pair ``B_k`` (|I_k| x r_k) and ``A_k``
   (r_k x R) acting on the input's coordinates in the frozen basis ``V^T`` (R x in+1)::

       delta W~[I_k] = B_k A_k V^T,     r_k = min(|I_k|, subspace_rank)

   so the update of each group of rows is a low-rank map inside the top-``R`` right singular
   space. ``A_k`` starts as the top ``r_k`` principal directions of the group's rows of ``U``
   (orthonormal rows) and ``B_k`` at zero: the model is the base model at step 0. With
   ``use_dynamic_rank``, ``r_k`` also stops at the number of squared singular values of
   ``U[I_k]`` above ``svd_threshold`` x the largest.

The update is linear in the input, per row, and merges into ``W`` and ``b``. ASA (adaptive
subspace allocation, ``use_asa``) prunes subspaces during training: from step ``init_warmup`` to
``final_warmup`` every step smooths each parameter's sensitivity ``|p * grad|`` and its
uncertainty (exponential averages with ``asa_importance_beta`` / ``asa_uncertainty_beta``); every
``mask_interval`` steps the subspaces of all layers are ranked by ``mean(I_A U_A) + mean(I_B U_B)``,
only the budget's best keep training (the others are frozen, keeping their values), and the
averages restart. The budget falls from all subspaces to ``asa_target_subspaces`` as
``T + (total - T) (1 - progress)^asa_schedule_exponent``. It runs in the ``after_step`` hook
(``peftlab.train`` calls it after each optimizer step).

Reads and writes HF PEFT's ``ADAMSS`` format exactly (``formats/hf_adamss.py``): the file holds
``A_k``, ``B_k`` and ``V^T``; the row groups are not saved, so both libraries recompute them from
the base weight with the same seeded SVD and K-means (a file only loads on the base it was trained
on, as in PEFT). Differences from HF PEFT: ``init=random`` is PEFT's ``init_weights=None``; ``A_k``'s
start, and the singular values ``use_dynamic_rank`` counts, are computed exactly (PEFT approximates
them with a rank-``r_k`` randomized SVD of ``U_k U_k^T``, 2 power iterations, which finds the top
directions only roughly when the group's singular values are close, and varies with the global random
state; the saved values are what counts, so files move exactly both ways); ASA keeps the best ``asa_target_subspaces`` (PEFT's strict threshold at the target's score keeps one fewer);
``subspace_rank`` is capped at ``R`` too (PEFT fails there); ``targets`` defaults to peftlab's
``all-linear``. ``nn.Linear`` only, as in PEFT. Needs scikit-learn (for K-means), as PEFT does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core import adapters as core
from ..core.config import MethodConfig
from ..errors import ConfigError
from .bitfit import feature_dtype, shift_bias
from .lora import base_weight, set_base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear only, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Zheng et al., 2025 (NeurIPS 2025, AdaMSS)"
MERGEABLE = True
# The authors' GLUE script (github.com/jzheng20/AdaMSS, NLU_GLUE_adamss.py) trains the subspaces at 1e-3
# (the head at 5e-2) for 100 epochs; PEFT's MetaMathQA benchmark config uses 1e-4 for 5000 steps. With
# subspace_rank 1 very few weights train, and in 12 steps 1e-3 moves the tiny BERT's loss by 0.2% (5e-3:
# 1.5%), so 1e-2, 10x the paper's rate for a short budget; the lead's SST-2 run should settle it.
DEFAULT_LR = 1e-2
INVALID_SETTINGS = ("r=0", "num_subspaces=0", "subspace_rank=0", "init=ones", "svd_threshold=2",
                    "use_asa=true,init_warmup=10,final_warmup=5", "use_asa=true,mask_interval=0")
EXAMPLE_SETTINGS = "r=16,num_subspaces=3,subspace_rank=2"  # a few subspaces of a hidden-32 layer
INITS = ("orthogonal", "random")
KMEANS = dict(init="random", n_init=1, max_iter=10, random_state=123456789)  # PEFT's, so both cluster alike


@dataclass
class AdamssConfig(MethodConfig):
    """r: SVD rank R (capped per layer at min(out, in+1)); num_subspaces: K, the row groups;
    subspace_rank: each group's rank; random_seed: seed of the randomized SVD; use_dynamic_rank /
    svd_threshold: a group's rank also stops at its significant singular values; init: orthogonal
    (B = 0: the base at step 0) or random (B small random); use_asa and asa_* / init_warmup /
    final_warmup / mask_interval: adaptive subspace allocation during training."""

    method: ClassVar[str] = "adamss"
    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    random_seed: int = 0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    init: str = "orthogonal"
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0

    def validate(self) -> None:
        super().validate()
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        for key in ("r", "num_subspaces", "subspace_rank"):
            if not positive(getattr(self, key)):
                raise ConfigError(f"adamss: {key} must be a positive integer, got {getattr(self, key)!r}")
        if not (isinstance(self.random_seed, int) and not isinstance(self.random_seed, bool)):
            raise ConfigError(f"adamss: random_seed must be an integer, got {self.random_seed!r}")
        if not (isinstance(self.svd_threshold, (int, float)) and 0 <= self.svd_threshold < 1):
            raise ConfigError(f"adamss: svd_threshold is a fraction of the largest singular value in [0, 1), "
                              f"got {self.svd_threshold!r}")
        if self.init not in INITS:
            raise ConfigError(f"adamss: init must be orthogonal (B = 0, the base at step 0) or random, got {self.init!r}")
        for key in ("asa_importance_beta", "asa_uncertainty_beta"):
            if not (isinstance(getattr(self, key), (int, float)) and 0 <= getattr(self, key) < 1):
                raise ConfigError(f"adamss: {key} must be in [0, 1), got {getattr(self, key)!r}")
        if self.use_asa:
            if not positive(self.mask_interval):
                raise ConfigError(f"adamss: mask_interval must be a positive integer with use_asa, got {self.mask_interval!r}")
            if not (isinstance(self.init_warmup, int) and isinstance(self.final_warmup, int)
                    and 0 <= self.init_warmup < self.final_warmup):
                raise ConfigError(f"adamss: use_asa needs 0 <= init_warmup < final_warmup (the pruning ramp), got "
                                  f"init_warmup={self.init_warmup!r}, final_warmup={self.final_warmup!r}")
            if not positive(self.asa_target_subspaces):
                raise ConfigError("adamss: asa_target_subspaces must be a positive integer with use_asa, got "
                                  f"{self.asa_target_subspaces!r}")
            if not (isinstance(self.asa_schedule_exponent, (int, float)) and self.asa_schedule_exponent > 0):
                raise ConfigError(f"adamss: asa_schedule_exponent must be positive, got {self.asa_schedule_exponent!r}")


# ---- pure math -------------------------------------------------------------------------------

def augmented_weight(base: nn.Module) -> torch.Tensor:
    """``[W | b]`` (out x in+1) in float32, or ``W`` for a layer without a bias."""
    W = base_weight(base).float()
    bias = getattr(base, "bias", None)
    return W if bias is None else torch.cat([W, bias.detach().float()[:, None]], dim=1)


def seeded_svd(W: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V^T)`` of a rank-``rank`` randomized SVD of ``W`` (2 power iterations), its random
    projection drawn after seeding with ``seed`` on ``W``'s device; the global random state is kept."""
    devices = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
    with torch.random.fork_rng(**devices):
        torch.manual_seed(seed)
        U, _, V = torch.svd_lowrank(W, q=rank, niter=2)
    return U[:, :rank], V[:, :rank].T


def cluster_rows(U: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Row indices of each of the ``min(k, rows)`` K-means groups of ``U``'s rows, by group label."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ConfigError("adamss: clustering the singular vectors needs scikit-learn (pip install scikit-learn)") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few distinct rows for k groups: K-means says so, the groups stand
        labels = torch.from_numpy(KMeans(n_clusters=min(k, U.shape[0]), **KMEANS)
                                  .fit_predict(U.detach().cpu().numpy().astype("float32"))).long()
    return [torch.where(labels == i)[0] for i in range(int(labels.max()) + 1)]


def group_rank(U_k: torch.Tensor, subspace_rank: int, dynamic: bool, threshold: float) -> int:
    """``r_k``: ``min(|I_k|, subspace_rank, R)``, and with ``dynamic`` at most the count of the
    group's squared singular values above ``threshold`` x the largest (at least 1)."""
    rank = min(U_k.shape[0], subspace_rank, U_k.shape[1])
    if dynamic:
        energy = torch.linalg.svdvals(U_k.double()) ** 2
        rank = min(rank, int((energy > threshold * energy[0]).sum()))
    return max(rank, 1)


def principal_directions(U_k: torch.Tensor, rank: int) -> torch.Tensor:
    """(rank x R): the top ``rank`` right singular vectors of the group's rows of ``U``."""
    return torch.linalg.svd(U_k.double(), full_matrices=False)[2][:rank].float()


def delta_augmented(A: list, B: list, newB: torch.Tensor, order: torch.Tensor, out_features: int) -> torch.Tensor:
    """``delta W~`` (out x in+1): group ``k``'s rows ``B_k A_k V^T``, placed at its row indices."""
    rows = torch.cat([b @ a for a, b in zip(A, B)]) @ newB.to(A[0].dtype)
    return rows.new_zeros(out_features, newB.shape[1]).index_copy(0, order, rows)


# ---- module ----------------------------------------------------------------------------------

class AdamssLinear(nn.Module):
    """AdaMSS for ``nn.Linear``: returns ``delta W x + delta b``, group by group."""

    def __init__(self, base: nn.Module, config: AdamssConfig):
        super().__init__()
        W = augmented_weight(base)
        self.out_features, self.in_features = base_weight(base).shape
        self.has_bias = getattr(base, "bias", None) is not None
        rank = min(config.r, *W.shape)
        meta = W.device.type == "meta"
        if meta:  # a shape-only model (parameter counts): even groups stand in for K-means
            U, VT = torch.zeros(W.shape[0], rank), torch.zeros(rank, W.shape[1])
            groups = list(torch.arange(W.shape[0]).chunk(min(config.num_subspaces, W.shape[0])))
        else:
            U, VT = seeded_svd(W, rank, config.random_seed)
            groups = cluster_rows(U, config.num_subspaces)
        dtype, device = feature_dtype(base), base.weight.device
        self.register_buffer("adamss_newB", VT.to(device, dtype))
        order = torch.cat(groups).to(device)
        self.register_buffer("order", order, persistent=False)  # the groups' rows, one group after another
        self.register_buffer("inverse", torch.argsort(order), persistent=False)
        A, B = [], []
        for rows in groups:
            U_k = U[rows.to(U.device)]
            if meta:
                r_k = min(len(rows), config.subspace_rank, rank)
                A.append(nn.Parameter(torch.empty(r_k, rank, device=device, dtype=dtype)))
            else:
                r_k = group_rank(U_k, config.subspace_rank, config.use_dynamic_rank, config.svd_threshold)
                A.append(nn.Parameter(principal_directions(U_k, r_k).to(device, dtype)))
            start = torch.zeros(len(rows), r_k) if config.init == "orthogonal" else torch.randn(len(rows), r_k) * 0.01
            B.append(nn.Parameter(start.to(device, dtype)))
        self.adamss_A, self.adamss_B = nn.ParameterList(A), nn.ParameterList(B)
        self.sizes = [len(rows) for rows in groups]
        self.importance: dict = {}  # ASA's running averages, by parameter

    @property
    def num_subspaces(self) -> int:
        return len(self.adamss_A)

    def deltas(self):
        """(delta W, delta b or None)."""
        delta = delta_augmented(list(self.adamss_A), list(self.adamss_B), self.adamss_newB, self.order, self.out_features)
        return (delta[:, :-1], delta[:, -1]) if self.has_bias else (delta, None)

    def forward(self, x, base_out):
        newB = self.adamss_newB
        x = x.to(newB.dtype)
        projected = F.linear(x, newB[:, :self.in_features], newB[:, -1] if self.has_bias else None)  # (..., R)
        parts = [F.linear(F.linear(projected, a), b) for a, b in zip(self.adamss_A, self.adamss_B)]
        return torch.cat(parts, dim=-1)[..., self.inverse]

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            dW, db = self.deltas()
            set_base_weight(base, base_weight(base) + dW.to(base_weight(base).dtype))
            if db is not None:
                shift_bias(base, db.to(base.bias.dtype))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            dW, db = self.deltas()
            set_base_weight(base, base_weight(base) - dW.to(base_weight(base).dtype))
            if db is not None:
                shift_bias(base, -db.to(base.bias.dtype))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""

    # ASA: importance of each subspace (called by the after_step hook, without gradients)

    def update_importance(self, beta: float, uncertainty_beta: float) -> None:
        for p in (*self.adamss_A, *self.adamss_B):
            if p.grad is None:
                continue
            smoothed, uncertainty = self.importance.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
            sensitivity = (p * p.grad).abs()
            uncertainty.mul_(uncertainty_beta).add_((sensitivity - smoothed).abs(), alpha=1 - uncertainty_beta)
            smoothed.mul_(beta).add_(sensitivity, alpha=1 - beta)

    def subspace_scores(self) -> list:
        """``(k, score)`` of each subspace with averages on both A_k and B_k."""
        scores = []
        for k, (a, b) in enumerate(zip(self.adamss_A, self.adamss_B)):
            if id(a) in self.importance and id(b) in self.importance:
                score = sum((s * u).mean() for s, u in (self.importance[id(a)], self.importance[id(b)]))
                scores.append((k, float(score)))
        return scores


# ---- method protocol -------------------------------------------------------------------------

Config = AdamssConfig


def make_adapter(module: nn.Module, config: AdamssConfig, name: str) -> nn.Module:
    refuse_non_linear("adamss", module, name)
    return AdamssLinear(module, config)


# ---- training hook: adaptive subspace allocation ---------------------------------------------

def budget_at(step: int, total: int, config: AdamssConfig) -> int:
    """Subspaces kept at ``step``: ``T + (total - T) (1 - progress)^exponent``, ``T`` from ``final_warmup`` on."""
    if step >= config.final_warmup:
        return config.asa_target_subspaces
    progress = (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
    left = min(1.0, max(0.0, 1.0 - progress))
    return int(config.asa_target_subspaces + (total - config.asa_target_subspaces) * left ** config.asa_schedule_exponent)


def after_step(model: nn.Module, name: str, config: AdamssConfig, step: int, total_steps: int) -> None:
    """ASA: smooth the importances inside the warmup window and, every ``mask_interval`` steps,
    freeze all but the best subspaces across layers (then restart the averages)."""
    if not config.use_asa or not config.init_warmup <= step <= config.final_warmup:
        return
    layers = [module for _, module in core.method_adapters(model, name, "adamss")]
    with torch.no_grad():
        for layer in layers:
            layer.update_importance(config.asa_importance_beta, config.asa_uncertainty_beta)
        if step % config.mask_interval:
            return
        scored = [(layer, k, score) for layer in layers for k, score in layer.subspace_scores()]
        keep = budget_at(step, sum(layer.num_subspaces for layer in layers), config)
        ranked = sorted(range(len(scored)), key=lambda i: -scored[i][2])
        kept = set(ranked[:keep])
        for i, (layer, k, _) in enumerate(scored):
            for p in (layer.adamss_A[k], layer.adamss_B[k]):
                p.requires_grad_(i in kept)
                if i not in kept:
                    p.grad = None
        for layer in layers:
            layer.importance.clear()


def active_subspaces(model: nn.Module, name: str = "default") -> dict:
    """``{module name: number of subspaces still training}`` of adapter ``name`` (ASA's result)."""
    return {module_name: sum(bool(a.requires_grad) for a in module.adamss_A)
            for module_name, module in core.method_adapters(model, name, "adamss")}
