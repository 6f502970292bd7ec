"""Combining adapters: merging and arithmetic of their weight updates (``algebra.py``)."""
