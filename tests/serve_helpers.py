"""Shared pieces for tests/test_serve_*.py: a tiny Llama with a char tokenizer, LoRA adapter
folders for it, and the references a served answer must equal. No tests in here."""
from __future__ import annotations

import copy

import torch

import peftlab
from conftest import make_llama, randomize_adapters
from test_train_helpers import tiny_tokenizer

TARGETS = "[q_proj,k_proj,v_proj,o_proj]"


def tiny_lm(seed: int = 0):
    tokenizer = tiny_tokenizer()
    model = make_llama(seed, vocab_size=len(tokenizer), max_position_embeddings=256, attn_implementation="sdpa",
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return model, tokenizer


def save_adapters(base, folder, count: int, r: int = 4, spec: str | None = None, std: float = 0.3) -> dict:
    """``count`` LoRA adapters with random (non-zero) weights, saved under ``folder``; {name: path}."""
    paths = {}
    for i in range(count):
        model = copy.deepcopy(base)
        peftlab.attach(model, spec or f"lora[r={r},alpha={2 * r},targets={TARGETS}]")
        randomize_adapters(model, seed=100 + i, std=std)
        paths[f"a{i}"] = str(peftlab.save(model, folder / f"a{i}"))
    return paths


def greedy_alone(base, adapter_dir, prompt_ids: list, tokens: int, stop_ids=()) -> list:
    """The greedy tokens of one prompt through peftlab's own single-adapter model (HF generate)."""
    model = copy.deepcopy(base)
    if adapter_dir is not None:
        peftlab.load(model, adapter_dir)
    return _greedy(model, prompt_ids, tokens, stop_ids)


def greedy_peft(base, adapter_dir, prompt_ids: list, tokens: int, stop_ids=()) -> list:
    """The same through HF PEFT."""
    from peft import PeftModel

    model = copy.deepcopy(base)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return _greedy(model, prompt_ids, tokens, stop_ids)


def _greedy(model, prompt_ids, tokens, stop_ids):
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=tokens, do_sample=False, eos_token_id=list(stop_ids) or None,
                             pad_token_id=0)
    new = out[0, len(prompt_ids):].tolist()
    return [t for t in new if t not in stop_ids][: tokens] if not stop_ids else _until_stop(new, stop_ids)


def _until_stop(tokens, stop_ids):
    out = []
    for t in tokens:
        if t in stop_ids:
            break
        out.append(t)
    return out


class Collector:
    """An on_event callback that keeps what the engine sends."""

    def __init__(self):
        self.pieces, self.done, self.error = [], None, None

    def __call__(self, event):
        if "text" in event:
            self.pieces.append(event["text"])
        elif "error" in event:
            self.error = event["error"]
        else:
            self.done = event

    @property
    def text(self) -> str:
        return "".join(self.pieces)
