"""A quantized token embedding table (``peftlab.quantize(model, fmt, embeddings=True)``).

QLoRA keeps the embeddings in 16/32 bits, but a small model's vocabulary is a large part of it:
SmolLM2-135M's table (49,152 x 576, tied to the output head) is ~21% of its parameters. A
``QuantizedEmbedding`` stores the table as a quantized linear layer of shape (vocab x dim), built
by the same builders as every other quantized layer (nf4 / fp4, int8, int4), and looks token ids
up in it. When the output head is tied to the input embeddings (SmolLM2, GPT-2), the head becomes
that same quantized layer object: one storage, counted once.

Lookups dequantize only the rows asked for where the format stores whole rows (int8, int4, and
4-bit when the row width is a multiple of its 64-weight blocks); otherwise the whole table is
dequantized for each lookup (vocab x dim floats for the duration of the call).

To peftlab's walk over the base model (``core.targets.named_base_modules``) a
``QuantizedEmbedding`` is one module whose own parameter is ``weight``, like the ``nn.Embedding`` it
replaced: its table is no separate target (``all-linear`` does not pick it), the model keeps the
fingerprint of its full-precision original, and a tied head is seen to share its weight (so an
adapter on it cannot be merged, as with full-precision tied embeddings).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError


class QuantizedEmbedding(nn.Module):
    """Token ids -> rows of a quantized (vocab x dim) table ``self.table`` (a quantized linear layer)."""

    base_module_leaf = True  # see the module notes

    def __init__(self, table: nn.Module, padding_idx: int | None = None):
        super().__init__()
        self.table = table
        self.padding_idx = padding_idx

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, build) -> "QuantizedEmbedding":
        """Quantize ``embedding``'s table with ``build`` (``linear -> quantized layer``)."""
        return cls(build(as_linear(embedding.weight)), embedding.padding_idx).train(embedding.training)

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (vocab x dim), read-only: a new tensor at every access."""
        return self.table.dequantize()

    def dequantize(self) -> torch.Tensor:
        return self.table.dequantize()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize_rows(input_ids.reshape(-1))
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """As a module of its own (``recurse=False``): ``weight``, the table's stored weight (see the module notes)."""
        if recurse:
            yield from super().named_parameters(prefix, recurse, remove_duplicate)
        else:
            yield (f"{prefix}." if prefix else "") + "weight", self.table.weight

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


def as_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free linear layer (out x in = vocab x dim) holding ``weight``, for the quantizing builders."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return linear


def embedding_and_head(model: nn.Module) -> tuple[nn.Embedding, nn.Module | None]:
    """``model``'s input embedding table and its output head (None when it has none)."""
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    if embedding is None:
        raise ConfigError(f"quantize: embeddings=True needs a model with get_input_embeddings() (a transformers model); "
                          f"{type(model).__name__} has none, so quantize without embeddings=True")
    if isinstance(embedding, QuantizedEmbedding):
        raise ConfigError("quantize: the input embeddings are already quantized; quantize a fresh model to change their format")
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        raise ConfigError(f"quantize: embeddings=True quantizes a plain nn.Embedding table (without max_norm); this model's "
                          f"input embeddings are a {type(embedding).__name__}: quantize without embeddings=True")
    get_output = getattr(model, "get_output_embeddings", None)
    return embedding, get_output() if callable(get_output) else None
