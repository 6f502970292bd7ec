"""Combining adapters: merging and arithmetic of their weight updates.

``algebra.py`` holds the combinations on one layer's updates (task arithmetic, the low-rank sum
and its best truncation, TIES, DARE, magnitude pruning); ``combining.py`` reads each adapter's true
update through its method and writes the result as a plain LoRA.
"""
from .combining import METHODS, Combined, combine

__all__ = ["METHODS", "Combined", "combine"]
