"""Trainable tokens: train a few chosen rows of the embedding table, nothing else (HF PEFT's
``TRAINABLE_TOKENS``, added in peft 0.15; it has no paper of its own: it is selective fine-tuning,
as BitFit or diff pruning, where the selection is whole rows of the vocabulary).

Adding tokens to a vocabulary (chat markers, tool tags) or re-teaching a handful of existing ones
needs those tokens' embeddings to move, but training the whole table (vocab x dim, often a fifth
of a small model's weights) costs its full gradient and optimizer state. Here the chosen ids
``t_1..t_k`` get a trained copy of their rows ``V`` (k x dim) and every other row stays the frozen
base row::

    E'[t_j] = V[j],    E'[i] = E[i] for every other id i

so ``k * dim`` numbers train and the table is never copied: the layer looks the ids up in the base
table as usual and replaces the outputs of the chosen ids with rows of ``V`` (a vocab-sized index
map finds them). ``V`` starts as a copy of the base rows (``init=copy``, PEFT's
``init_weights=True``), so the model is exactly the base at step 0; ``init=random`` draws
standard-normal rows (PEFT's ``init_weights=False``).

Tied weights: when the output head shares its weight with the embedding table (GPT-2, SmolLM2),
the head is wrapped too and reads the same ``V`` (one parameter, not a copy), so the logits of the
chosen tokens are ``h . V[j]`` and input and output stay consistent, as in PEFT. A targeted head
that is not tied gets rows of its own (its output rows for those token ids).

The values are held, as in PEFT, under the name ``trainable_tokens_delta`` although they are the
rows' new values, not differences: a replacement stays well defined when the table was resized
and its new rows re-drawn. Merging writes ``V`` into the chosen rows (keeping the originals to
unmerge); a tied table cannot be merged here (``core`` refuses a weight shared by two modules,
where PEFT merges it once for both).

Reads and writes HF PEFT's ``TRAINABLE_TOKENS`` format exactly (``formats/hf_trainable_tokens.py``).
Differences from HF PEFT:
- ``token_indices`` has no default (PEFT's empty list trains nothing): it must name at least one
  id, without repeats; ``targets`` defaults to the model's input embeddings
  (``input-embeddings``), PEFT's ``target_modules=None``;
- a head with a bias keeps it for the chosen tokens (PEFT's head path drops the head's bias);
- a LoRA file of PEFT's that also trains tokens (``LoraConfig(trainable_token_indices=...)``, rows
  under ``<table>.token_adapter.trainable_tokens_delta``) is read as ``lora|trainable_tokens``
  (one list of ids for all tables); peftlab writes such a union in its own format, not back into
  a LoRA file.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, TargetError

CATEGORY = "selective"
PAPER = "HF PEFT 0.15 (TRAINABLE_TOKENS; no paper of its own)"
MERGEABLE = True
# PEFT documents no rate for it; embedding rows under Adam at LoRA's usual 1e-3 move by about their own
# scale (0.02-0.05) in a few dozen steps, which is what learning a new token's row needs
DEFAULT_LR = 1e-3
INPUT_EMBEDDINGS = "input-embeddings"
INITS = ("copy", "random")
INVALID_SETTINGS = ("token_indices=[]", "token_indices=[-1]", "token_indices=[5,5]", "token_indices=[96]", "init=zeros")
EXAMPLE_SETTINGS = "token_indices=[" + ",".join(str(i) for i in range(3, 96, 2)) + "]"  # half the tiny vocabulary
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.2}  # weights at a pretrained scale: a random tiny model's blocks barely act


@dataclass
class TrainableTokensConfig(MethodConfig):
    """token_indices: the token ids whose embedding rows train (all others stay frozen); targets:
    the embedding table(s), by default the model's input embeddings (a head tied to them follows);
    init: copy (the base rows: the base model at step 0) or random (standard normal)."""

    method: ClassVar[str] = "trainable_tokens"
    targets: Any = INPUT_EMBEDDINGS
    token_indices: list = field(default_factory=list)
    init: str = "copy"

    def validate(self) -> None:
        if self.targets is None:  # PEFT's target_modules=None: the input embeddings
            self.targets = INPUT_EMBEDDINGS
        super().validate()
        if self.init not in INITS:
            raise ConfigError(f"trainable_tokens: init must be one of {', '.join(INITS)}, got {self.init!r}")
        ids = self.token_indices
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = self.token_indices = [ids]
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ConfigError(f"trainable_tokens: token_indices must list the token ids to train, e.g. "
                              f"trainable_tokens[token_indices=[32000,32001]]; got {ids!r}")
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ConfigError(f"trainable_tokens: token_indices must be non-negative integer token ids, got {ids!r}")
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ConfigError(f"trainable_tokens: token_indices lists {repeated} more than once; give each id once")
        self.token_indices = list(ids)


# ---- pure math -------------------------------------------------------------------------------

def replaced_rows(table: torch.Tensor, token_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The whole table with rows ``token_ids`` replaced by ``values`` (what merging writes)."""
    return table.index_copy(0, token_ids.to(table.device), values.to(table))


