"""MAM adapter: "Towards a Unified View of Parameter-Efficient Transfer Learning" (He et al.,
ICLR 2022, arXiv:2110.04366).

Why: He et al. read prefix tuning, LoRA and adapters as one family (each adds a modification to
a hidden state) and compare where the modification goes and how it is scaled. Two findings make
their "Mix-And-Match" adapter: modifying the FFN block pays more than modifying attention when the
budget is large, and the parallel placement with a fixed scale beats the serial one; while at
attention, prefix tuning with a small budget is the most parameter-efficient choice. MAM puts both
where they work best: prefix tuning (``length`` = 30 virtual tokens per layer) on attention and a
scaled parallel adapter (bottleneck 512, scale 4) on the FFN, and matches full fine-tuning on
XSum and MT with 6.7% of the parameters.

What: a recipe. ``mam[...]`` stands for ``prefix[length=...]|parallel[bottleneck=...,scale=...]``
(``core/adapters.py`` expands it when attaching), so everything those two methods do (KV-cache
prefixes that work with ``generate``, folding the prefix MLP, the FFN-input capture on BERT,
AdapterDrop) applies as is, and the adapter is saved as that union in peftlab's format.

Mergeable: no (neither half is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.config import MethodConfig
from .parallel import ParallelConfig
from .prefix import PrefixConfig
from .prompting import EXAMPLE_MODEL_SETTINGS, fold  # noqa: F401  (the registry tests' model; fold(model) drops the prefix MLP)

CATEGORY = "hybrid"
PAPER = "He et al., 2022 (arXiv:2110.04366)"
MERGEABLE = False
IDENTITY_AT_INIT = False  # the prefix is attended to from the first step
# the paper trains MAM at 5e-5 with Adafactor-sized batches. On SST-2 / MiniLM at the bench budget 5e-4 and
# 2e-3 collapse to the majority class (the scale-4 parallel adapter beside the prefix); 1e-4 reaches 0.743
DEFAULT_LR = 1e-4
INVALID_SETTINGS = ("length=0", "bottleneck=0", "scale=0")
EXAMPLE_SETTINGS = "length=4,hidden=16,bottleneck=8"


@dataclass
class MamConfig(MethodConfig):
    """length: prefix tokens per layer; reparam / hidden: the prefix's MLP; bottleneck / scale /
    activation: the parallel adapter on the FFN (``targets``, ``layers``, ``exclude`` place it)."""

    method: ClassVar[str] = "mam"
    targets: Any = "ffn-out"
    length: int = 30
    reparam: bool = True
    hidden: int = 512
    bottleneck: int = 512
    scale: float = 4.0
    activation: str = "relu"

    def validate(self) -> None:
        super().validate()
        for part in expand(self):
            part.validate()


Config = MamConfig


def expand(config: MamConfig) -> list:
    prefix = PrefixConfig(length=config.length, reparam=config.reparam, hidden=config.hidden)
    parallel = ParallelConfig(targets=config.targets, exclude=config.exclude, layers=config.layers,
                              modules_to_save=config.modules_to_save, bottleneck=config.bottleneck,
                              scale=config.scale, activation=config.activation)
    return [prefix, parallel]
