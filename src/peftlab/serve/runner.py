"""The model runner of the serving engine: a Llama-family decoder driven one step at a time,
with a key/value cache of one slot per running sequence.

Continuous batching (Orca; vLLM) needs what a Hugging Face ``generate`` call does not give:
rows that join and leave the batch at every step, each at its own position. So the runner
walks the decoder's own modules (embedding, norms, q/k/v/o projections, MLP, head) itself:

- ``prefill(first, sequences)`` runs new sequences' prompts (one batch, right-padded) and writes
  their keys and values into their cache slots; running sequences are not touched or recomputed.
- ``decode(tokens, lengths)`` feeds one token for each running sequence (slots
  ``0..n-1``, each at its own length) and returns their next-token logits. Rows of different
  lengths attend over their own slot with a mask; nothing is copied between steps.
- ``release(slot, last)`` frees a finished sequence's slot by moving the last running slot's
  cache into it, so the running rows stay the dense prefix ``0..n-1`` of the cache.

The projections are whatever modules the model holds, so the LoRA bank's wrappers
(``lora_bank.BankedLinear``) run inside every step with the rows' adapters. Grouped-query
attention needs no copies of the shared keys: the query heads that share a key head are laid
out as extra query rows of that head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2")


class DecoderRunner:
    def __init__(self, model, max_sequences: int, capacity: int = 256):
        config = model.config
        kind = getattr(config, "model_type", "?")
        if kind not in SUPPORTED or not hasattr(model, "model") or not hasattr(model.model, "layers"):
            raise ConfigError(f"peftlab serve runs Llama-family decoders ({', '.join(SUPPORTED)}); this model is {kind!r}")
        if kind == "mistral" and getattr(config, "sliding_window", None):
            raise ConfigError("sliding-window attention is not supported by the serving engine yet")
        self.model = model.eval()
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        attention = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.groups = self.heads // self.kv_heads
        self.scale = attention.scaling
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.max_sequences = max_sequences
        self.capacity = 0
        self.keys, self.values = [], []
        self._grow(capacity)

    # ---- the cache -----------------------------------------------------------------------

    @torch.inference_mode()
    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` positions per slot (capacity doubles; existing entries are kept)."""
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity, 16)
        shape = (self.max_sequences, self.kv_heads, capacity, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        for old, new in zip(self.keys + self.values, keys + values):
            new[:, :, : self.capacity] = old
        self.keys, self.values, self.capacity = keys, values, capacity

    @torch.inference_mode()
    def release(self, slot: int, last: int, length: int) -> None:
        """Free ``slot``: the sequence in slot ``last`` (the highest running one, ``length``
        positions long) moves into it, so the running slots stay ``0..n-1``."""
        if slot != last:
            for cache in self.keys + self.values:
                cache[slot, :, :length] = cache[last, :, :length]

    # ---- steps ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, first: int, sequences: list) -> torch.Tensor:
        """Run new sequences' prompts into cache slots ``first, first + 1, ...`` in one forward
        (right-padded to the longest; each row attends to its own tokens only); return the
        (n, vocab) next-token logits."""
        lengths = [len(ids) for ids in sequences]
        n, length = len(sequences), max(lengths)
        self._grow(length + 1)
        tokens = torch.tensor([ids + [0] * (length - len(ids)) for ids in sequences], device=self.device)
        positions = torch.arange(length, device=self.device).expand(n, length)
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        real = positions < torch.tensor(lengths, device=self.device)[:, None]  # (n, length): not padding
        mask = (causal[None] & real[:, None, :]).repeat(1, self.groups, 1)[:, None]  # (n, 1, groups * length, length)
        hidden = self._forward(tokens, positions, mask, slots=slice(first, first + n), write=slice(0, length),
                               span=length)
        last = torch.tensor(lengths, device=self.device) - 1
        return self._logits(hidden[torch.arange(n, device=self.device), last])

    @torch.inference_mode()
    def decode(self, tokens: list, lengths: list) -> torch.Tensor:
        """One token for each running sequence (slots ``0..n-1``; ``lengths[i]`` positions already
        cached); return the (n, vocab) logits of the next tokens."""
        n = len(tokens)
        span = max(lengths) + 1
        self._grow(span)
        at = torch.tensor(lengths, device=self.device)
        positions = at[:, None]
        mask = (torch.arange(span, device=self.device)[None] <= at[:, None])[:, None, None, :]  # (n, 1, 1, span)
        hidden = self._forward(torch.tensor(tokens, device=self.device)[:, None], positions, mask,
                               slots=slice(0, n), write=at, span=span)
        return self._logits(hidden[:, -1])

    def _forward(self, tokens, positions, mask, slots, write, span):
        x = self.decoder.embed_tokens(tokens)
        cos, sin = self.decoder.rotary_emb(x, positions)
        rows, length = tokens.shape
        for i, layer in enumerate(self.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q = attention.q_proj(h).view(rows, length, self.heads, self.head_dim).transpose(1, 2)
            k = attention.k_proj(h).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attention.v_proj(h).view(rows, length, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = rotate(q, k, cos, sin)
            keys, values = self.keys[i], self.values[i]
            if isinstance(write, slice):  # a prefill: one slot, positions 0..length-1
                keys[slots, :, write] = k
                values[slots, :, write] = v
            else:  # a decode step: row r writes its one new position write[r]
                index = torch.arange(rows, device=self.device)
                keys[index, :, write] = k[:, :, 0]
                values[index, :, write] = v[:, :, 0]
            # (rows, kv_heads, groups * length, head_dim): query heads grouped under their key head
            grouped = q.reshape(rows, self.kv_heads, self.groups * length, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, keys[slots, :, :span], values[slots, :, :span],
                                                 attn_mask=mask, scale=self.scale)
            out = out.reshape(rows, self.heads, length, self.head_dim).transpose(1, 2).reshape(rows, length, -1)
            x = x + attention.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.decoder.norm(x)

    def _logits(self, hidden):
        return self.model.lm_head(hidden).float()


def rotate(q, k, cos, sin):
    """Rotary position embedding (RoFormer, Su et al., 2021) with the model's own cos/sin."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _half_turn(q) * sin, k * cos + _half_turn(k) * sin


def _half_turn(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)
