"""Shared pieces for the tests/test_train_*.py files: a char-level tokenizer with a chat template
and tiny randomly initialised models, all built offline in milliseconds. No tests in here."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

import peftlab

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,?!:")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """One token per character (a BPE model with no merges), special tokens for the chat roles."""
    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()  # characters join without spaces when decoded
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE if chat_template else None
    return tokenizer


def tiny_llama(seed: int = 0, spec: str = "lora[r=4]"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return peftlab.attach(LlamaForCausalLM(config), spec)


BERT_SPEC = "lora[r=4,targets=['query','value'],modules_to_save=['classifier']]"


def tiny_bert(seed: int = 0, num_labels: int = 2, spec: str = BERT_SPEC):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=128, num_labels=num_labels)
    return peftlab.attach(BertForSequenceClassification(config), spec)


def qa_rows(n: int = 16) -> list[dict]:
    """Instruction rows whose answers follow from the questions, so a few steps lower the loss."""
    words = ["cat", "dog", "sun", "red", "one", "two", "sky", "sea"]
    return [{"prompt": f"say {words[i % 8]} twice", "response": f"{words[i % 8]} {words[i % 8]}."} for i in range(n)]
