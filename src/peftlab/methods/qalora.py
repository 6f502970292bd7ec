"""QA-LoRA: Quantization-Aware Low-Rank Adaptation (Xu et al., ICLR 2024, arXiv:2309.14717).

QLoRA trains LoRA on a 4-bit base, but merging ``s B A`` into that base needs the weights in full
precision again (or a requantization that rounds much of the update away). QA-LoRA makes the
update fit the quantization itself: the input is average-pooled over groups of ``group_size``
consecutive features before ``A``, so ``A`` is (r x in/group_size) and the layer adds::

    s * B A pool(x),        pool(x)[j] = mean of x[j*group_size : (j+1)*group_size]

which is the weight update ``dW[o, i] = s (B A)[o, i // group_size] / group_size``: constant
within each group of input features. With a base quantized group-wise with the same groups
(``peftlab.quantize(model, "int4", group_size=...)``: ``W = scale * q + offset`` per group), that
update is exactly a change of each group's offset (the zero point), so merging keeps the model in
the INT4 format: codes and scales unchanged, offsets moved. That is what "mergeable" means here; on
a full-precision base the update is simply added, on a bitsandbytes base it is requantized.

Settings are LoRA's plus ``group_size`` (a multiple of the base's INT4 group size, dividing every
target's input width; the paper uses 32). HF PEFT has QA-LoRA (``use_qalora``) for GPTQ bases only,
with an extra factor of in/group_size on the pooled input; this one follows the paper's average
pooling and is saved in peftlab's own format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.targets import is_linear
from ..errors import ConfigError
from ..quant.int4 import GroupInt4Linear
from .lora import LoraConfig, MergesDelta, base_weight, scaling

CATEGORY = "reparameterized"
PAPER = "Xu et al., 2023 (arXiv:2309.14717)"
MERGEABLE = True
INVALID_SETTINGS = ("group_size=0", "group_size=3.5", "r=0", "init=pissa")
EXAMPLE_SETTINGS = "group_size=8"  # the tiny test models' layers are 32 and 64 features wide
DEFAULT_LR = 1e-2  # pooled inputs are about sqrt(group_size) smaller than LoRA's, so the update grows slower


@dataclass
class QaLoraConfig(LoraConfig):
    """LoRA's settings (init: default or gaussian) plus group_size: input features pooled into one."""

    method: ClassVar[str] = "qalora"
    group_size: int = 32

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ConfigError(f"qalora: group_size must be a positive number of input features, got {self.group_size!r}; "
                              "use the base's INT4 group size, e.g. 32")
        if self.init in ("pissa", "loftq"):
            raise ConfigError(f"qalora: init={self.init} is not supported (A acts on pooled features); use init=default or gaussian")


# ---- pure math -------------------------------------------------------------------------------

def pool(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Average over consecutive groups of ``group_size`` features: (..., in) -> (..., in/group_size)."""
    return x.unflatten(-1, (-1, group_size)).mean(-1)


def group_delta(A: torch.Tensor, B: torch.Tensor, scale: float, group_size: int) -> torch.Tensor:
    """The update of every weight in each group: (out x in/group_size)."""
    return (B @ A) * (scale / group_size)


# ---- module ----------------------------------------------------------------------------------

class QaLoraLinear(MergesDelta, nn.Module):
    def __init__(self, base: nn.Module, config: QaLoraConfig, module_name: str):
        super().__init__()
        r, alpha, group_size = config.rank_for(module_name), config.alpha_for(module_name), config.group_size
        out_features, in_features = base_weight(base).shape
        if in_features % group_size:
            raise ConfigError(f"qalora: group_size={group_size} does not divide the {in_features} input features of "
                              f"'{module_name}'; choose a group size that divides every target's input width")
        if isinstance(base, GroupInt4Linear) and group_size % base.group_size:
            raise ConfigError(f"qalora: group_size={group_size} is not a multiple of the INT4 group size {base.group_size} "
                              f"of '{module_name}', so the update could not fold into its offsets; use group_size={base.group_size}")
        self.r, self.alpha, self.group_size = r, alpha, group_size
        self.scaling = scaling(alpha, r, config.rslora)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dtype = base.weight.dtype if base.weight.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(in_features // group_size, r, bias=False, device=base.weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=base.weight.device, dtype=dtype)
        with torch.no_grad():
            if config.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x, base_out):
        return self.lora_B(self.lora_A(pool(self.dropout(x), self.group_size)) * self.scaling)

    def group_delta(self) -> torch.Tensor:
        return group_delta(self.lora_A.weight, self.lora_B.weight, self.scaling, self.group_size)

    def delta_weight(self) -> torch.Tensor:
        return self.group_delta().repeat_interleave(self.group_size, dim=1)

    def merge(self, base: nn.Module) -> None:
        if isinstance(base, GroupInt4Linear):  # into the offsets: the base stays INT4, exactly
            base.shift_groups(self.group_delta().detach().repeat_interleave(self.group_size // base.group_size, dim=1))
        else:
            super().merge(base)

    def unmerge(self, base: nn.Module) -> None:
        if isinstance(base, GroupInt4Linear):
            base.shift_groups(-self.group_delta().detach().repeat_interleave(self.group_size // base.group_size, dim=1))
        else:
            super().unmerge(base)


# ---- method protocol -------------------------------------------------------------------------

Config = QaLoraConfig


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: QaLoraConfig, name: str) -> nn.Module:
    return QaLoraLinear(module, config, name)
