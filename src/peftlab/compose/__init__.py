"""Combining adapters: merging and arithmetic of their weight updates, learned combinations, composition.

``algebra.py`` holds the combinations on one layer's updates (task arithmetic, the low-rank sum
and its best truncation, TIES, DARE, magnitude pruning); ``combining.py`` reads each adapter's true
update through its method and writes the result as a plain LoRA. ``lorahub.py`` learns the weights
of such a sum from a few examples without gradients (LoraHub); ``mixture.py`` weighs frozen experts
per token with a trained gate (X-LoRA, MoE-LoRA); ``blocks.py`` routes the input through several
adapters (AdapterHub's Stack, Average, BatchSplit, Parallel).
"""
from .blocks import Average, BatchSplit, Parallel, Stack, activate
from .combining import METHODS, Combined, combine
from .lorahub import LoraHubResult, lorahub
from .mixture import Mixture, load_mixture, mixture

__all__ = ["METHODS", "Combined", "combine", "LoraHubResult", "lorahub", "Mixture", "load_mixture", "mixture",
           "Stack", "Average", "BatchSplit", "Parallel", "activate"]
