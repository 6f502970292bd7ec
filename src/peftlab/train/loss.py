"""The causal-LM training loss without the full logits tensor.

A causal LM ends with a head that turns hidden states (N x d) into logits (N x V), then a
cross-entropy. With SmolLM2's V = 49,152 and a batch of 4 x 128 tokens the logits are 100 MB; the
log-softmax and its gradient add two more tensors of that size, more memory than a LoRA adapter and
its optimizer state together, and all of it is written, read and freed at every step. Here the head
and the loss run over a block of rows at a time, and the gradient of the loss with respect to the
hidden states (and to the head's weight when it trains) is computed in the same pass, so at most
one block of logits exists at any moment. Rows whose label is ignored (the prompt of an
instruction pair, padding) never reach the head at all. This is the fused linear cross-entropy of
Liger Kernel (Hsu et al., 2024, arXiv:2410.10989) and Cut Cross-Entropy (Wijmans et al., 2024,
arXiv:2411.09009), written with plain torch ops instead of custom kernels.

``training_loss(model, batch)`` returns the same loss as ``model(**batch).loss`` (to float
rounding). It takes the blockwise path for the causal-LM architectures whose head is a plain
linear layer on the last hidden state (or a quantized one: its dequantized weight, frozen); any
other model (a classifier, a head wrapped by an adapter, an architecture with logit soft-capping)
computes its own loss as usual.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.layers import is_quantized
from .data import IGNORE_INDEX

# Architectures whose logits are exactly ``lm_head(last hidden state)``: no soft-capping (Gemma 2/3),
# logit scale (Cohere, Granite) or auxiliary loss (mixture-of-experts routers) to reproduce.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
BLOCK_ELEMENTS = 1 << 23  # logits per block: 8M floats (32 MB), 170 rows of SmolLM2's vocabulary


class _LinearCrossEntropy(torch.autograd.Function):
    """``mean_i CE(hidden_i @ W^T + b, target_i)`` in blocks of rows; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        count = targets.numel()
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows = max(1, BLOCK_ELEMENTS // weight.shape[0])
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            logits = (h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())).float()
            log_probs = logits.log_softmax(1)
            del logits
            picked = torch.arange(len(t), device=t.device)
            total -= log_probs[picked, t].sum()
            if not (want_h or want_w or want_b):
                continue
            # d loss / d logits = (softmax - one_hot(target)) / count; the 1/count is applied to the
            # (much smaller) products below
            grad = log_probs.exp_()
            grad[picked, t] -= 1.0
            grad = grad.to(hidden.dtype)
            if want_h:
                torch.mm(grad, weight, out=grad_h[start:start + rows])
            if want_w:
                grad_w.addmm_(grad.t().float(), h.float())
            if want_b:
                grad_b += grad.sum(0)
        for g in (grad_h, grad_w, grad_b):
            if g is not None:
                g.div_(count)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        return (None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(w_dtype),
                None if grad_b is None else (grad_b * grad_loss).to(b_dtype),
                None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, rows with
    ``IGNORE_INDEX`` skipped, without materializing the logits. NaN when no row has a target,
    as ``torch.nn.functional.cross_entropy`` gives."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    keep = targets != IGNORE_INDEX
    if not bool(keep.all()):
        hidden, targets = hidden[keep], targets[keep]
    if targets.numel() == 0:
        return hidden.sum() * float("nan")
    if not torch.is_grad_enabled():  # no gradients to make in the same pass (e.g. MeZO's forward-only steps)
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when its logits are exactly ``head(last hidden state)``, else None."""
    from transformers import PreTrainedModel

    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None  # a wrapper (e.g. peft's PeftModel) may not return hidden states from base_model
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, "base_model", None)
    plain = type(head) is nn.Linear or is_quantized(head)
    if not plain or base is None or base is model or head._forward_hooks or head._forward_pre_hooks:
        return None  # an adapter or a hook on the head: let the model compute its own logits
    return head


def training_loss(model: nn.Module, batch: dict, chunked: bool = True) -> torch.Tensor | None:
    """The loss of ``batch``: blockwise for a causal LM with a plain head (when ``chunked``), else
    ``model(**batch).loss`` (None when the model returns no loss). A ``task_ids`` column (one task
    per row, for Poly and multitask prompts) is given to the model through ``peftlab.task_ids``."""
    if "task_ids" in batch:
        from ..core.tasks import task_ids

        batch = dict(batch)
        with task_ids(model, batch.pop("task_ids")):
            return training_loss(model, batch, chunked)
    head = plain_head(model) if chunked and "labels" in batch else None
    if head is None:
        return getattr(model(**batch), "loss", None)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False)[0]
    labels = batch["labels"]
    # position i predicts token i + 1; the last position predicts nothing
    weight = head.dequantize().detach() if is_quantized(head) else head.weight  # a quantized head stays frozen
    return linear_cross_entropy(hidden[:, :-1], weight, head.bias, labels[:, 1:].to(hidden.device))


def group_losses(model: nn.Module, batch: dict, sizes: list[int]) -> list[torch.Tensor]:
    """One mean loss per run of consecutive batch rows (``sizes`` rows each), from a single forward
    of the whole batch: each run's loss is the one ``training_loss`` gives for its rows alone
    (``train_many``'s jobs). The runs are split off, not indexed: a split's backward joins the runs'
    gradients once, where indexing would scatter each into a zero tensor of the whole batch. A causal
    LM with a plain head takes the blockwise path; other models compute logits once, then the mean
    cross-entropy of each run (next-token for 2-D labels, per row for 1-D labels)."""
    import torch.nn.functional as F

    labels = batch["labels"].split(sizes)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head = plain_head(model)
    if head is not None:
        hidden = model.base_model(**inputs, use_cache=False)[0]
        weight = head.dequantize().detach() if is_quantized(head) else head.weight
        return [linear_cross_entropy(h[:, :-1], weight, head.bias, y[:, 1:].to(h.device))
                for h, y in zip(hidden.split(sizes), labels)]
    logits = model(**inputs).logits.split(sizes)
    if labels[0].dim() == 1:  # a classifier: one label per row
        return [F.cross_entropy(z.float(), y.to(z.device)) for z, y in zip(logits, labels)]
    return [F.cross_entropy(z[:, :-1].flatten(0, 1).float(), y[:, 1:].flatten().to(z.device), ignore_index=IGNORE_INDEX)
            for z, y in zip(logits, labels)]
