"""Cartridges: Lightweight and general-purpose long context representations via self-study
(Eyuboglu et al., 2025, arXiv:2506.06266).

Why: answering questions over a long corpus by putting the whole corpus in the context costs a
KV cache as long as the corpus at every request. A cartridge is a much shorter KV cache, trained
offline (the paper trains it by context distillation on synthetic conversations about the corpus,
"self-study") and then loaded in front of every request; the paper matches in-context learning on
long-context benchmarks with a 38.6x smaller cache and 26.4x higher throughput.

What: per layer, ``length`` keys and values per key/value head, the KV cache itself as the
trainable parameter: prefix tuning without a reparameterization (``prefix.py``,
``ptuning_v2.py``: the same ``KVPrefix`` machinery serves it through the model's own cache, in
training, ``generate`` and under gradient checkpointing), with two choices from the paper:

- the first ``frozen`` virtual tokens (1 by default) never train: models use the first positions
  as an attention sink, and the paper found that moving them destabilises training;
- the initialisation (the paper's section 5 compares them): ``init=random`` (default), standard
  normal keys and values as HF PEFT's ``get_peft_model`` makes them; or ``init=text``, the paper's
  best, the base model's own KV cache of a text's first ``length`` tokens (``init_ids``, or
  ``init_text`` with ``tokenizer``; ids shorter than ``length`` are repeated), so training starts
  from a real context (HF PEFT does this as a separate step, ``initialize_kv_prefix_from_text``).
  The keys of that cache carry their rotary positions ``0..length-1``, and the user's tokens
  then sit at ``length, length+1, ...`` as after a real prefill.

Saved in HF PEFT's ``CARTRIDGE`` format (``formats/hf_cartridge.py``): one ``prompt_embeddings``
tensor (length x layers*2*kv_heads*head_dim, frozen tokens first) and ``num_frozen_tokens``.
Self-study (synthesising the conversations) is a data recipe, not part of the adapter: train a
cartridge with ``peftlab.train`` on whatever data describes the corpus.

Mergeable: no. The cartridge is attention context, not a change to any weight.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core import kv_cache
from ..core.adapters import disabled
from ..core.config import MethodConfig
from ..core.state import get_state
from ..errors import ConfigError, TargetError
from .prefix import make_prefix
from .prompt_tuning import check_text_init, text_ids
from .prompting import SAVED_KEY, KVPrefix, PrefixShape, check_length, check_saved, repeat_to_length
from .prompting import EXAMPLE_MODEL_SETTINGS  # noqa: F401  (the registry tests' model)

CATEGORY = "additive"
PAPER = "Eyuboglu et al., 2025 (arXiv:2506.06266)"
MERGEABLE = False
IDENTITY_AT_INIT = False
DEFAULT_LR = 2e-2  # the authors' training example (HazyResearch/cartridges README: lr=2e-2, Adam, KV from text)
INVALID_SETTINGS = ("length=0", "frozen=-1", "frozen=30", "init=zeros", "init=text")
INITS = ("random", "text")


@dataclass
class CartridgeConfig(MethodConfig):
    """length: virtual tokens (the cartridge's KV cache length); frozen: how many of the first ones
    never train (attention sinks); init: random, or text (init_ids / init_text + tokenizer)."""

    method: ClassVar[str] = "cartridge"
    length: int = 20
    frozen: int = 1
    init: str = "random"
    init_text: str | None = None
    tokenizer: str | None = None
    init_ids: list | None = None

    def validate(self) -> None:
        super().validate()
        check_length(self)
        if not isinstance(self.frozen, int) or isinstance(self.frozen, bool) or not 0 <= self.frozen <= self.length:
            raise ConfigError(f"{self.method}: frozen (how many leading virtual tokens stay fixed) must be an integer "
                              f"from 0 to length={self.length}, got {self.frozen!r}")
        if self.init not in INITS:
            raise ConfigError(f"{self.method}: init must be one of {', '.join(INITS)}, got {self.init!r}")
        check_text_init(self)


# ---- pure math -----------------------------------------------------------------------------------

def join_prefix(layers: list, shape: PrefixShape) -> torch.Tensor:
    """The flat prefix (tokens x layers*2*kv_heads*head_dim) of per-layer (keys, values), each
    (kv_heads x tokens x head_dim): the inverse of ``prompting.split_prefix``."""
    stacked = torch.stack([torch.stack([keys, values]) for keys, values in layers])  # layers, 2, heads, tokens, dim
    return stacked.permute(3, 0, 1, 2, 4).reshape(stacked.shape[3], shape.flat)


def text_cache(model: nn.Module, stack: nn.Module, ids: list, shape: PrefixShape, method: str) -> torch.Tensor:
    """The base model's KV cache of the tokens ``ids`` (one sequence) through ``model``'s backbone
    ``stack``, as a flat prefix."""
    weight = stack.get_input_embeddings().weight
    if max(ids) >= weight.shape[0]:
        raise ConfigError(f"{method}: init_ids has token id {max(ids)}, but the model's vocabulary has "
                          f"{weight.shape[0]} tokens; use the model's own tokenizer")
    quiet = disabled(model) if getattr(get_state(model), "configs", None) else contextlib.nullcontext()
    with quiet, torch.no_grad():  # the base model's own cache, whatever other adapters the model carries
        output = stack(input_ids=torch.tensor([ids], device=weight.device), use_cache=True)
    cache = kv_cache.from_output(output)
    if cache is None or not hasattr(cache, "layers") or len(cache.layers) != shape.layers:
        raise TargetError(f"{method}: init=text needs the base model's KV cache of the text, but "
                          f"{type(stack).__name__} returned none (an encoder such as BERT keeps no cache); use init=random")
    return join_prefix([(layer.keys[0], layer.values[0]) for layer in cache.layers], shape)


# ---- module ----------------------------------------------------------------------------------------

class Cartridge(KVPrefix):
    """The KV prefix as two parameters, the fixed leading tokens (``frozen_embedding``, never
    trained) and the rest (``trainable_embedding``), in HF PEFT's flat layout."""

    def __init__(self, stack: nn.Module, length: int, shape: PrefixShape, hidden, factory: dict, frozen: int = 1):
        super().__init__(stack, length, shape)
        initial = torch.randn(length, shape.flat, **factory)
        self.frozen_embedding = nn.Parameter(initial[:frozen].clone(), requires_grad=False)
        self.frozen_embedding.peftlab_trainable = False  # stays fixed whenever the adapter is made active
        self.trainable_embedding = nn.Parameter(initial[frozen:].clone())

    def prefix(self) -> torch.Tensor:
        return torch.cat([self.frozen_embedding, self.trainable_embedding])

    def set_prefix(self, value: torch.Tensor) -> None:
        frozen = self.frozen_embedding.shape[0]
        with torch.no_grad():
            self.frozen_embedding.copy_(value[:frozen])
            self.trainable_embedding.copy_(value[frozen:])

    def export_state(self) -> dict:
        return {SAVED_KEY: self.prefix().detach()}

    def import_state(self, tensors: dict) -> None:
        self.set_prefix(check_saved(tensors, (self.length, self.shape.flat), "cartridge"))


Config = CartridgeConfig


def make_model_adapter(model: nn.Module, config: CartridgeConfig) -> Cartridge:
    module = make_prefix(model, config, hidden=None, kind=functools.partial(Cartridge, frozen=config.frozen))
    if config.init == "text":
        ids = repeat_to_length(text_ids(config), config.length)
        module.set_prefix(text_cache(model, module._backbone, ids, module.shape, config.method))
    return module
