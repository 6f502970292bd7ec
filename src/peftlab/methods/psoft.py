"""PSOFT: Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation
(https://openreview.net/forum?id=FSHrinMArK, the paper HF PEFT cites).

OFT rotates the whole input space of a weight (``W R``, R: in x in), which is costly and, on a
pretrained weight, mostly spent on directions the weight barely uses. PSOFT rotates only the
weight's principal subspace: with the top-``r`` singular triplets ``W ~ U_r S_r V_r^T``, a frozen
pair ``A = V_r^T`` (r x in, orthonormal rows) and ``B = U_r S_r / s`` (out x r) span it, and an
r x r transform ``R`` trains between them::

    delta W = s B (R - I) A,      s = alpha / r
    R = diag(b) cayley(Q) diag(a),  cayley(Q) = (I + Q)(I - Q)^-1,  Q skew-symmetric (r(r-1)/2 numbers)

so the principal part ``U_r S_r V_r^T`` becomes ``U_r S_r R V_r^T`` and the rest of ``W`` is
untouched. Because ``A``'s rows are orthonormal, an orthogonal ``R`` keeps the angles and lengths
among the principal coordinates of every input direction (``(R A)^T (R A) = A^T A``): OFT's
geometry-preserving property at the cost of ``r(r-1)/2`` numbers (+ ``2r`` for the optional
magnitude vectors ``a`` and ``b``, which trade a little of that for adaptability). ``Q`` starts at
zero and ``a``, ``b`` at one, so the model is exactly the base at step 0. The update is a weight,
so it merges. Options as in the paper and PEFT: ``orth=false`` trains ``R`` as a free matrix
(from ``I``); ``init=pissa`` splits ``sqrt(S_r / s)`` between ``A`` and ``B`` (PiSSA's symmetric
form; ``A`` is then no longer orthonormal); ``use_cayley_neumann`` replaces the inverse by its
truncated Neumann series (``cayley_neumann_eps`` bounds ``||Q||_F``); ``svd=lowrank`` uses
``torch.svd_lowrank`` seeded with ``random_seed``. The skew-symmetric and Cayley maps are OFT's
(``oft.skew`` / ``oft.cayley``).

Reads and writes HF PEFT's ``PSOFT`` format exactly (``formats/hf_psoft.py``): a layer's numbers
are ``psoft_R.weight``, ``psoft_R.vector_b`` and ``psoft_R.vector_a``; ``A`` and ``B`` are never
saved, both libraries recompute them from the base weight's SVD. Differences from HF PEFT:
- defaults are PEFT's (r=32, alpha=32, psoft init, full SVD, orthogonal R with both vectors)
  except ``targets`` (peftlab's ``all-linear``); PEFT's ``psoft_``-prefixed names drop the prefix
  here (``psoft_dropout`` is ``dropout``, ``ab_svd_init=psoft_init`` is ``init=psoft``,
  ``psoft_svd_lowrank_niter`` is ``svd_niter``); PEFT's ``init_weights=False`` (a random ``Q``, for
  its tests) has no setting;
- a layer narrower than ``r`` uses its width (PEFT refuses it), so the defaults attach to small
  layers; an adapter whose layers' r then differ is saved in peftlab's format, with a warning
  (PEFT's file holds one r);
- ``nn.Linear`` only (quantized linear bases included: the SVD of the dequantized weight);
  GPT-2's ``Conv1D`` is refused clearly, as in PEFT.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import MergesDelta, base_weight
from .oft import cayley, skew
from .vera import can_wrap  # noqa: F401  (protocol: nn.Linear; Conv1D matched, so naming one gets the refusal below)

CATEGORY = "reparameterized"
PAPER = "PSOFT (openreview.net/forum?id=FSHrinMArK)"
MERGEABLE = True
# an OFT-family rotation generator (plus magnitude vectors near one): OFT's rate in peftlab (1e-3, measured on
# SST-2), as PEFT gives none for PSOFT; to be measured
DEFAULT_LR = 1e-3
# the update rotates W's own principal part, so it is as small as W: on a random tiny model (weights at 0.02) 12 steps
# at 1e-3 move the loss about 1%; at a pretrained scale (0.2) it trains as the registry tests expect
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}
INVALID_SETTINGS = ("r=0", "alpha=0", "dropout=1.5", "init=lora", "svd=fast", "svd_niter=0",
                    "num_cayley_neumann_terms=0", "cayley_neumann_eps=1.5", "orth=maybe")
INITS = ("psoft", "pissa")
SVDS = ("full", "lowrank")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class PsoftConfig(MethodConfig):
    """r: rank of the principal subspace (a narrower layer uses its width); alpha: scale s = alpha / r
    (folded into B, so it cancels in delta W); dropout: on the input; init: psoft (A = V_r^T
    orthonormal) or pissa (sqrt(S) on both sides); svd: full or lowrank (svd_niter power iterations,
    random_seed); orth: R orthogonal through Cayley (else a free matrix); mag_a / mag_b: trained
    scales on R's input / output side; use_cayley_neumann, num_cayley_neumann_terms,
    cayley_neumann_eps: the Neumann-series Cayley map and its bound on ||Q||_F."""

    method: ClassVar[str] = "psoft"
    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "psoft"
    svd: str = "full"
    svd_niter: int = 10
    random_seed: int = 0
    orth: bool = True
    mag_a: bool = True
    mag_b: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None

    def validate(self) -> None:
        super().validate()
        if not (_is_int(self.r) and self.r > 0):
            raise ConfigError(f"psoft: rank r must be a positive integer, got {self.r!r}")
        a = self.alpha
        if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and a != 0):
            raise ConfigError(f"psoft: alpha must be a finite non-zero number (PEFT's default 32), got {a!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"psoft: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"psoft: init must be one of {', '.join(INITS)} (PEFT's ab_svd_init), got {self.init!r}")
        if self.svd not in SVDS:
            raise ConfigError(f"psoft: svd must be one of {', '.join(SVDS)}, got {self.svd!r}")
        if not (_is_int(self.svd_niter) and self.svd_niter > 0):
            raise ConfigError(f"psoft: svd_niter must be a positive integer, got {self.svd_niter!r}")
        if not (_is_int(self.random_seed) and -2**63 <= self.random_seed < 2**64):
            raise ConfigError(f"psoft: random_seed must be an integer seed, got {self.random_seed!r}")
        for key in ("orth", "mag_a", "mag_b", "use_cayley_neumann"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"psoft: {key} must be true or false, got {getattr(self, key)!r}")
        if not (_is_int(self.num_cayley_neumann_terms) and self.num_cayley_neumann_terms > 0):
            raise ConfigError(f"psoft: num_cayley_neumann_terms must be a positive integer, got "
                              f"{self.num_cayley_neumann_terms!r}")
        eps = self.cayley_neumann_eps
        if eps is not None and not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
            raise ConfigError(f"psoft: cayley_neumann_eps bounds ||Q||_F and must be in (0, 1) (e.g. 0.9) or none, got {eps!r}")

    def r_for(self, out_features: int, in_features: int) -> int:
        return min(self.r, out_features, in_features)


# ---- pure math -------------------------------------------------------------------------------

def principal_pair(W: torch.Tensor, r: int, scale: float, init: str = "psoft", svd: str = "full", niter: int = 10,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen ``(A, B)`` (r x in, out x r) spanning ``W``'s top-``r`` singular subspace (float32
    SVD, PEFT's): psoft ``A = V_r^T``, ``B = U_r S_r / scale``; pissa ``A = sqrt(S_r / scale) V_r^T``,
    ``B = U_r sqrt(S_r / scale)``. ``svd=lowrank``: ``torch.svd_lowrank`` under ``seed``, global RNG untouched."""
    W = W.detach().float()
    if svd == "full":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        devices = {"devices": []} if W.device.type == "cpu" else {"devices": [W.device], "device_type": W.device.type}
        with torch.random.fork_rng(**devices):
            torch.manual_seed(seed)
            U, S, V = torch.svd_lowrank(W, q=r, niter=niter)
        U, S, Vh = U[:, :r], S[:r], V[:, :r].t()
    S = S / scale
    if init == "psoft":
        return Vh.contiguous(), (U @ torch.diag(S)).contiguous()
    root = torch.sqrt(S)
    return (torch.diag(root) @ Vh).contiguous(), (U @ torch.diag(root)).contiguous()