def embed_with_rows(ids: torch.Tensor, base_out: torch.Tensor, positions: torch.Tensor, values: torch.Tensor,
                    scale=None, pad_row=None) -> torch.Tensor:
    """The embedding output with each chosen id's vector replaced by its row of ``values``
    (``positions[id]``: the row of an id, -1 for an id that is not chosen). ``pad_row``: the row
    of the table's padding id, which gets no gradient (as the padding row of ``nn.Embedding``)."""
    pos = positions[ids]
    new = F.embedding(pos.clamp(min=0), values, padding_idx=pad_row)
    if scale is not None:  # embeddings that scale their output (Gemma's sqrt(dim))
        new = new * scale.to(new.dtype)
    return torch.where((pos >= 0).unsqueeze(-1), new.to(base_out.dtype), base_out)


def head_with_rows(h: torch.Tensor, base_out: torch.Tensor, token_ids: torch.Tensor, values: torch.Tensor,
                   bias=None) -> torch.Tensor:
    """A head's logits with the chosen tokens' logits computed from ``values`` instead."""
    chosen = F.linear(h.to(values.dtype), values, None if bias is None else bias[token_ids])
    return base_out.index_copy(-1, token_ids, chosen.to(base_out.dtype))


# ---- module ----------------------------------------------------------------------------------

