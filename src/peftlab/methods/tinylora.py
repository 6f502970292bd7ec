"""TinyLoRA: "Learning to Reason in 13 Parameters" (2026, arXiv:2602.04118).

Why: LoRA-XS showed that a frozen truncated SVD of ``W`` plus a trained r x r core is enough to
adapt a layer; TinyLoRA shrinks the core further, to a ``u``-vector ``v`` that mixes ``u`` fixed
random r x r matrices, and lets layers share ``v``, so a whole model can train a handful of
numbers (13 in the paper's headline, which trains with reinforcement learning)::

    W = U S V^T,   A = sqrt(S_r) V_r^T  (r x in),   B = U_r sqrt(S_r)  (out x r),   both frozen
    R = sum_i v_i P_i   (P: u x r x r, fixed, N(0, 1/r)),     delta W = B R A   (no scale)

``A`` and ``B`` take ``W``'s top-``r`` singular directions, the singular values split evenly
between them; ``P`` of the ``k``-th adapted layer (model order) is drawn from a CPU generator
seeded with ``projection_seed + k``, so the same seed gives HF PEFT's matrices. ``weight_tying``
(0: every layer its own ``v``; 1: one ``v`` for the model) cuts the ``N`` layers into
``max(1, round(N (1 - weight_tying)))`` consecutive groups of ``N // groups`` layers (the last takes
the rest), each sharing one ``v``. ``v`` starts at zero (``init=zeros``), so the model is exactly
the base at step 0 and ``v`` still gets a gradient (``dR / dv_i = P_i``). ``delta W`` is linear in
``v``, so it merges into ``W``; the forward runs ``(B, R A)`` through LoRA's fused kernel.

The paper was not readable from here: the formulas above are those of HF PEFT 0.21.2's
``tuners/tinylora`` and its docstrings (PEFT notes that the paper leaves ``P``'s distribution open
and picks N(0, 1/r)). Each group's ``v`` is a parameter of the group's first layer, referenced
by the rest (as VeRA's shared pair, ``methods/vera.py``), so it is saved and trained once.

Reads and writes HF PEFT's ``TINYLORA`` format exactly (``formats/hf_tinylora.py``): per layer
``tinylora_A``, ``tinylora_B`` and (with ``save_projection``) ``tinylora_P``, and each group's
vector as ``base_model.tinylora_v.<group>``. Differences from HF PEFT:
- defaults are PEFT's (r=2, u=64, weight_tying=0, projection_seed=42, save_projection=True,
  init_v_bound=0.02, zero init) except ``targets`` (peftlab's ``all-linear``); PEFT's
  ``init_weights="uniform"`` is ``init=uniform`` (PEFT's ``init_weights=False``, an uninitialised
  ``v``, has no setting); ``tinylora_dropout`` is ``dropout`` here;
- ``nn.Linear`` only (quantized linear bases included, their SVD taken of the dequantized
  weight); PEFT also adapts ``nn.Embedding`` and GPT-2's ``Conv1D``, which are refused clearly;
  ``bias`` training has no setting here (use ``bitfit`` beside it);
- the native format always keeps ``P`` (a loaded adapter never depends on a generator);
  ``save_projection`` governs the HF files, as in PEFT.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .lora import MergesDelta, _FusedLoraLinear, base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "reparameterized"
PAPER = "Learning to Reason in 13 Parameters, 2026 (arXiv:2602.04118)"
MERGEABLE = True
INVALID_SETTINGS = ("r=0", "u=0", "weight_tying=1.5", "projection_seed=1.5", "init=gaussian", "init_v_bound=0",
                    "dropout=1.5", "save_projection=maybe")
# Neither PEFT nor the paper's abstract gives a supervised rate. v steers W's own top singular directions (an entry of R
# moves by about |dv| sqrt(u / r), relative to those singular values), so a moderate rate rather than VeRA's 1e-2: at 1e-3
# twelve steps on the tiny models (pretrained weight scale) already cut the loss 12-26%; 2e-3, SST-2 to be measured
DEFAULT_LR = 2e-3
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: the update lives in W's own singular values
INITS = ("zeros", "uniform")


@dataclass
class TinyLoRAConfig(MethodConfig):
    """r: rank of the frozen truncated SVD (capped at a layer's smaller width); u: length of the
    trained vector; weight_tying: how much layers share vectors (0: none, 1: one for the model);
    projection_seed: seed of the fixed random matrices P (layer k uses seed + k); save_projection:
    HF files carry P (else it is regenerated from the seed); init: zeros (the base at step 0) or
    uniform in +-init_v_bound; dropout: on the adapter's input."""

    method: ClassVar[str] = "tinylora"
    r: int = 2
    u: int = 64
    weight_tying: float = 0.0
    projection_seed: int = 42
    save_projection: bool = True
    init: str = "zeros"
    init_v_bound: float = 0.02
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        for key in ("r", "u"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ConfigError(f"tinylora: {key} must be a positive integer, got {value!r}")
        tying = self.weight_tying
        if not (isinstance(tying, (int, float)) and not isinstance(tying, bool) and 0.0 <= tying <= 1.0):
            raise ConfigError(f"tinylora: weight_tying must be a number in [0, 1] (0: each layer its own vector, 1: one "
                              f"vector for the whole model), got {tying!r}")
        seed = self.projection_seed
        if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63 - 2**20):
            raise ConfigError(f"tinylora: projection_seed must be a non-negative integer seed, got {seed!r}")
        if not isinstance(self.save_projection, bool):
            raise ConfigError(f"tinylora: save_projection must be true or false, got {self.save_projection!r}")
        if self.init not in INITS:
            raise ConfigError(f"tinylora: init must be one of {', '.join(INITS)}, got {self.init!r}")
        bound = self.init_v_bound
        if not (isinstance(bound, (int, float)) and not isinstance(bound, bool) and math.isfinite(bound) and bound > 0):
            raise ConfigError(f"tinylora: init_v_bound must be a finite number > 0 (PEFT's is 0.02), got {bound!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise ConfigError(f"tinylora: dropout must be in [0, 1), got {self.dropout!r}")


# ---- pure math -------------------------------------------------------------------------------

def svd_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)``: A = sqrt(S_r) V_r^T (r x in), B = U_r sqrt(S_r) (out x r) of ``W``'s SVD (taken
    in float32), ``r`` capped at ``min(out, in)``, returned in ``W``'s dtype."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    r = min(r, *weight.shape)
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    root = S[:r].to(dtype).sqrt()
    return (root[:, None] * Vh[:r].to(dtype)).contiguous(), (U[:, :r].to(dtype) * root[None, :]).contiguous()


