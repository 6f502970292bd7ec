"""OSF: orthogonal subspace fine-tuning, from "Sculpting Subspaces: Constrained Full Fine-Tuning in
LLMs for Continual Learning" (Nayak et al., 2025, arXiv:2504.07097).

A model learning task after task forgets the earlier ones when new updates overwrite the directions
the old tasks rely on. The paper finds those directions in each weight's SVD: the top singular
directions carry what the model knows, so they are frozen, and the weight is fine-tuned only in the
orthogonal complement, without extra parameters. Per linear layer::

    W = U_h S_h V_h + U_l S_l V_l        (SVD; the top k = effective_rank directions are "high")
    W' = U_h S_h V_h + U S V             (U, S, V trained, starting at U_l, S_l, V_l)

and every gradient step keeps ``U`` orthogonal to ``U_h`` and ``V`` orthogonal to ``V_h``: the
gradients of ``U`` and ``V`` are projected onto the complements, ``dU - U_h U_h^T dU`` and
``dV - dV V_h^T V_h``. So ``U_h^T W' = S_h V_h`` (and ``W' V_h^T = U_h S_h``) stay exactly as
they were under gradient descent: the high subspace is untouched, which the tests check.
Trainable rank per layer is ``min(out, in) - k``; with the default ``k`` (half of ``min(out, in)``)
OSF trains about as many numbers as the weight has: it is constrained full fine-tuning.

Here the adapter returns ``delta W x`` with ``delta W = U S V - U_l S_l V_l`` (low rank, applied
factored, never formed), so the model is the base at init and the update merges into ``W``; the
frozen factors are recomputed from the base weight's SVD at attach (never saved). The projection
is done by an identity function whose backward projects, so the parameters' ``.grad`` is already
the projected gradient, whatever optimizer follows (an adaptive optimizer such as Adam rescales
entries afterwards, which is not exactly orthogonal; HF PEFT behaves the same way; plain SGD keeps
the property exactly). Zeroth-order training (MeZO) perturbs parameters without gradients, so
the projection does not apply to it. The paper also picks each layer's frozen rank adaptively
(from a layer-importance score); as in HF PEFT, the ranks here are set by ``effective_rank`` and
``rank_pattern`` instead.

Reads and writes HF PEFT's ``OSF`` format exactly (``formats/hf_osf.py``): ``U_low``, ``S_low``,
``V_low`` under ``osf_svd_params``; ``effective_rank`` (an integer, a fraction in (0, 1] of
``min(out, in)``, or unset for half) and ``rank_pattern`` (regexes searched in the module name,
first match wins) mean what they mean there. Differences from HF PEFT:
- unmerging works (subtracts the update again); PEFT refuses to unmerge;
- the projection sits in the backward pass, not in tensor hooks on the parameters (same gradients),
  and it always projects with ``U_h`` and ``V_h`` (kept as buffers; PEFT keeps only the one it
  cannot recover from the low factors): simpler, at the cost of that memory;
- ``init=random`` is PEFT's ``init_weights=False`` (standard-normal trained factors; not the base
  at step 0); the default ``init=svd`` is PEFT's ``init_weights=True``;
- a layer whose effective rank leaves nothing to train (``k >= min(out, in)``) is refused clearly;
- ``nn.Linear`` only (quantized linear bases included, decomposed from the dequantized weight);
  GPT-2's ``Conv1D`` is refused clearly (PEFT's OSF takes nn.Linear only too).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import MergesDelta, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Nayak et al., 2025 (arXiv:2504.07097)"
MERGEABLE = True
# Not measured yet (the lead measures SST-2); neither peft nor the paper's abstract gives a rate: OSF
# trains about as many numbers as full fine-tuning, so peftlab's full fine-tuning rate for the MiniLM
# classifier (1e-4, bench/grid.py FULL_LR) is the starting choice.
DEFAULT_LR = 1e-4
INVALID_SETTINGS = ("effective_rank=0", "effective_rank=-2", "effective_rank=1.5x", "init=ones", "rank_pattern=3")
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: the trained singular factors move W in proportion to S
INITS = ("svd", "random")


def _is_rank(value) -> bool:
    """An integer >= 1, or a fraction in (0, 1] (as PEFT takes ``effective_rank``)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return isinstance(value, float) and math.isfinite(value) and value > 0


