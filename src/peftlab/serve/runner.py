"""The model runner of the serving engine: a Llama-family decoder driven one step at a time,
with a key/value cache of one slot per running sequence.

Continuous batching (Orca; vLLM) needs what a Hugging Face ``generate`` call does not give:
rows that join and leave the batch at every step, each at its own position. So the runner
walks the decoder's own modules (embedding, norms, q/k/v/o projections, MLP, head) itself.

``step(tokens, lengths, prompts)`` is one forward pass over a packed batch of tokens: the next
token of every running sequence (slots ``0..n-1``, ``lengths[i]`` positions already cached) and
every token of the new sequences' prompts (slots ``n, n+1, ...``). The linear layers see one
(tokens, features) matrix with no padding, so new prompts share the weights' pass with the
running rows instead of paying a forward of their own (Sarathi's piggybacking; vLLM's mixed
prefill/decode batches). Only attention tells the two kinds apart: a running row's token
attends to its slot's cache, a prompt's tokens attend causally to their own prompt. Each token
writes its key and value into its slot at its position, so nothing is recomputed or copied
between steps.

``release(slot, last, length)`` frees a finished sequence's slot by moving the last running
slot's cache into it, so the running rows stay the dense prefix ``0..n-1`` of the cache.

The projections are whatever modules the model holds, so the LoRA bank's wrappers
(``lora_bank.BankedLinear``) run inside every step, routed by token. Grouped-query attention
needs no copies of the shared keys: the query heads that share a key head are laid out as
extra query rows of that head.

On a CPU, the frozen base layers and the head are reordered for oneDNN once (``PackedLinear``):
at this decoder's shapes its fp32 kernel ran 2-4x faster than torch's default path for
``F.linear`` (MKL), e.g. SmolLM2's 49,152-word head on 64 rows in 7.5 ms instead of 29.6 ms,
on the 2-core AMD EPYC we developed on until 2026-11. On the 2-core Intel Xeon that replaced it,
MKL's own path is as fast (a mixed static batch: 1.02x), so the packing gains nothing there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.targets import get_submodule_parent
from ..errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class _Layout:
    """Where each packed token of a step sits, computed once and used by every layer."""

    running: int  # the first ``running`` tokens are the running sequences' next tokens
    span: int  # cache positions the running tokens attend over
    running_mask: torch.Tensor  # (running, 1, 1, span) additive
    new: int  # new sequences, in slots running .. running + new - 1
    width: int  # their longest prompt (the part computed in this step)
    new_span: int  # cache positions their tokens attend over (a cached prefix, then the prompt)
    scatter: torch.Tensor  # prompt token -> its place in the (new * width) padded grid
    new_mask: torch.Tensor  # (new, 1, groups * width, new_span) additive: causal, over the prefix and the prompt
    slots: torch.Tensor  # (tokens,) the cache slot each token writes
    positions: torch.Tensor  # (tokens,) its position there
    last: torch.Tensor  # the token whose logits each sequence needs: running ones, then prompts' ends


class PackedLinear(nn.Module):
    """A frozen linear layer whose weight oneDNN has reordered once into its own blocked layout,
    for CPU inference (the kernel torch's own compiler uses for CPU linear layers).

    oneDNN keeps a compiled kernel, with its own buffers, for every row count it has seen (about
    1 MB each at SmolLM2's shapes), and a server's packed steps have a new row count almost every
    step: unbucketed, a 10-minute soak grew the server by 14%. So rows are padded up to one of a
    few sizes (``padded_rows``: at most 7 rows or 12.5% more), and memory stays flat."""

    def __init__(self, linear: nn.Linear, rows_hint: int = 64):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    @torch.inference_mode()
    def add_to_weight(self, delta: torch.Tensor) -> None:
        """``W += delta`` (out x in), through the plain layout and reordered again (merged serving)."""
        self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight.to_dense() + delta, self.rows_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        size = padded_rows(count)
        if size != count:
            rows = torch.cat([rows, rows.new_zeros(size - count, self.in_features)])
        out = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")
        return out[:count].view(*x.shape[:-1], self.out_features)


def padded_rows(count: int) -> int:
    """``count`` rounded up to a multiple of an eighth of its power of two (at least 8): eight
    sizes per doubling, so a few dozen sizes cover every batch."""
    step = max(8, 1 << max(0, count.bit_length() - 4))
    return -(-count // step) * step


def pack_linears(model: nn.Module, rows_hint: int = 64) -> None:
    """Replace the decoder layers' linear layers and the output head by ``PackedLinear`` (also
    inside the LoRA bank's wrappers, whose deltas stay as they are). Does nothing where this
    torch build's oneDNN kernel is missing or disagrees with ``F.linear``."""
    if not _packing_works():
        return
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and (".layers." in f".{name}" or module is head):
            parent, attr = get_submodule_parent(model, name)
            setattr(parent, attr, PackedLinear(module, rows_hint))


def _packing_works() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.inference_mode():
            probe = nn.Linear(24, 40)
            x = torch.randn(5, 24)
            return torch.allclose(PackedLinear(probe)(x), probe(x), rtol=1e-4, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):  # an op this torch build lacks
        return False


class DecoderRunner:
    def __init__(self, model, max_sequences: int, capacity: int = 256, pack: bool = True):
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
        if pack and self.device.type == "cpu" and self.dtype == torch.float32:
            pack_linears(model, rows_hint=max_sequences)
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

    # ---- a step --------------------------------------------------------------------------

    @torch.inference_mode()
    def read(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """The keys and values of positions ``start..stop-1`` of ``slot``: (layers, 2, kv_heads, positions, head_dim)."""
        return torch.stack([torch.stack((k[slot, :, start:stop], v[slot, :, start:stop]))
                            for k, v in zip(self.keys, self.values)])

    @torch.inference_mode()
    def write(self, slot: int, start: int, cached: torch.Tensor) -> None:
        """Put ``cached`` (as ``read`` gives it) at positions ``start..`` of ``slot``."""
        stop = start + cached.shape[3]
        self._grow(stop)
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            k[slot, :, start:stop] = cached[layer, 0]
            v[slot, :, start:stop] = cached[layer, 1]

    @torch.inference_mode()
    def step(self, tokens: list, lengths: list, prompts: list = (), offsets: list | None = None) -> torch.Tensor:
        """One forward pass: the next token of each running sequence (``tokens[i]`` in slot ``i``,
        after ``lengths[i]`` cached positions) and the prompt of each new sequence (slots
        ``len(tokens), ...``), whose first ``offsets[j]`` positions may already be in its slot (a
        cached prefix, ``write``), so ``prompts[j]`` is the rest. Returns the (running + new, vocab)
        next-token logits, running sequences first."""
        if len(tokens) + len(prompts) > self.max_sequences:
            raise ValueError(f"{len(tokens) + len(prompts)} sequences do not fit {self.max_sequences} cache slots")
        layout = self._layout(lengths, [len(ids) for ids in prompts], offsets or [0] * len(prompts))
        ids = torch.tensor(list(tokens) + [t for ids in prompts for t in ids], device=self.device)
        x = self.decoder.embed_tokens(ids[:, None])  # (tokens, 1, hidden): each token its own row
        cos, sin = self.decoder.rotary_emb(x, layout.positions[None])
        cos, sin = cos[0, :, None], sin[0, :, None]  # (tokens, 1, head_dim)
        for i, layer in enumerate(self.layers):
            x = x + layer.self_attn.o_proj(self._attention(i, layer, x, cos, sin, layout))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        hidden = self.decoder.norm(x[layout.last, 0])
        return self.model.lm_head(hidden).float()

    def _layout(self, lengths: list, prompt_lengths: list, offsets: list) -> _Layout:
        device, running, new = self.device, len(lengths), len(prompt_lengths)
        span = max(lengths, default=0) + 1
        width = max(prompt_lengths, default=0)
        new_span = max((o + n for o, n in zip(offsets, prompt_lengths)), default=0)
        self._grow(max(span, new_span + 1))
        at = torch.tensor(lengths, dtype=torch.long, device=device)
        running_mask = _additive(torch.arange(span, device=device)[None] <= at[:, None], self.dtype)[:, None, None]
        sizes = torch.tensor(prompt_lengths, dtype=torch.long, device=device)
        sequence = torch.repeat_interleave(torch.arange(new, device=device), sizes)
        offset = torch.arange(len(sequence), device=device) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
        start = torch.tensor(offsets, dtype=torch.long, device=device)
        query = start[:, None] + torch.arange(width, device=device)[None]  # (new, width): each query's position
        keys = torch.arange(new_span, device=device)
        visible = (keys[None, None, :] <= query[:, :, None]) & (keys[None, None, :] < (start + sizes)[:, None, None])
        new_mask = _additive(visible, self.dtype).repeat(1, self.groups, 1)[:, None]
        return _Layout(
            running=running, span=span, running_mask=running_mask, new=new, width=width, new_span=new_span,
            scatter=sequence * width + offset, new_mask=new_mask,
            slots=torch.cat([torch.arange(running, device=device), running + sequence]),
            positions=torch.cat([at, torch.repeat_interleave(start, sizes) + offset]),
            last=torch.cat([torch.arange(running, device=device), running + torch.cumsum(sizes, 0) - 1]))

    def _attention(self, i, layer, x, cos, sin, layout: _Layout) -> torch.Tensor:
        attention, count = layer.self_attn, x.shape[0]
        h = layer.input_layernorm(x)
        q = attention.q_proj(h).view(count, self.heads, self.head_dim)
        k = attention.k_proj(h).view(count, self.kv_heads, self.head_dim)
        v = attention.v_proj(h).view(count, self.kv_heads, self.head_dim)
        q, k = rotate(q, k, cos, sin)
        keys, values = self.keys[i], self.values[i]
        keys[layout.slots, :, layout.positions] = k
        values[layout.slots, :, layout.positions] = v
        out = torch.empty_like(q)
        n = layout.running
        if n:  # each running token: its head group's queries over its slot's cache
            grouped = q[:n].view(n, self.kv_heads, self.groups, self.head_dim)
            out[:n] = self._attend(grouped, keys[:n, :, :layout.span], values[:n, :, :layout.span],
                                   layout.running_mask).reshape(n, self.heads, self.head_dim)
        if layout.new:  # the prompts, padded only here, each causal over its own tokens
            m, width = layout.new, layout.width
            padded = q.new_zeros(m * width, self.heads, self.head_dim)
            padded[layout.scatter] = q[n:]
            grouped = padded.view(m, width, self.heads, self.head_dim).transpose(1, 2).reshape(
                m, self.kv_heads, self.groups * width, self.head_dim)
            slots = slice(n, n + m)
            result = self._attend(grouped, keys[slots, :, :layout.new_span], values[slots, :, :layout.new_span],
                                  layout.new_mask)
            result = result.reshape(m, self.heads, width, self.head_dim).transpose(1, 2).reshape(m * width, self.heads,
                                                                                              self.head_dim)
            out[n:] = result[layout.scatter]
        return out.view(count, 1, self.heads * self.head_dim)

    def _attend(self, q, keys, values, mask):
        """Softmax attention of ``q`` (batch, kv_heads, queries, head_dim) over ``keys``/``values``
        (batch, kv_heads, positions, head_dim) with an additive mask. Two batched matmuls: at
        decoding's one-query-per-head shapes this ran 2x faster than the CPU's fused SDPA kernel."""
        scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.scale).add_(mask)
        return torch.matmul(torch.softmax(scores, dim=-1), values)


def _additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """0 where a key is visible, -inf where it is not."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def rotate(q, k, cos, sin):
    """Rotary position embedding (RoFormer, Su et al., 2021) with the model's own cos/sin."""
    return q * cos + _half_turn(q) * sin, k * cos + _half_turn(k) * sin


def _half_turn(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)
