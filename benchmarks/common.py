"""What the SmolLM2 benchmark scripts share: the model cached as fp32 safetensors (so every
process loads it the same cheap way), and a sampler of the process's resident memory."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("PEFTLAB_BENCH_CACHE", "/tmp/peftlab-bench")) / "smollm2-135m-fp32"


def cached_model_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized once from its GGUF to fp32 safetensors, with its tokenizer."""
    if not (CACHE / "model.safetensors").exists() or not (CACHE / "tokenizer_config.json").exists():
        from safetensors.torch import save_model

        from peftlab.models import load_model

        model, tokenizer = load_model("smollm2-135m")
        CACHE.mkdir(parents=True, exist_ok=True)
        model.config.to_json_file(CACHE / "config.json")
        tokenizer.save_pretrained(CACHE)
        save_model(model, str(CACHE / "model.safetensors"))
    return CACHE


def load_cached_model():
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = cached_model_dir()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    load_model(model, str(folder / "model.safetensors"))
    return model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Samples resident memory every millisecond while running; ru_maxrss would include model loading."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.join()