class TrainableTokens(nn.Module):
    """Trained rows ``V`` (k x dim) for ``token_ids`` of an ``nn.Embedding`` table or an output head
    (``nn.Linear``, one row per token); a head tied to a wrapped embedding reads that one's ``V``."""

    def __init__(self, base: nn.Module, token_ids: list, init: str = "copy", name: str = ""):
        super().__init__()
        weight = base.weight
        vocab = weight.shape[0]
        too_big = [i for i in token_ids if i >= vocab]
        if too_big:
            raise ConfigError(f"trainable_tokens: token_indices {too_big[:5]} are past the vocabulary of '{name}' "
                              f"({vocab} rows); resize the embeddings first (model.resize_token_embeddings)")
        self.is_embedding = isinstance(base, nn.Embedding)
        ids = torch.tensor(token_ids, dtype=torch.long, device=weight.device)
        self.register_buffer("token_ids", ids, persistent=False)  # from the config: never saved
        if self.is_embedding:
            positions = torch.full((vocab,), -1, dtype=torch.long, device=weight.device)
            self.register_buffer("positions", positions.index_copy(0, ids, torch.arange(len(ids), device=weight.device)),
                                 persistent=False)
            pad = base.padding_idx
            self.pad_row = token_ids.index(pad) if pad is not None and pad in token_ids else None
            scale = getattr(base, "embed_scale", None)
            self.register_buffer("embed_scale", None if scale is None else torch.as_tensor(scale).detach().clone(),
                                 persistent=False)
        with torch.no_grad():
            start = weight[ids].clone() if init == "copy" else torch.randn(len(ids), weight.shape[1]).to(weight)
        self.trainable_tokens_delta = nn.Parameter(start)  # PEFT's name; it holds the rows' values

    @property
    def values(self) -> torch.Tensor:
        owner = self.__dict__.get("values_owner", self)
        return owner.trainable_tokens_delta

    def use_values_of(self, owner: "TrainableTokens") -> None:
        """Read ``owner``'s rows from now on (a head tied to the embedding: one parameter, not two)."""
        del self.trainable_tokens_delta
        self.__dict__["values_owner"] = owner  # a plain reference, not a submodule: registered once

    @property
    def tied(self) -> bool:
        return "values_owner" in self.__dict__

    def layer_output(self, x, base_out, bias=None):
        if self.is_embedding:
            return embed_with_rows(x, base_out, self.positions, self.values, self.embed_scale, self.pad_row)
        return head_with_rows(x, base_out, self.token_ids, self.values, bias)

    def forward(self, x, base_out):
        return self.layer_output(x, base_out, self.__dict__.get("head_bias")) - base_out

    def fused_forward(self, base: nn.Module, x):
        """The base output with the chosen rows replaced: exact, and no difference is formed."""
        return self.layer_output(x, base(x), getattr(base, "bias", None))

    def merge(self, base: nn.Module) -> None:
        with torch.no_grad():
            self.__dict__["originals"] = base.weight[self.token_ids].clone()
            base.weight.copy_(replaced_rows(base.weight, self.token_ids, self.values))

    def unmerge(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.index_copy_(0, self.token_ids, self.__dict__.pop("originals"))

    def detach_from(self, base: nn.Module) -> None:
        """Nothing to give back: the adapter never changed the base."""


# ---- method protocol -------------------------------------------------------------------------

Config = TrainableTokensConfig


def can_wrap(module: nn.Module) -> bool:
    return type(module) in (nn.Embedding, nn.Linear) or isinstance(module, nn.Embedding)


def find_targets(model: nn.Module, config: TrainableTokensConfig) -> list:
    """The named tables (``input-embeddings``: the model's own), plus every module tied to one."""
    from ..core.targets import find_targets as default_targets, named_base_modules, output_head_names

    modules = dict(named_base_modules(model))
    targets = [config.targets] if isinstance(config.targets, str) else list(config.targets)
    if INPUT_EMBEDDINGS in targets:
        get_input = getattr(model, "get_input_embeddings", None)
        embedding = get_input() if callable(get_input) else None
        embedding = getattr(embedding, "base_layer", embedding)  # already wrapped by another adapter
        found = [n for n, m in modules.items() if m is embedding and embedding is not None]
        if found and not can_wrap(embedding):
            raise ConfigError(f"trainable_tokens: the input embeddings ('{found[0]}') are a {type(embedding).__name__}; "
                              "trainable tokens replace rows of a full-precision nn.Embedding table (quantize the model "
                              "without embeddings=True)")
        targets = [t for t in targets if t != INPUT_EMBEDDINGS] + (["re:" + re.escape(n) for n in found[:1]]
                                                                  or ["embed_tokens"])
    names = default_targets(model, dataclasses.replace(config, targets=targets), can_wrap)
    heads = output_head_names(model)
    rowless = [n for n in names if not isinstance(modules[n], nn.Embedding) and n not in heads]
    if rowless:
        raise TargetError(f"trainable_tokens: {rowless[:3]} are linear layers inside the model, whose rows are not tokens; "
                          "target the embedding table (the default) or the output head")
    weights = {id(modules[n].weight) for n in names}
    tied = [n for n, m in modules.items() if n not in names and can_wrap(m) and id(getattr(m, "weight", None)) in weights]
    return [n for n in modules if n in set(names) | set(tied)]


def make_adapter(module: nn.Module, config: TrainableTokensConfig, name: str) -> TrainableTokens:
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise ConfigError(f"trainable_tokens: '{name}' renormalises its rows (max_norm), which replaced rows would skip")
    adapter = TrainableTokens(module, config.token_indices, config.init, name)
    if not adapter.is_embedding and module.bias is not None:
        adapter.__dict__["head_bias"] = module.bias
    return adapter


def after_attach(model: nn.Module, name: str, config: TrainableTokensConfig) -> None:
    """Modules that share one weight (a head tied to the input embeddings) share one set of rows:
    the embedding's (the first module's, when none is an embedding)."""
    from ..core.adapters import method_adapters

    groups = {}
    for module_name, adapter in method_adapters(model, name, config.method):
        base = model.get_submodule(module_name).base_layer
        groups.setdefault(id(base.weight), []).append(adapter)
    for adapters in groups.values():
        owner = next((a for a in adapters if a.is_embedding), adapters[0])
        for adapter in adapters:
            if adapter is not owner:
                adapter.use_values_of(owner)
