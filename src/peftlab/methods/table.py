"""The method table (README, ``peftlab methods``), generated from the registry.

Parameter counts are for SmolLM2-135M at each method's defaults, computed on a model built on
the ``meta`` device from SmolLM2-135M's published configuration: no weights are loaded.
"""
from __future__ import annotations

import torch

from . import METHODS

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192)


def default_param_count(method_name: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..core.adapters import attach, summary

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
        for name, spec in getattr(METHODS[method_name], "EXAMPLE_PREREQUISITES", {}).items():  # e.g. fusion's task adapters
            attach(model, spec, name=name)
        attach(model, default_spec(method_name))
    return summary(model)["adapters"]["default"]


def default_spec(method_name: str) -> str:
    """The method at its defaults, or at its ``EXAMPLE_SETTINGS`` where it has a setting without a
    default (trainable tokens: the token ids)."""
    from ..core.adapters import build_configs
    from ..errors import ConfigError

    try:
        build_configs(method_name)
        return method_name
    except ConfigError:
        return f"{method_name}[{METHODS[method_name].EXAMPLE_SETTINGS}]"


CATEGORIES = ("additive", "selective", "reparameterized", "hybrid")  # the survey's taxonomy, in its order


def method_rows() -> list[dict]:
    """One row per registered method, grouped by category (registry order within one)."""
    names = sorted(METHODS, key=lambda n: CATEGORIES.index(METHODS[n].CATEGORY))
    return [
        {"name": name, "category": METHODS[name].CATEGORY, "paper": METHODS[name].PAPER,
         "mergeable": METHODS[name].MERGEABLE, "params_smollm2_135m": default_param_count(name)}
        for name in names
    ]


def markdown_table() -> str:
    lines = ["| method | category | paper | mergeable | parameters on SmolLM2-135M (defaults) |",
             "|---|---|---|---|---|"]
    for row in method_rows():
        lines.append(f"| `{row['name']}` | {row['category']} | {row['paper']} | {'yes' if row['mergeable'] else 'no'} "
                     f"| {row['params_smollm2_135m']:,} |")
    return "\n".join(lines)