@dataclass
class OSFConfig(MethodConfig):
    """effective_rank: top singular directions frozen per layer (integer, fraction of min(out, in)
    in (0, 1], or unset for half); rank_pattern: per-module overrides keyed by regexes searched in
    the module name (first match wins); init: svd (the base at step 0) or random (PEFT's
    init_weights=false)."""

    method: ClassVar[str] = "osf"
    effective_rank: int | float | None = None
    rank_pattern: dict = field(default_factory=dict)
    init: str = "svd"

    def validate(self) -> None:
        super().validate()
        pattern = self.rank_pattern
        if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
            raise ConfigError(f"osf: rank_pattern must map module-name regexes to ranks, e.g. {{'down_proj': 8}}; "
                              f"got {pattern!r}")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as error:
                raise ConfigError(f"osf: rank_pattern key {key!r} is not a valid regex ({error})") from None
        for value in [self.effective_rank, *pattern.values()]:
            if value is not None and not _is_rank(value):
                raise ConfigError(f"osf: effective_rank must be a positive integer, a fraction in (0, 1] of the "
                                  f"layer's smaller side, or unset (half of it); got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"osf: init must be one of {', '.join(INITS)}, got {self.init!r}")

    def rank_for(self, module_name: str, out_features: int, in_features: int) -> int:
        """The layer's frozen rank k, resolved as PEFT resolves it."""
        value = self.effective_rank
        for key, override in self.rank_pattern.items():
            if re.search(key, module_name):
                value = override
                break
        return resolve_rank(value, min(out_features, in_features))


# ---- pure math -------------------------------------------------------------------------------

def resolve_rank(value, min_dim: int) -> int:
    """Unset: half of ``min_dim``; a float in (0, 1]: that fraction of it (rounded down); else the
    integer, capped at ``min_dim``."""
    if value is None:
        return min_dim // 2
    k = int(min_dim * value) if isinstance(value, float) and value <= 1 else int(value)
    return max(min(min_dim, k), 0)


def split_svd(weight: torch.Tensor, k: int) -> dict:
    """SVD of ``weight`` (in float32) split at ``k``: high ``U_h (out x k), S_h, V_h (k x in)`` and
    low ``U_l, S_l, V_l``, in the weight's dtype."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    parts = {"U_high": U[:, :k], "S_high": S[:k], "V_high": Vh[:k], "U_low": U[:, k:], "S_low": S[k:], "V_low": Vh[k:]}
    return {n: t.contiguous().to(weight.dtype) for n, t in parts.items()}


def project_out_rows(grad: torch.Tensor, U_high: torch.Tensor) -> torch.Tensor:
    """``grad - U_h U_h^T grad``: the columns of ``grad`` without their part in ``span(U_h)``."""
    return grad - U_high @ (U_high.T @ grad)


def project_out_cols(grad: torch.Tensor, V_high: torch.Tensor) -> torch.Tensor:
    """``grad - grad V_h^T V_h``: the rows of ``grad`` without their part in the row space of ``V_h``."""
    return grad - (grad @ V_high.T) @ V_high


class _Projected(torch.autograd.Function):
    """The identity, whose backward projects the gradient off a frozen subspace."""

    @staticmethod
    def forward(ctx, value, high, rows: bool):
        ctx.save_for_backward(high)
        ctx.rows = rows
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (high,) = ctx.saved_tensors
        return (project_out_rows(grad, high) if ctx.rows else project_out_cols(grad, high)), None, None


def delta_weight(U, S, V, U0, S0, V0) -> torch.Tensor:
    """``U S V - U0 S0 V0`` (out x in)."""
    return (U * S) @ V - (U0 * S0) @ V0


# ---- module ----------------------------------------------------------------------------------

class OSFLinear(MergesDelta, nn.Module):
    """OSF for ``nn.Linear``: returns ``(U S V - U_l S_l V_l) x``, with ``U``, ``V`` trained orthogonally
    to the frozen top-``k`` singular directions."""

    def __init__(self, base: nn.Module, k: int, init: str = "svd"):
        super().__init__()
        weight = base_weight(base)
        self.out_features, self.in_features = weight.shape
        self.effective_rank = k
        parts = split_svd(weight, k)
        # recomputed from the base at attach, so never saved
        for name in ("U_high", "V_high"):
            self.register_buffer(name, parts[name], persistent=False)
        for name in ("U_low", "S_low", "V_low"):
            self.register_buffer(name + "_init", parts[name].clone(), persistent=False)
        start = {n: parts[n] if init == "svd" else torch.randn_like(parts[n]) for n in ("U_low", "S_low", "V_low")}
        self.U_low, self.S_low, self.V_low = (nn.Parameter(start[n]) for n in ("U_low", "S_low", "V_low"))

    def factors(self):
        """``(U, S, V)``, with ``U`` and ``V`` passing projected gradients back."""
        return (_Projected.apply(self.U_low, self.U_high, True), self.S_low,
                _Projected.apply(self.V_low, self.V_high, False))

    def delta_weight(self) -> torch.Tensor:
        U, S, V = self.factors()
        return delta_weight(U, S, V, self.U_low_init, self.S_low_init, self.V_low_init)

    def forward(self, x, base_out):
        U, S, V = self.factors()
        # delta W x as one rank-2r product: [U S, -U0 S0] [V; V0] x, never forming delta W
        left = torch.cat([U * S, -(self.U_low_init * self.S_low_init)], dim=1)
        right = torch.cat([V, self.V_low_init], dim=0)
        return F.linear(F.linear(x.to(left.dtype), right), left)


# ---- method protocol -------------------------------------------------------------------------

Config = OSFConfig


def make_adapter(module: nn.Module, config: OSFConfig, name: str) -> OSFLinear:
    refuse_non_linear("osf", module, name)
    out_features, in_features = base_weight(module).shape
    k = config.rank_for(name, out_features, in_features)
    smaller = min(out_features, in_features)
    if k < 1:
        raise ConfigError(f"osf: '{name}' ({out_features} x {in_features}) gets effective_rank 0: no direction would be "
                          "frozen (PEFT refuses it too); give it a rank of at least 1, e.g. with rank_pattern")
    if k >= smaller:
        raise ConfigError(f"osf: '{name}' ({out_features} x {in_features}) gets effective_rank {k}, which freezes every "
                          f"direction and leaves nothing to train; choose at most {smaller - 1} for it (a fraction "
                          "below 1, or rank_pattern)")
    return OSFLinear(module, k, config.init)
