"""The method registry: one file per method, one line here per method.

A method file provides ``Config`` (a ``MethodConfig`` dataclass), ``can_wrap(module)``,
``make_adapter(module, config, name)`` and the facts ``CATEGORY``, ``PAPER``, ``MERGEABLE``.
"""
from __future__ import annotations

import difflib

from ..errors import ConfigError
from . import dora, lora

METHODS = {m.Config.method: m for m in (lora, dora)}


def get_method(name: str):
    method = METHODS.get(name)
    if method is None:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        raise ConfigError(
            f"unknown method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known methods: {', '.join(METHODS)}"
        )
    return method
