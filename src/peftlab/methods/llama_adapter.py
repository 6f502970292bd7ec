"""LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al., 2023,
arXiv:2303.16199).

Why: prefixes and soft prompts disturb a pretrained model from the first step, since random
virtual tokens take attention away from the real ones, which makes early training noisy. LLaMA-
Adapter adds learnable adaption prompts to the top attention layers through a *zero-initialized
gate*: at step 0 the model is exactly the base model, and the gate learns how much of the
prompts to let in (1.2M parameters turned LLaMA-7B into an instruction follower in an hour).

What: in each adapted attention block, ``length`` prompt vectors (``adaption_prompt``, 1 x length
x hidden) go through the block's own key and value projections; the block's queries (recomputed
from its input with the same rotary embeddings) attend to them in a softmax of their own,
scaled by the gate (``adaption_gate``, starts at 0), and the result goes through the output
projection's weight and is added to the block's output::

    delta = W_o (gate * softmax(Q K_p^T / sqrt(d)) V_p)

This is HF PEFT's "adaption prompt" (``ADAPTION_PROMPT``, ``formats/hf_adaption_prompt.py``)
with the same math, initialisation (prompt N(0, 1), gate 0) and tensor names. One difference:
the bias of the output projection (Llama has none) is not added a second time, as the paper's
math (one output projection of the sum) implies.

Attaches to Llama-architecture attention blocks (Llama, Mistral, Qwen2...: ``q/k/v/o_proj`` with
rotary position embeddings); other architectures are a clear TargetError. ``layers=N`` adapts
the top N blocks (the paper: 30 of LLaMA-7B's 32), a list adapts those block indices, none (the
default) every block. Mergeable: no (a second attention over the prompts, not a weight change).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import MethodConfig
from ..errors import ConfigError, StateError, TargetError
from .prompting import check_length

CATEGORY = "additive"
PAPER = "Zhang et al., 2023 (arXiv:2303.16199)"
MERGEABLE = False
DEFAULT_LR = 9e-3  # the paper's
INVALID_SETTINGS = ("length=0", "layers=0", "layers=-2")
ARCHITECTURES = ("llama",)  # the registry's test architectures this method supports (others: TargetError)
# The registry tests' tiny Llama with weights at a pretrained scale: the zero-init gate opens slowly,
# and on a near-uniform random model a few steps barely move the loss.
EXAMPLE_MODEL_SETTINGS = {"initializer_range": 0.5}
LLAMA_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "config")


@dataclass
class LlamaAdapterConfig(MethodConfig):
    """length: adaption prompt tokens per block; layers: the top N blocks (an int), these block
    indices (a list), or every block (none)."""

    method: ClassVar[str] = "llama_adapter"
    targets: Any = "attention"
    length: int = 10
    layers: Any = None

    def validate(self) -> None:
        top = self.layers
        if not isinstance(top, int) or isinstance(top, bool):
            super().validate()
        else:  # a count of blocks from the top, which MethodConfig would read as one block index
            if top <= 0:
                raise ConfigError(f"{self.method}: layers=N adapts the top N blocks and must be positive, got {top}; "
                                  "list block indices as layers=[...]")
            self.layers = None
            try:
                super().validate()
            finally:
                self.layers = top
        check_length(self)

    def block_indices(self, num_blocks: int) -> list | None:
        if not isinstance(self.layers, int):
            return self.layers
        if self.layers > num_blocks:
            raise TargetError(f"{self.method}: layers={self.layers} asks for the top {self.layers} blocks, but the model "
                              f"has {num_blocks}")
        return list(range(num_blocks - self.layers, num_blocks))


# ---- pure math -------------------------------------------------------------------------------------

def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (batch x heads x tokens x head_dim), cos/sin (batch x tokens x head_dim)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated_half * sin[:, None]


def gated_prompt_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                           gate: torch.Tensor) -> torch.Tensor:
    """``gate * softmax(Q K^T / sqrt(d)) V``: the queries (batch x heads x tokens x d) attending to the
    prompt's keys and values (1 x heads x length x d) in a softmax of their own (fp32, as HF PEFT)."""
    scores = query @ keys.transpose(2, 3) / math.sqrt(query.shape[-1])
    weights = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return weights @ values


# ---- module ----------------------------------------------------------------------------------------

def is_llama_attention(module: nn.Module) -> bool:
    return all(hasattr(module, part) for part in LLAMA_PARTS)


class AdaptionPrompt(nn.Module):
    """Returns what the gated adaption prompt adds to its attention block's output."""

    wants_call = True  # reads the block's rotary position embeddings

    def __init__(self, attention: nn.Module, length: int):
        super().__init__()
        config = attention.config
        weight = attention.q_proj.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.adaption_prompt = nn.Parameter(torch.randn(1, length, config.hidden_size, device=weight.device, dtype=dtype))
        self.adaption_gate = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))  # zero-init: the base at step 0
        self.__dict__["_attention"] = attention  # a plain reference, not a submodule

    def forward(self, hidden, base_out, args, kwargs):
        attention = self._attention
        cos, sin = position_embeddings(args, kwargs)
        batch, tokens = hidden.shape[:2]
        head_dim, groups = attention.head_dim, attention.config.num_attention_heads // attention.config.num_key_value_heads
        query = attention.q_proj(hidden).view(batch, tokens, -1, head_dim).transpose(1, 2)
        query = rotate(query, cos, sin)
        length = self.adaption_prompt.shape[1]
        keys = attention.k_proj(self.adaption_prompt).view(1, length, -1, head_dim).transpose(1, 2)
        values = attention.v_proj(self.adaption_prompt).view(1, length, -1, head_dim).transpose(1, 2)
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
        mixed = gated_prompt_attention(query, keys.to(query.dtype), values.to(query.dtype), self.adaption_gate)
        out = attention.o_proj(mixed.transpose(1, 2).reshape(batch, tokens, -1))
        bias = attention.o_proj.bias
        return out if bias is None else out - bias


def position_embeddings(args, kwargs):
    found = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if found is None:
        raise StateError("llama_adapter: the attention block was called without position_embeddings (cos, sin); "
                         "it supports Llama-architecture models of transformers 4.48 or newer")
    return found


Config = LlamaAdapterConfig


def can_wrap(module: nn.Module) -> bool:
    """Any attention block, so that a non-Llama one gets a clear error from ``make_adapter``."""
    return "Attention" in type(module).__name__ or is_llama_attention(module)


def make_adapter(module: nn.Module, config: LlamaAdapterConfig, name: str) -> AdaptionPrompt:
    if not is_llama_attention(module):
        raise TargetError(f"llama_adapter: '{name}' is a {type(module).__name__}; LLaMA-Adapter supports Llama-architecture "
                          "attention blocks (Llama, Mistral, Qwen2...: q_proj, k_proj, v_proj and o_proj with rotary "
                          "position embeddings)")
    return AdaptionPrompt(module, config.length)
