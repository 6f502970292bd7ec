"""Chat-templated batched greedy generation and exact-match evaluation.

Used by every generation task, by ``peftlab generate`` and by the default ``peftlab train`` job.
"""
from __future__ import annotations

import contextlib
import time

import torch


def chat_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text the model sees before its answer: the tokenizer's chat template with a
    generation prompt, or ``system\\n\\nprompt\\n`` for tokenizers without one.

    Pass a short ``system`` with chat models that otherwise insert a long default system prompt
    (SmolLM2 does)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (f"{system}\n\n" if system else "") + prompt + "\n"


def stop_token_ids(model, tokenizer) -> list[int]:
    ids = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (config_eos, tokenizer.eos_token_id):
        for i in (value if isinstance(value, (list, tuple)) else [value]):
            if i is not None and i not in ids:
                ids.append(int(i))
    return ids


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def generate(model, tokenizer, prompts: list[str], *, system: str | None = None, max_new_tokens: int = 64,
             batch_size: int = 16, chat: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` (batched, left-padded, KV cache), in input order."""
    return _generate(model, tokenizer, prompts, system, max_new_tokens, batch_size, chat)[0]


class _StopWhenWrong:
    """A stopping criterion: a row is finished as soon as its text can no longer equal its
    reference after stripping (its stripped text is not a prefix of the stripped reference).
    Exact match is unchanged, and an untrained model's rows, which go wrong within a few
    tokens, stop there instead of running to max_new_tokens."""

    def __init__(self, tokenizer, references: list[str], start: int):
        self.tokenizer, self.start = tokenizer, start
        self.references = [r.strip() for r in references]
        self.wrong = [False] * len(references)

    def __call__(self, input_ids, scores=None, **kwargs):
        for j, reference in enumerate(self.references):
            if not self.wrong[j]:
                text = self.tokenizer.decode(input_ids[j, self.start:], skip_special_tokens=True).strip()
                self.wrong[j] = not reference.startswith(text)
        return torch.tensor(self.wrong, dtype=torch.bool, device=input_ids.device)


def _generate(model, tokenizer, prompts, system, max_new_tokens, batch_size, chat=True, references=None):
    """(completions, cut) where ``cut[i]`` says row i was stopped early as certainly wrong
    (only with ``references``)."""
    from transformers import StoppingCriteriaList

    texts = [chat_prompt(tokenizer, p, system) if chat else p for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    outputs, cut = [""] * len(texts), [False] * len(texts)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):  # left padding: every row's last prompt token is at the same place
                ids[j, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[j, width - len(encoded[i]):] = 1
            guard = _StopWhenWrong(tokenizer, [references[i] for i in rows], width) if references is not None else None
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, use_cache=True,
                pad_token_id=pad_id, eos_token_id=eos,
                **({"stopping_criteria": StoppingCriteriaList([guard])} if guard is not None else {}),
            )
            for j, i in enumerate(rows):
                outputs[i] = tokenizer.decode(out[j, width:], skip_special_tokens=True)
                cut[i] = bool(guard is not None and guard.wrong[j])
    return outputs, cut


def normalize(text: str) -> str:
    return text.strip()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return 0.0
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(references)


def response_token_budget(tokenizer, responses: list[str], margin: int = 4) -> int:
    """max_new_tokens just above the longest reference response (plus the end-of-turn token)."""
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses), default=32)
    return longest + margin


def evaluate(model, tokenizer, rows: list[dict], *, system: str | None = None, prompt_key: str = "prompt",
             response_key: str = "response", batch_size: int = 32, max_new_tokens: int | None = None,
             keep: int = 3, stop_when_wrong: bool = True) -> dict:
    """Greedy generation over ``rows`` scored by exact match; returns
    ``{"exact_match", "n", "seconds", "max_new_tokens", "samples": [...first keep rows...]}``.

    With ``stop_when_wrong`` a row stops generating once it can no longer match its reference
    (same score, much faster for a model that is mostly wrong); such a sample's prediction is the
    text up to the first wrong token and carries ``"cut": true``."""
    prompts = [r[prompt_key] for r in rows]
    references = [str(r[response_key]) for r in rows]
    if max_new_tokens is None:
        max_new_tokens = response_token_budget(tokenizer, references)
    start = time.perf_counter()
    predictions, cut = _generate(model, tokenizer, prompts, system, max_new_tokens, batch_size,
                                 references=references if stop_when_wrong else None)
    seconds = time.perf_counter() - start
    samples = []
    for p, r, o, c in list(zip(prompts, references, predictions, cut))[:keep]:
        samples.append({"prompt": p, "reference": r, "prediction": o, **({"cut": True} if c else {})})
    return {
        "exact_match": exact_match(predictions, references),
        "n": len(rows),
        "seconds": round(seconds, 2),
        "max_new_tokens": max_new_tokens,
        "samples": samples,
    }
