"""Training: data loading and formatting, the training loop, checkpoints.

    from peftlab.train import TrainConfig, train, load_rows, CausalLMData
    rows = load_rows("data.jsonl")
    data = CausalLMData(tokenizer, rows, prompt_key="prompt", response_key="response")
    result = train(model, data, TrainConfig(lr=2e-4, steps=200, out_dir="out", save_every=50))
"""
from .config import TrainConfig, TrainResult
from .data import CausalLMData, ClassificationData, DataError, load_rows, pad_collate
from .loop import train

__all__ = ["TrainConfig", "TrainResult", "train", "load_rows", "CausalLMData", "ClassificationData", "DataError",
           "pad_collate"]
