"""What every HF PEFT converter (``hf_*.py``) shares: key prefix, target names, the common fields."""
from __future__ import annotations

PREFIX = "base_model.model."  # PEFT's prefix of every tensor key (``base_model.model.<module path>...``)
PEFT_VERSION = "0.21.2"  # the peft release these files are written for and tested against
COMMON_FIELDS = {"inference_mode": True, "peft_version": PEFT_VERSION, "revision": None}


def target_names(wrapped: list, base_modules: dict) -> list:
    """Short suffixes (``q_proj``) when they select exactly the wrapped modules, as vLLM and
    PEFT users expect; full module names otherwise."""
    leaves = sorted({m.split(".")[-1] for m in wrapped})
    selected = {n for n in base_modules if n.split(".")[-1] in leaves}
    return leaves if selected == set(wrapped) else sorted(wrapped)