def bounded(Q: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``Q`` scaled onto ``||Q||_F <= eps`` where it lies outside (no bound for None)."""
    if eps is None:
        return Q
    norm = torch.linalg.norm(Q)
    return Q * (eps / (norm + 1e-12)) if torch.isfinite(norm) and norm > eps else Q


def delta_weight(A: torch.Tensor, B: torch.Tensor, R: torch.Tensor, scale: float) -> torch.Tensor:
    """The update ``s B (R - I) A`` (out x in)."""
    return scale * B @ (R - torch.eye(R.shape[0], device=R.device, dtype=R.dtype)) @ A


# ---- module ----------------------------------------------------------------------------------

class Transform(nn.Module):
    """The trained r x r ``R`` (PEFT's ``psoft_R``): ``weight`` holds Q's upper triangle (orth) or R
    itself; ``vector_b`` / ``vector_a`` scale its rows / columns."""

    def __init__(self, r: int, config: PsoftConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.r, self.orth = r, config.orth
        self.neumann, self.terms, self.eps = config.use_cayley_neumann, config.num_cayley_neumann_terms, config.cayley_neumann_eps
        self.weight = nn.Parameter(torch.zeros(r * (r - 1) // 2, **kw) if config.orth else torch.eye(r, **kw))
        self.vector_b = nn.Parameter(torch.ones(r, **kw)) if config.mag_b else None
        self.vector_a = nn.Parameter(torch.ones(r, **kw)) if config.mag_a else None

    def matrix(self) -> torch.Tensor:
        R = self.weight
        if self.orth:
            Q = skew(self.weight[None], self.r)[0]
            # (I + Q)(I - Q)^-1: OFT's exact map is (I - Q)(I + Q)^-1, so it gets -Q; its Neumann series is this one's
            R = cayley(bounded(Q, self.eps), True, self.terms) if self.neumann else cayley(-Q, neumann=False)
        if self.vector_b is not None:
            R = self.vector_b[:, None] * R
        if self.vector_a is not None:
            R = R * self.vector_a[None, :]
        return R


class PsoftLinear(MergesDelta, nn.Module):
    """PSOFT for ``nn.Linear``: returns ``s ((A x) R^T - A x) B^T`` for the frozen principal pair."""

    def __init__(self, base: nn.Module, r: int, config: PsoftConfig):
        super().__init__()
        W = base_weight(base)
        self.out_features, self.in_features = W.shape
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.r, self.scaling = r, config.alpha / r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if W.is_meta:  # a model of sizes only (the method table)
            A, B = torch.empty(r, self.in_features, device="meta"), torch.empty(self.out_features, r, device="meta")
        else:
            A, B = principal_pair(W, r, self.scaling, config.init, config.svd, config.svd_niter, config.random_seed)
        # derived from the base weight, so never saved (as in PEFT)
        self.register_buffer("psoft_A", A.to(W.device, dtype), persistent=False)
        self.register_buffer("psoft_B", B.to(W.device, dtype), persistent=False)
        self.psoft_R = Transform(r, config, device=W.device, dtype=dtype)

    def delta_weight(self) -> torch.Tensor:
        return delta_weight(self.psoft_A, self.psoft_B, self.psoft_R.matrix(), self.scaling)

    def forward(self, x, base_out):
        xa = F.linear(self.dropout(x).to(self.psoft_A.dtype), self.psoft_A)
        return (F.linear(F.linear(xa, self.psoft_R.matrix()) - xa, self.psoft_B) * self.scaling).to(x.dtype)


# ---- method protocol -------------------------------------------------------------------------

Config = PsoftConfig


def make_adapter(module: nn.Module, config: PsoftConfig, name: str) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"psoft: '{name}' is a {type(module).__name__}; PSOFT (here and in HF PEFT) adapts nn.Linear "
                          "layers only; leave it out with 'exclude' or choose other targets")
    out_features, in_features = base_weight(module).shape
    return PsoftLinear(module, config.r_for(out_features, in_features), config)


def narrowed_warning(ranks: dict, r: int) -> None:
    """Say why an adapter whose layers' r differ is saved in peftlab's format, not PEFT's."""
    narrow = sorted({v for v in ranks.values() if v != r})
    warnings.warn(f"psoft: layers narrower than r={r} use their width (r={narrow}); PEFT's PSOFT format has one r for "
                  "every layer, so this adapter is saved in peftlab's own format, which PEFT cannot read (choose r at "
                  f"most {min(ranks.values())} for a PEFT file)", stacklevel=3)
