"""What the SmolLM2 benchmark scripts share: the model cached as fp32 safetensors (so every
process loads it the same cheap way), and the process's peak resident memory over a block."""
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


def high_water_mark_bytes() -> int | None:
    """The kernel's peak resident memory of this process (VmHWM), or None where /proc lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_high_water_mark() -> bool:
    """Set VmHWM back to the current resident memory (Linux 4.0+); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakSampler(threading.Thread):
    """The whole process's peak resident memory while the block runs: what ``top`` or ``time -v``
    report, with model loading before the block left out. Read from the kernel's high-water mark
    (VmHWM, reset on entry), which sees every page however briefly it was resident; where the
    reset is not allowed, sampled every millisecond instead."""

    def __init__(self):
        super().__init__(daemon=True)
        self.exact = reset_high_water_mark() and high_water_mark_bytes() is not None
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def stop(self) -> None:
        self.running = False
        self.join()
        if self.exact:
            self.peak = max(self.peak, high_water_mark_bytes())

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