def projection(u: int, r: int, seed: int) -> torch.Tensor:
    """The fixed (u x r x r) float32 matrices, N(0, 1/r), from a CPU generator seeded with ``seed``."""
    return torch.normal(0.0, 1.0 / math.sqrt(r), size=(u, r, r), generator=torch.Generator().manual_seed(seed))


def core_matrix(v: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``R = sum_i v_i P_i`` (r x r)."""
    return torch.einsum("i,ijk->jk", v, P.to(v.dtype))


def delta_weight(A, B, v, P) -> torch.Tensor:
    """The update ``B R A`` (out x in)."""
    return B @ core_matrix(v, P).to(A.dtype) @ A


def group_of(index: int, count: int, weight_tying: float) -> int:
    """Which shared vector the ``index``-th of ``count`` adapted layers uses (HF PEFT's grouping)."""
    groups = groups_for(count, weight_tying)
    return min(index // max(1, count // groups), groups - 1)


def groups_for(count: int, weight_tying: float) -> int:
    return max(1, round(count * (1.0 - weight_tying)))


# ---- module ----------------------------------------------------------------------------------

class TinyLoRALinear(MergesDelta, nn.Module):
    """TinyLoRA for ``nn.Linear``: returns ``B R A dropout(x)``, ``R`` mixed from this layer's
    ``tinylora_P`` by its group's vector (``tinylora_v`` of the group's first layer)."""

    def __init__(self, base: nn.Module, config: TinyLoRAConfig):
        super().__init__()
        weight = base_weight(base)
        self.out_features, self.in_features = weight.shape
        w = base.weight
        self._like = dict(device=w.device, dtype=w.dtype if w.dtype.is_floating_point else torch.float32)
        A, B = svd_factors(weight.to(self._like["dtype"]), config.r)
        self.r, self.u = A.shape[0], config.u
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.register_buffer("tinylora_A", A.to(w.device))
        self.register_buffer("tinylora_B", B.to(w.device))
        # set by after_attach once the layer's place among the adapted layers is known
        self.register_buffer("tinylora_P", torch.zeros(self.u, self.r, self.r, device=w.device))

    def set_projection(self, seed: int) -> None:
        self.tinylora_P.copy_(projection(self.u, self.r, seed))

    # the group's vector: registered on the group's first layer, referenced by the rest
    def own_v(self, v: torch.Tensor) -> None:
        self.tinylora_v = nn.Parameter(v.to(**self._like))

    def use_v_of(self, owner: "TinyLoRALinear") -> None:
        self.__dict__["v_owner"] = owner  # a plain reference, not a submodule: the vector is stored once

    def v(self) -> torch.Tensor:
        return self.__dict__.get("v_owner", self)._parameters["tinylora_v"]

    def core(self) -> torch.Tensor:
        return core_matrix(self.v(), self.tinylora_P).to(self.tinylora_A.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.tinylora_B @ self.core() @ self.tinylora_A

    def forward(self, x, base_out):
        h = F.linear(self.dropout(x).to(self.tinylora_A.dtype), self.tinylora_A)
        return F.linear(F.linear(h, self.core()), self.tinylora_B)

    def fused_forward(self, base: nn.Module, x):
        """The whole layer through LoRA's fused kernel with ``(R A, B)``; None where it does not apply."""
        if type(base) is not nn.Linear or not isinstance(self.dropout, nn.Identity) or x.dtype != self.tinylora_A.dtype:
            return None
        return _FusedLoraLinear.apply(x, base.weight, base.bias, self.core() @ self.tinylora_A, self.tinylora_B, 1.0)


# ---- method protocol -------------------------------------------------------------------------

Config = TinyLoRAConfig


def make_adapter(module: nn.Module, config: TinyLoRAConfig, name: str) -> nn.Module:
    refuse_non_linear("tinylora", module, name)
    return TinyLoRALinear(module, config)


def after_attach(model: nn.Module, name: str, config: TinyLoRAConfig) -> None:
    """Number the adapted layers in model order: layer k draws its P from ``projection_seed + k``
    and joins its weight-tying group, whose first layer holds the group's vector."""
    from ..core.adapters import method_adapters

    adapters = [adapter for _, adapter in method_adapters(model, name, "tinylora")]
    owners: dict = {}
    for index, adapter in enumerate(adapters):
        adapter.set_projection(config.projection_seed + index)
        group = group_of(index, len(adapters), config.weight_tying)
        if group in owners:
            adapter.use_v_of(owners[group])
            continue
        v = torch.zeros(config.u)
        if config.init == "uniform":
            v.uniform_(-config.init_v_bound, config.init_v_bound)
        adapter.own_v(v)
        owners[group] = adapter


def group_owners(adapters) -> list:
    """The layers holding the vectors, in group order (a list of ``TinyLoRALinear``)."""
    return [a for a in adapters if "tinylora_v" in a._parameters]
