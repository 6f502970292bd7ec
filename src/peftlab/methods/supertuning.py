"""Super-Tuning: sparse fine-tuning of a weight's largest entries, optionally beside a LoRA
("Supra") (2026, arXiv:2607.09287).

Why: a pretrained weight's largest-magnitude entries carry much of what the layer does, so
training only those, chosen once from ``W`` itself (no data, no calibration pass), adapts a layer
with a fixed, tiny, known set of changed entries::

    W' = W + S (+ (alpha / r) B A  with r set: "Supra"),   S = values at the k = int(out * in * (1 - sparsity))
                                                              flat positions of largest |W|

``select_top=false`` takes the smallest entries instead (the paper's "-bottom" variants; which end
is better depends on model and task). ``S`` starts at zero and LoRA's ``B`` too, so the model is
exactly the base at step 0; ``S`` and ``B A`` are linear in what trains, so the update merges into
``W`` and unmerges exactly. The forward runs one matmul through ``W + S`` (plus the LoRA branch).

The selection is ``torch.topk(|W|.flatten(), k, largest=select_top)``, HF PEFT 0.21.2's call, so
the same base gives the same positions in the same order. The paper was not readable from here:
the method is as HF PEFT's ``tuners/supertuning`` and its docstrings give it (magnitude scoring,
which PEFT reports as the paper's best single mechanism on Llama-3-8B; its Wanda-style activation
scoring is in neither library). Like SHiRA (``methods/shira.py``) the adapter is a sparse
``WeightDelta`` (``methods/sparse_delta.py``), sharing its merge, quantized-base and fused paths.

Reads and writes HF PEFT's ``SUPERTUNING`` format exactly (``formats/hf_supertuning.py``):
``supertuning_values`` (k), ``supertuning_indices`` (k flat positions, int32; only with
``save_indices``, else both libraries select them again from the base) and, with ``r``,
``supertuning_lora_A.weight`` / ``supertuning_lora_B.weight``. Differences from HF PEFT:
- defaults are PEFT's (sparsity=0.99, select_top=true, no LoRA, zero init, indices saved) except
  ``targets`` (peftlab's ``all-linear``); ``lora_alpha``, ``lora_dropout`` and
  ``save_precomputed_indices`` are ``alpha``, ``dropout`` and ``save_indices`` here, and
  ``init=random`` is PEFT's ``init_weights=False`` (normal values, Kaiming ``B``: for tests);
- the trained values and LoRA factors are kept in the base weight's dtype (PEFT keeps them in
  float32 whatever the base): the same numbers in fp32, half the memory on a bf16 base;
- ``nn.Linear`` only (quantized linear bases included, entries chosen from the dequantized
  weight), as in PEFT; GPT-2's ``Conv1D`` is refused clearly.
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
from .lora import base_weight
from .sparse_delta import WeightDelta, delta_dtype
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "selective"
PAPER = "Super-Tuning, 2026 (arXiv:2607.09287)"
MERGEABLE = True
# SHiRA's and FishMask's rate: the same kind of update (a fixed sparse set of W's own entries, starting at 0, trained
# directly); neither PEFT nor the paper's summary in PEFT gives one. SST-2 to be measured
DEFAULT_LR = 2e-3
INVALID_SETTINGS = ("sparsity=1", "sparsity=-0.1", "r=0", "alpha=4", "init=ones", "dropout=1.5", "select_top=maybe")
# the tiny test models' layers have 512-2048 entries, so the default 1% trains 5-20 a layer: too few for 12 test steps
EXAMPLE_SETTINGS = "sparsity=0.5"
INITS = ("zeros", "random")


@dataclass
class SupertuningConfig(MethodConfig):
    """sparsity: the share of a layer's entries left frozen (0.99: 1% train); select_top: train the
    largest-magnitude entries (false: the smallest); r: rank of an added LoRA ("Supra"; none: sparse
    only); alpha: that LoRA's scale numerator (none: 2 r); dropout: on the LoRA's input; init: zeros
    (the base at step 0) or random (PEFT's init_weights=False); save_indices: HF files carry the
    positions (else they are chosen again from the base's magnitudes)."""

    method: ClassVar[str] = "supertuning"
    sparsity: float = 0.99
    select_top: bool = True
    r: int | None = None
    alpha: float | None = None
    dropout: float = 0.0
    init: str = "zeros"
    save_indices: bool = True

    def validate(self) -> None:
        super().validate()
        s = self.sparsity
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0.0 <= s < 1.0):
            raise ConfigError(f"supertuning: sparsity must be in [0, 1) (0.99 trains 1% of each weight), got {s!r}")
        if not isinstance(self.select_top, bool):
            raise ConfigError(f"supertuning: select_top must be true or false, got {self.select_top!r}")
        if self.r is not None and not (isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0):
            raise ConfigError(f"supertuning: r (the Supra LoRA's rank) must be a positive integer or none, got {self.r!r}")
        a = self.alpha
        if a is not None:
            if self.r is None:
                raise ConfigError("supertuning: alpha scales the Supra LoRA, which needs r; set r too or leave alpha unset")
            if not (isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)):
                raise ConfigError(f"supertuning: alpha must be a finite number, got {a!r}")
        if not (isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool) and 0 <= self.dropout < 1):
            raise ConfigError(f"supertuning: dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ConfigError(f"supertuning: init must be one of {', '.join(INITS)}, got {self.init!r}")
        if not isinstance(self.save_indices, bool):
            raise ConfigError(f"supertuning: save_indices must be true or false, got {self.save_indices!r}")

    @property
    def lora_alpha(self) -> float | None:
        """The Supra LoRA's alpha: as set, else 2 r (PEFT's default); None without a LoRA."""
        return None if self.r is None else float(2 * self.r if self.alpha is None else self.alpha)


# ---- pure math -------------------------------------------------------------------------------

def entries_to_train(numel: int, sparsity: float) -> int:
    """``int(numel * (1 - sparsity))``, refused where that leaves nothing to train."""
    k = int(numel * (1 - sparsity))
    if k < 1:
        raise ConfigError(f"supertuning: sparsity={sparsity} leaves no entry of a {numel}-entry weight to train; "
                          f"lower it to at most {1 - 1 / numel:.6g} or leave the layer out with 'exclude'")
    return k


def select(weight: torch.Tensor, k: int, top: bool = True) -> torch.Tensor:
    """The flat positions of the ``k`` largest (``top``) or smallest entries of ``|W|``, in ``topk``'s order."""
    return torch.topk(weight.detach().abs().flatten(), k, largest=top).indices


def sparse_update(values: torch.Tensor, indices: torch.Tensor, shape) -> torch.Tensor:
    """The dense ``S``: ``values`` added at flat ``indices`` of a zero weight of ``shape``."""
    return values.new_zeros(torch.Size(shape).numel()).index_put((indices,), values, accumulate=True).view(shape)


def delta_weight(values, indices, shape, A=None, B=None, scale: float = 1.0) -> torch.Tensor:
    """``S`` plus, with a LoRA, ``scale B A`` (out x in)."""
    S = sparse_update(values, indices, shape)
    return S if A is None else S + scale * (B @ A).to(S.dtype)


# ---- module ----------------------------------------------------------------------------------

class SupertuningLinear(WeightDelta):
    """Super-Tuning for ``nn.Linear``: trained values at fixed magnitude-chosen positions of ``W``,
    plus a LoRA branch with ``r``."""

    def __init__(self, base: nn.Module, config: SupertuningConfig):
        super().__init__(base)
        self.out_features, self.in_features = self.weight_shape
        device, dtype = base.weight.device, delta_dtype(base)
        k = entries_to_train(self.weight_numel, config.sparsity)
        # saved with the values, so a loaded adapter never depends on how its positions were chosen
        self.register_buffer("supertuning_indices", select(base_weight(base), k, config.select_top).to(device))
        start = torch.zeros(k) if config.init == "zeros" else torch.randn(k)
        self.supertuning_values = nn.Parameter(start.to(device, dtype))
        self.r, self.scale = config.r, (config.lora_alpha / config.r if config.r else 0.0)
        if config.r:
            A = torch.empty(config.r, self.in_features)
            B = torch.zeros(self.out_features, config.r)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            if config.init == "random":
                nn.init.kaiming_uniform_(B, a=math.sqrt(5))
            self.supertuning_lora_A = nn.Parameter(A.to(device, dtype))
            self.supertuning_lora_B = nn.Parameter(B.to(device, dtype))
            self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def lora(self):
        return (self.supertuning_lora_A, self.supertuning_lora_B) if self.r else (None, None)

    def current_delta(self) -> torch.Tensor:
        return delta_weight(self.supertuning_values, self.supertuning_indices, self.weight_shape, *self.lora(), self.scale)

    def delta_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self.current_delta()

    def adapted_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``W + S`` without forming ``S``: the values added at their positions (out of place)."""
        flat = weight.reshape(-1).index_put((self.supertuning_indices,), self.supertuning_values.to(weight.dtype),
                                            accumulate=True)
        return flat.view_as(weight)

    def _lora_out(self, x):
        A, B = self.lora()
        return self.scale * F.linear(F.linear(self.dropout(x).to(A.dtype), A), B)

    def forward(self, x, base_out):
        S = sparse_update(self.supertuning_values, self.supertuning_indices, self.weight_shape)
        out = F.linear(x.to(S.dtype), S)
        return out + self._lora_out(x) if self.r else out

    def fused_forward(self, base: nn.Module, x):
        """One matmul through ``W + S`` (plus the LoRA branch); None where it does not apply."""
        out = super().fused_forward(base, x)
        return out + self._lora_out(x).to(out.dtype) if out is not None and self.r else out


# ---- method protocol -------------------------------------------------------------------------

Config = SupertuningConfig


def make_adapter(module: nn.Module, config: SupertuningConfig, name: str) -> nn.Module:
    refuse_non_linear("supertuning", module, name)
    return SupertuningLinear(module, config)
