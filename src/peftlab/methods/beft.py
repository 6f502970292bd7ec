"""BEFT: Bias-Efficient Fine-Tuning of Language Models in Low-Data Regimes (Huang, Balashankar and
Aminifar, 2025, arXiv:2509.15974).

BitFit trains every bias of a model. BEFT asks which single bias is worth training, comparing the
query, key and value projections' biases ``b_q``, ``b_k``, ``b_v``, and finds that training only the
value bias ``b_v`` generally does best in low-data regimes, for encoder and decoder models alike,
bias-free ones (Llama) included, where the bias is added. So the whole adapter is one vector per
value projection::

    v = W_v x + b_v + beta        (beta trained, zero at init)

about 0.01% of a model's parameters. A value bias reaches the attention output unchanged: each
attention row is a convex combination of value rows (softmax weights sum to one), so ``beta`` shifts
every token's head output by the same vector; that shift is what the tests check.

Here each targeted linear layer gets a trainable output shift ``beta`` (``beft_bias``), zero at
init (so the model is the base at step 0), added to the layer's output; the frozen bias, if any,
stays as it is. Default targets: the role ``values`` (``v_proj``, BERT's ``attention.self.value``),
what the paper trains and HF PEFT's default mapping; other layers can be named in ``targets``.

Reads and writes HF PEFT's ``BEFT`` format exactly (``formats/hf_beft.py``): one tensor
``beft_bias`` shaped (1, out) per layer. Differences from HF PEFT:
- merging a layer that has no bias (every Llama projection) gives it one, which unmerging takes
  away again; HF PEFT refuses to merge such a layer, so a merged Llama BEFT works here only;
- ``nn.Linear`` only (quantized linear bases included), as PEFT; GPT-2's fused ``c_attn`` (a
  ``Conv1D`` holding queries, keys and values together) is refused clearly, since its bias is not
  the value bias alone;
- PEFT's ``init_weights=False`` (a random standard-normal start, which PEFT discourages) is
  ``init=gaussian`` here; the default ``init=zeros`` is PEFT's ``init_weights=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError
from .bitfit import feature_dtype, shift_bias
from .lora import base_weight
from .vera import can_wrap, refuse_non_linear  # noqa: F401  (protocol: nn.Linear, Conv1D refused clearly)

CATEGORY = "selective"
PAPER = "Huang et al., 2025 (arXiv:2509.15974)"
MERGEABLE = True
# Not measured yet (the lead measures SST-2): bias-only updates want a large step; BEFT trains
# even fewer numbers than peftlab's BitFit (2e-3), as few as (IA)^3's vectors, whose 1e-2 is taken.
DEFAULT_LR = 1e-2
INVALID_SETTINGS = ("init=ones", "targets=[]")
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act
INITS = ("zeros", "gaussian")


@dataclass
class BEFTConfig(MethodConfig):
    """targets: the layers whose output gets a trained bias (default: the value projections);
    init: zeros (the base at step 0; PEFT's default) or gaussian (PEFT's init_weights=false)."""

    method: ClassVar[str] = "beft"
    targets: Any = field(default_factory=lambda: ["values"])
    init: str = "zeros"

    def validate(self) -> None:
        super().validate()
        if self.init not in INITS:
            raise ConfigError(f"beft: init must be one of {', '.join(INITS)}, got {self.init!r}")


# ---- module ----------------------------------------------------------------------------------

class BEFTLinear(nn.Module):
    """Adds the trained value-bias shift ``beft_bias`` (one entry per output feature) to a linear layer."""

    def __init__(self, base: nn.Module, init: str = "zeros"):
        super().__init__()
        out_features = base_weight(base).shape[0]
        start = torch.zeros(out_features) if init == "zeros" else torch.randn(out_features)
        self.beft_bias = nn.Parameter(start.to(base.weight.device, feature_dtype(base)))

    def forward(self, x, base_out):
        return self.beft_bias.to(base_out.dtype).expand(base_out.shape)

    def merge(self, base: nn.Module) -> None:
        shift_bias(base, self.beft_bias)

    def unmerge(self, base: nn.Module) -> None:
        shift_bias(base, -self.beft_bias)

    def detach_from(self, base: nn.Module) -> None:
        pass


# ---- method protocol -------------------------------------------------------------------------

Config = BEFTConfig


def make_adapter(module: nn.Module, config: BEFTConfig, name: str) -> BEFTLinear:
    refuse_non_linear("beft", module, name)
    return BEFTLinear(module, config.init)
