"""Where a transformers module takes and returns its KV cache: the one place that knows the name.

transformers 5.24 renamed the KV-cache argument of every model, decoder layer and attention
``forward`` from ``past_key_values`` to ``cache``, and the output field with it (the old names stay
as deprecated aliases until 5.40). Models from remote code, and every transformers release before
5.24, use the old name. So nothing in peftlab spells either name: it asks the module's own
``forward`` signature which one it takes (``keyword``), moves a cache passed under the other name
onto it (``normalize``), and reads a model output's cache under whichever field it has
(``from_output``). No version numbers are compared anywhere.
"""
from __future__ import annotations

import functools
import inspect

from torch import nn

# The new name first: a forward that lists both is mid-rename and reads the new one.
NAMES = ("cache", "past_key_values")


@functools.lru_cache(maxsize=None)
def _keyword_of(forward) -> str | None:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented forward: no KV cache to find
        return None
    return next((name for name in NAMES if name in parameters), None)


def keyword(module: nn.Module) -> str | None:
    """The name under which ``module.forward`` takes a KV cache, or None when it takes none."""
    forward = getattr(type(module), "forward", None)
    return _keyword_of(forward) if forward is not None else None


def normalize(kwargs: dict, name: str | None) -> dict:
    """``kwargs`` with a cache passed under any known name moved to ``name`` (the callee's own).
    Two caches under two names is an error, as in transformers itself."""
    if name is None:
        return kwargs
    given = [other for other in NAMES if other != name and other in kwargs]
    if not given:
        return kwargs
    if kwargs.get(name) is not None:
        raise TypeError(f"a KV cache was passed both as {name!r} and as {given[0]!r}; pass it once, as {name!r}")
    kwargs = dict(kwargs)
    kwargs[name] = kwargs.pop(given[0])
    return kwargs


def from_output(output):
    """The KV cache a model returned (None when it returned none, or a plain tuple)."""
    fields = output.keys() if hasattr(output, "keys") else ()  # the fields set, not 5.24's warning alias
    return next((output[name] for name in NAMES if name in fields), None)
