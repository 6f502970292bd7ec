"""Accuracy of a sequence classifier over rows already turned into examples (``ClassificationData``)."""
from __future__ import annotations

import time

import torch


def accuracy(model, data, batch_size: int = 64) -> dict:
    """``{"accuracy", "n", "seconds"}`` of ``model`` over a ``ClassificationData``-like dataset
    (items with ``labels``, a ``collate`` method)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, start = 0, time.perf_counter()
    try:
        with torch.inference_mode():
            for first in range(0, len(data), batch_size):
                batch = data.collate([data[i] for i in range(first, min(first + batch_size, len(data)))])
                labels = batch.pop("labels")
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                correct += int((logits.argmax(-1).cpu() == labels).sum())
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(len(data), 1), "n": len(data), "seconds": round(time.perf_counter() - start, 2)}
