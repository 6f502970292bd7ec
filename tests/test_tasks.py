"""peftlab.tasks: the built-in extract task's generator, and generation / exact-match evaluation."""
from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from peftlab.tasks import extract
from peftlab.tasks.generation import chat_prompt, evaluate, exact_match, generate, response_token_budget

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable ASCII character, ChatML special tokens; built offline in milliseconds."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML if chat_template else None
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=3, bos_token_id=2)
    return LlamaForCausalLM(config).float().eval()


# ---- the extract task ---------------------------------------------------------------------------

def test_rows_are_deterministic_by_seed():
    assert extract.make_rows(50, seed=3) == extract.make_rows(50, seed=3)
    assert extract.make_rows(50, seed=3) != extract.make_rows(50, seed=4)
    # the held-out rows do not depend on how many training rows were asked for
    assert extract.make_splits(10, 20, seed=1)[1] == extract.make_splits(500, 20, seed=1)[1]
    # a longer list starts with the shorter one
    assert extract.make_rows(80, seed=3)[:50] == extract.make_rows(50, seed=3)


def test_rows_are_distinct_and_well_formed():
    train, test = extract.make_splits(1000, 100, seed=0)
    assert len(train) == 1000 and len(test) == 100
    for rows in (train, test):
        assert len({r["prompt"] for r in rows}) == len(rows)
    for row in train + test:
        assert set(row) == {"prompt", "response"}
        assert row["prompt"].startswith(extract.INSTRUCTION)
        record = json.loads(row["response"])  # one line of valid JSON
        assert "\n" not in row["response"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", record["date"])
        assert record["type"] in ("invoice", "event")
        if record["type"] == "invoice":
            assert isinstance(record["amount"], int) and record["amount"] > 0
            assert record["customer"] in row["prompt"] and record["vendor"] in row["prompt"]
        else:
            assert record["event"] in extract.EVENTS
            assert record["who"] in row["prompt"] and record["city"] in row["prompt"]


def _values(row):
    record = json.loads(row["response"])
    names = [record.get("customer") or record.get("who")]
    first, last = names[0].split(" ")
    head = record["vendor"].rsplit(" ", 1)[0] if "vendor" in record else None  # "Blue Peak Labs" -> "Blue Peak"
    return {first, last, head} - {None}


def test_held_out_split_uses_values_training_never_sees():
    train, test = extract.make_splits(2000, 200, seed=0)
    for pool in (extract.FIRST, extract.LAST, extract.COMPANY_HEADS, extract.CITIES):
        assert len(set(pool)) == len(pool)
    assert not set(extract.CITIES) & set(extract.FIRST + extract.LAST + extract.COMPANY_HEADS)
    train_values = set().union(*(_values(r) for r in train))
    test_values = set().union(*(_values(r) for r in test))
    assert not train_values & test_values
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    # every open value pool is split in two non-empty parts
    assert all(extract.held_out_pool(pool, True) and extract.held_out_pool(pool, False)
               for pool in (extract.FIRST, extract.LAST, extract.COMPANY_HEADS))


def test_dates_and_amounts_are_normalized():
    import random

    rng = random.Random(0)
    styles = {extract.format_date(rng, 2024, 3, 5) for _ in range(200)}
    assert styles == {"March 5, 2024", "5 March 2024", "Mar 5, 2024", "2024/03/05"}
    amounts = {extract.format_amount(rng, 1250) for _ in range(200)}
    assert amounts == {"$1,250", "1250 USD", "USD 1,250", "$1250"}
    for row in extract.make_rows(300, seed=5):
        record = json.loads(row["response"])
        year, month, day = map(int, record["date"].split("-"))
        written = [f"{extract.MONTHS[month - 1]} {day}, {year}", f"{day} {extract.MONTHS[month - 1]} {year}",
                   f"{extract.MONTHS[month - 1][:3]} {day}, {year}", f"{year}/{month:02d}/{day:02d}"]
        assert any(w in row["prompt"] for w in written)
        if record["type"] == "invoice":
            a = record["amount"]
            assert any(w in row["prompt"] for w in (f"${a:,}", f"{a} USD", f"USD {a:,}", f"${a}"))


def test_bad_split_name():
    with pytest.raises(ValueError, match="split"):
        extract.make_rows(3, split="dev")


# ---- exact match and generation -----------------------------------------------------------------

def test_exact_match_strips_whitespace_only():
    assert exact_match(["a", " b\n", "c"], ["a", "b", "C"]) == pytest.approx(2 / 3)
    assert exact_match(['{"a":1}'], ['{"a": 1}']) == 0.0  # whitespace inside counts
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_chat_prompt_uses_the_template_and_the_system_message():
    tok = char_tokenizer()
    text = chat_prompt(tok, "hi", system="be brief")
    assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(char_tokenizer(chat_template=False), "hi", system="s") == "s\n\nhi\n"


class AnswerBook(torch.nn.Module):
    """A stand-in model whose ``generate`` reads each (left-padded) prompt back and appends a
    canned answer and an end token, then pads: it checks the batching, padding and decoding
    around ``model.generate`` without a real network."""

    def __init__(self, tokenizer, answers: dict):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.answers, self.calls = tokenizer, answers, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["use_cache"] is True
        assert (attention_mask[:, -1] == 1).all(), "prompts must be left-padded"
        self.calls.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            question = prompt.split("user\n")[1].split("<|im_end|>")[0]
            answer = self.tokenizer(self.answers[question], add_special_tokens=False)["input_ids"][:max_new_tokens]
            rows.append(ids.tolist() + answer + [eos_token_id[0]])
        width = max(map(len, rows))
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_evaluate_scores_exact_match_in_input_order():
    tok = char_tokenizer()
    rows = [{"prompt": "q" * (i % 4 + 1) + str(i), "response": f"answer {i}"} for i in range(10)]
    answers = {r["prompt"]: (r["response"] if i % 3 else "  " + r["response"] + " \n") for i, r in enumerate(rows)}
    answers[rows[4]["prompt"]] = "wrong"
    answers[rows[7]["prompt"]] = "answer 77"
    model = AnswerBook(tok, answers)
    result = evaluate(model, tok, rows, system="sys", batch_size=4, keep=10)
    assert result["exact_match"] == pytest.approx(8 / 10)
    assert result["n"] == 10 and model.calls == [4, 4, 2]
    assert [s["prompt"] for s in result["samples"]] == [r["prompt"] for r in rows]
    assert result["samples"][4]["prediction"] == "wrong"
    assert result["max_new_tokens"] == response_token_budget(tok, [r["response"] for r in rows])
    custom = {"question": "a", "answer": "x"}
    model = AnswerBook(tok, {"a": "x"})
    assert evaluate(model, tok, [custom], prompt_key="question", response_key="answer")["exact_match"] == 1.0


def test_batched_left_padded_generation_matches_one_at_a_time():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    prompts = ["a", "longer prompt here", "mid size", "x" * 30, "To JSON: Ana paid $5."]
    batched = generate(model, tok, prompts, system="s", max_new_tokens=6, batch_size=5)
    single = [generate(model, tok, [p], system="s", max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(len(out) <= 6 for out in batched)  # one character per token
    assert not model.training


def test_generation_restores_training_mode():
    tok = char_tokenizer()
    model = tiny_llama(len(tok)).train()
    generate(model, tok, ["a"], max_new_tokens=2)
    assert model.training
