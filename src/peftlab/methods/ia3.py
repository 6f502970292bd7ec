"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (arXiv:2205.05638) adapt a model by element-wise rescaling three of its activations with
learned vectors: the attention keys ``l_k * (W_k x)``, the values ``l_v * (W_v x)``, and the inner
activation of the feed-forward block ``W_2 (l_ff * act(W_1 x))``. The vectors start at ones, so
the model is exactly the base at init, and they are tiny (about 0.01% of the parameters), which is
what made (IA)^3 the backbone of the paper's few-shot recipe T-Few.

Default targets: the roles ``keys``, ``values`` and ``ffn-out``; modules matching ``feedforward``
(default: ``ffn-out``, the FFN's output projection) have their INPUT scaled (``l`` has one entry
per input feature), the others their OUTPUT (one entry per output feature, bias included), as in
HF PEFT's ``IA3`` (whose exact format ``formats/hf_ia3.py`` reads and writes). GPT-2 computes
queries, keys and values in one ``c_attn``: name it, ``ia3[targets=[c_attn,mlp.c_proj],
feedforward=[mlp.c_proj]]``, as HF PEFT does (which scales the queries too).

Mergeable: the scaling folds into the weights, the rows of ``W_k`` and ``W_v`` (and their biases)
for an output scale, the columns of ``W_2`` for an input scale. Unmerging divides by the vectors,
so merging refuses a scale of exactly zero (and leaves the model unmerged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..core.targets import expand_roles, is_linear, matches
from ..errors import ConfigError
from .bitfit import feature_dtype
from .lora import base_weight, set_base_weight
from .ssf import check_invertible, scale_outputs

CATEGORY = "additive"
PAPER = "Liu et al., 2022 (arXiv:2205.05638)"
MERGEABLE = True
INVALID_SETTINGS = ("feedforward=3", "feedforward=[1]", "targets=[]")
DEFAULT_LR = 1e-2
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class IA3Config(MethodConfig):
    """targets: the layers to rescale (default: keys, values and the FFN's output projection);
    feedforward: those of them whose input, not output, is rescaled (names, regexes or roles)."""

    method: ClassVar[str] = "ia3"
    targets: Any = field(default_factory=lambda: ["keys", "values", "ffn-out"])
    feedforward: list = field(default_factory=lambda: ["ffn-out"])

    def validate(self) -> None:
        super().validate()
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if not isinstance(self.feedforward, (list, tuple)) or not all(isinstance(n, str) and n for n in self.feedforward):
            raise ConfigError(f"ia3: 'feedforward' must be module names, regexes ('re:...') or roles among the targets, "
                              f"e.g. [ffn-out] or [down_proj]; got {self.feedforward!r}")

    def is_feedforward(self, module_name: str, module: nn.Module) -> bool:
        return any(matches(module_name, p) for p in expand_roles(self.feedforward, {module_name: module}))


# ---- module ----------------------------------------------------------------------------------

class IA3Linear(nn.Module):
    """Rescales a linear layer's output features, or with ``feedforward`` its input features, by ``ia3_l``."""

    def __init__(self, base: nn.Module, feedforward: bool):
        super().__init__()
        out_features, in_features = base_weight(base).shape
        self.feedforward = feedforward
        size = in_features if feedforward else out_features
        self.ia3_l = nn.Parameter(torch.ones(size, dtype=feature_dtype(base), device=base.weight.device))
        self.__dict__["_base_ref"] = base  # a plain reference, not a submodule

    def forward(self, x, base_out):
        if self.feedforward:  # W (l * x) - W x, with the bias counted once (by the base)
            return F.linear(x * (self.ia3_l - 1), base_weight(self.__dict__["_base_ref"]))
        return base_out * (self.ia3_l - 1)

    def fused_forward(self, base: nn.Module, x):
        return base(x * self.ia3_l) if self.feedforward else base(x) * self.ia3_l

    def merge(self, base: nn.Module) -> None:
        check_invertible(self.ia3_l, "ia3")
        self._fold(base, self.ia3_l)

    def unmerge(self, base: nn.Module) -> None:
        self._fold(base, 1 / self.ia3_l)

    def _fold(self, base: nn.Module, factor: torch.Tensor) -> None:
        if self.feedforward:
            with torch.no_grad():
                set_base_weight(base, base_weight(base) * factor)  # the columns of W
        else:
            scale_outputs(base, factor)

    def detach_from(self, base: nn.Module) -> None:
        pass

    def hf_state(self) -> dict:
        """The vector as HF PEFT stores it: (1, in) for an input scale, (out, 1) for an output scale."""
        vector = self.ia3_l.detach()
        return {"ia3_l": vector[None, :] if self.feedforward else vector[:, None]}


# ---- method protocol -------------------------------------------------------------------------

Config = IA3Config


def can_wrap(module: nn.Module) -> bool:
    return is_linear(module)


def make_adapter(module: nn.Module, config: IA3Config, name: str) -> IA3Linear:
    return IA3Linear(module, config.is_feedforward(name, module))
