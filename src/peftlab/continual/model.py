"""The classifier every continual method shares: an encoder and a frozen head of label words.

Why a frozen label-word head. O-LoRA (Wang et al., 2023, arXiv:2310.14152) trains a model that
*generates* the label word, so the output layer is the frozen language-model head and all
learning, and all forgetting, happens in the adapters. A trainable classification head shared by
tasks trained one after another would forget on its own (it drifts toward the classes of the
latest task, whatever the adapters do), and per-task heads would need the task's identity at
test time. Here an encoder (MiniLM by default) is read out the way a sentence-embedding model is:
the mean of its last hidden states over the real tokens, compared by cosine similarity with the
embedding the *base* encoder gives each label word ("Sports", "very negative", "Company", ...),
times a fixed scale. The label embeddings are computed once, before any adapter exists, and
never train. So:

- the head is shared by all tasks over the union of their label words (task-free: no method is
  told the task of a test row; amazon and yelp share their five labels);
- before any training the model is a zero-shot classifier, whose accuracy is the baseline
  ``b_j`` of forward transfer;
- only the continual method's own parameters (LoRAs, prompts, adapters) ever train.

Two label spaces, both with this one head. ``union`` (the default): every row is scored over every
label of every task, and nothing tells the model where a row comes from (class-incremental: the
hardest setting, where a LoRA trained on sentiment alone learns to call everything a sentiment).
``task``: every row is scored over its own task's label words only (a ``label_mask`` in the batch),
the classifier's counterpart of O-LoRA's protocol, whose inputs carry an instruction listing the
task's answer options; the candidate set is the only task information, no method picks parameters
by task.

``forward(input_ids, attention_mask, labels=None)`` returns ``.logits`` (rows x labels) and, given
labels, ``.loss`` (cross-entropy, plus ``penalty()`` when a method sets one, e.g. O-LoRA's
orthogonality term), so ``peftlab.train`` trains it as it trains any classifier. The encoder is
``base_model``: soft prompts attach to it as to any transformers model (``core/model_adapters.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_SCALE = 20.0  # logits = scale * cosine: a softmax over cosines needs a temperature to be sharp
MASKED = -1e4  # the logit of a label that is not among a row's candidates
LABEL_SPACES = ("union", "task")


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the hidden states over the tokens the mask keeps (MiniLM's sentence embedding)."""
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class LabelWordClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, label_embeddings: torch.Tensor, labels: list, scale: float = DEFAULT_SCALE):
        super().__init__()
        self.base_model = encoder
        self.config = getattr(encoder, "config", None)
        self.register_buffer("label_embeddings", F.normalize(label_embeddings.detach().float(), dim=-1))
        self.labels = list(labels)
        self.scale = scale
        self.penalty = None  # a method's extra training loss term: () -> scalar tensor

    def embed(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, label_mask=None) -> Output:
        pooled = F.normalize(self.embed(input_ids, attention_mask, token_type_ids).float(), dim=-1)
        logits = self.scale * pooled @ self.label_embeddings.t()
        if label_mask is not None:  # each row's candidate labels only (finite, so entropies stay defined)
            logits = logits.masked_fill(label_mask.to(logits.device) == 0, MASKED)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.to(logits.device))
            if self.training and self.penalty is not None:
                loss = loss + self.penalty()
        return Output(logits=logits, loss=loss)


@torch.no_grad()
def label_word_embeddings(encoder: nn.Module, tokenizer, labels: list, batch_size: int = 64) -> torch.Tensor:
    """The base encoder's mean-pooled embedding of each label word (labels x hidden)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    rows = []
    try:
        for first in range(0, len(labels), batch_size):
            batch = tokenizer([str(label) for label in labels[first:first + batch_size]], padding=True,
                              return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            rows.append(mean_pool(encoder(**batch)[0], batch["attention_mask"]))
    finally:
        encoder.train(was_training)
    return torch.cat(rows)


def build_classifier(encoder: nn.Module, tokenizer, labels: list, scale: float = DEFAULT_SCALE) -> LabelWordClassifier:
    """The shared classifier over ``labels`` (label words), its head taken from ``encoder`` as it is now."""
    return LabelWordClassifier(encoder, label_word_embeddings(encoder, tokenizer, labels), labels, scale)
