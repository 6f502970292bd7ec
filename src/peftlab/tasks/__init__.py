"""Tasks peftlab can make and score by itself, and the evaluation helpers they share.

- ``extract``: generated sentences about invoices and events -> one line of normalized JSON
  (the task of the default ``peftlab train`` job).
- ``generation``: chat-templated batched greedy generation, exact match, ``evaluate``.
- ``classification``: accuracy of a sequence classifier over labeled rows.
"""
from . import extract
from .classification import accuracy
from .generation import chat_prompt, evaluate, exact_match, generate

__all__ = ["extract", "chat_prompt", "evaluate", "exact_match", "generate", "accuracy"]
