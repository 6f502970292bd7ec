"""Prefix caching: requests whose prompts start alike, under the same adapter, reuse the keys and
values already computed for that start (vLLM's automatic prefix caching; SGLang's RadixAttention).

A prompt is cut into blocks of ``block_tokens`` tokens. Each full block is named by a hash of the
adapter, the block's tokens and the previous block's hash, so a name stands for the whole prefix up
to that block, and one adapter's blocks never serve another's (an adapter changes every layer's keys
and values). The engine names an adapter with its registration (``LoraBank.key``), so an adapter
unloaded and loaded again under the same name never meets the old one's blocks. A joining request looks up its blocks in order and stops at the first miss; its cached
blocks are copied into its cache slot and only the rest of its prompt is prefilled (at least its
last token always is: the next token's logits come from it). After the step, the prompt's full
blocks that were not cached are stored. The store keeps at most ``max_tokens`` positions, least
recently used first out.

Copies, not shared pages: the runner keeps one contiguous cache slot per sequence, so a hit costs
one copy of the cached positions (cheap beside recomputing them through every layer).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from ..errors import ConfigError


class PrefixCache:
    def __init__(self, block_tokens: int = 16, max_tokens: int = 4096):
        if not _is_int(block_tokens) or block_tokens < 1:
            raise ConfigError(f"--prefix-block-tokens must be a positive integer, got {block_tokens!r}")
        if not _is_int(max_tokens) or max_tokens < 0:
            raise ConfigError(f"--prefix-cache-tokens must be a non-negative integer (0: no prefix caching), got {max_tokens!r}")
        self.block_tokens, self.max_blocks = block_tokens, max_tokens // block_tokens
        self.blocks = OrderedDict()  # name -> (layers, 2, kv_heads, block_tokens, head_dim), least recently used first
        self.lock = threading.Lock()
        self.stats = {"hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    def names(self, adapter: str, ids: list) -> list:
        """The names of ``ids``' full blocks (each covering the prompt from its start)."""
        names, previous = [], b""
        b = self.block_tokens
        for start in range(0, len(ids) - len(ids) % b, b):
            digest = hashlib.blake2b(previous, digest_size=16)
            digest.update(adapter.encode() + b"\0")
            digest.update(torch.tensor(ids[start:start + b], dtype=torch.int64).numpy().tobytes())
            previous = digest.digest()
            names.append(previous)
        return names

    def lookup(self, adapter: str, ids: list) -> tuple[int, list]:
        """(cached positions, their blocks in order): the longest cached start of ``ids``, leaving at
        least the last token to compute."""
        if not self.max_blocks:
            return 0, []
        usable = self.names(adapter, ids[:-1])
        found = []
        with self.lock:
            for name in usable:
                block = self.blocks.get(name)
                if block is None:
                    break
                self.blocks.move_to_end(name)
                found.append(block)
        return len(found) * self.block_tokens, found

    def store(self, adapter: str, ids: list, cached: int, read) -> None:
        """Keep ``ids``' full blocks from position ``cached`` on; ``read(start, stop)`` gives the
        (layers, 2, kv_heads, positions, head_dim) keys and values of those positions."""
        if not self.max_blocks:
            return
        b = self.block_tokens
        with self.lock:
            for index, name in enumerate(self.names(adapter, ids)):
                if index * b < cached or name in self.blocks:
                    continue
                self.blocks[name] = read(index * b, (index + 1) * b).clone()
                self.stats["stored_blocks"] += 1
                while len(self.blocks) > self.max_blocks:
                    self.blocks.popitem(last=False)
                    self.stats["evicted_blocks"] += 1

    def cached_tokens(self) -> int:
        with self.lock:
            return len(self.blocks) * self.block_tokens


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
