"""The method registry: one file per method, one line here per method.

A method file provides:

- ``Config``: a ``MethodConfig`` dataclass (``method`` ClassVar = the registry name), whose
  ``validate()`` raises ``ConfigError`` naming the bad setting;
- the facts ``CATEGORY`` (additive / selective / reparameterized / hybrid), ``PAPER``,
  ``MERGEABLE``, ``INVALID_SETTINGS`` (spec settings that must fail, for the registry tests), and
  optionally ``IDENTITY_AT_INIT = False`` (soft prompts change the output from the start),
  ``EXAMPLE_SETTINGS`` (settings a tiny test model needs), ``DEFAULT_LR``;
- either ``can_wrap(module)`` and ``make_adapter(module, config, module_name)`` for a method that
  wraps modules (``core/layer.py``: the adapter returns what to add to the module's output, and
  may ``merge(base)`` / ``unmerge(base)``), or ``make_model_adapter(model, config)`` for one that
  rewrites the model's inputs (soft prompts, prefixes: ``core/model_adapters.py``);
- optionally the training hooks ``regularization``, ``after_step``, ``calibrate``
  (``core/adapters.py``), and ``export_state()`` / ``import_state()`` on its modules for a
  storage form other than the state dict (``formats/native.py``).

The registry tests (``tests/test_method_properties.py``) check every method listed here.
"""
from __future__ import annotations

import difflib
import importlib

from ..errors import ConfigError

# One line per method file, in the order the README table lists them.
METHOD_FILES = (
    "lora",
    "dora",
    "lora_fa",
    "dylora",
    "adalora",
    "sora",
    "moslora",
    "krona",
    "loha",
    "lokr",
    "gralora",
    "glora",
    "adamss",
    "vera",
    "pvera",
    "vblora",
    "unilora",
    "tinylora",
    "randlora",
    "lily",
    "fourierft",
    "waveft",
    "c3a",
    "poly",
    "trainable_tokens",
    "oft",
    "boft",
    "road",
    "delora",
    "hra",
    "hira",
    "psoft",
    "deft",
    "osf",
    "miss",
    "peanut",
    "frod",
    "qalora",
    "diff_pruning",
    "fishmask",
    "shira",
    "supertuning",
    "prompt_tuning",
    "prefix",
    "ptuning",
    "ptuning_v2",
    "cartridge",
    "dept",
    "spot",
    "multitask_prompt",
    "attempt",
    "cpt",
    "llama_adapter",
    "ia3",
    "ssf",
    "bitfit",
    "beft",
    "ln_tuning",
    "select",
    "houlsby",
    "pfeiffer",
    "adamix",
    "mera",
    "parallel",
    "compacter",
    "compacterpp",
    "sparse_adapter",
    "fusion",
    "ladder",
    "meft",
    "mam",
    "unipelt",
)
METHODS = {m.Config.method: m for m in (importlib.import_module(f".{f}", __name__) for f in METHOD_FILES)}
# Building blocks a method expands into (UniPELT's gated LoRA, adapter and prefix): found by
# get_method, so such an adapter saves, loads and trains like any other, but not listed as methods.
PARTS = {name: part for m in METHODS.values() for name, part in getattr(m, "PARTS", {}).items()}


def get_method(name: str):
    method = METHODS.get(name) or PARTS.get(name)
    if method is None:
        hint = difflib.get_close_matches(name, list(METHODS), n=1)
        raise ConfigError(
            f"unknown method {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known methods: {', '.join(METHODS)}"
        )
    return method
