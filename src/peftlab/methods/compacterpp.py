"""Compacter++: Compacter with one adapter per layer, after the feed-forward block (Karimi
Mahabadi et al., NeurIPS 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers",
arXiv:2106.04647).

The Compacter paper reports that, as Pfeiffer et al. found for plain bottleneck adapters, dropping
the adapter after the attention block costs almost nothing; Compacter++ keeps only the one after
the FFN (role ``ffn-out``), halving parameters and the added latency. Everything else is Compacter
(``compacter.py``): projections built as sums of Kronecker products ``sum_i A_i (x) B_i`` with the
``A_i`` shared by every layer and rank-``phm_rank`` ``B_i`` per layer. The up-projection starts at
zero, so the model starts as the base model. Not mergeable: the nonlinearity between the
projections cannot be folded into a weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .compacter import EXAMPLE_MODEL_SETTINGS, CompacterConfig, after_attach, can_wrap, make_adapter  # noqa: F401  (protocol)

CATEGORY = "additive"
PAPER = "Karimi Mahabadi et al., 2021 (arXiv:2106.04647)"
MERGEABLE = False
INVALID_SETTINGS = ("n=-1", "phm_rank=1.5", "bottleneck=0")
EXAMPLE_SETTINGS = "reduction=4"  # a bottleneck of 8 on the tiny hidden-32 test models, divisible by n=4
DEFAULT_LR = 1e-2


@dataclass
class CompacterPlusPlusConfig(CompacterConfig):
    """Compacter after the FFN output of every layer only."""

    method: ClassVar[str] = "compacterpp"
    targets: Any = "ffn-out"


Config = CompacterPlusPlusConfig
