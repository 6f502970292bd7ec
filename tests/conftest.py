"""Shared fixtures: tiny randomly initialised models built from configs (no downloads).

Every model is fp32, in eval mode, and built under a fixed seed, so two calls of the same
factory give bit-identical weights (handy for "the original model" comparisons).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

torch.set_num_threads(1)  # the machine is shared; tiny models do not need more
# no example database in the checkout (.hypothesis/), no flaky deadlines on a shared machine
settings.register_profile("peftlab", database=None, deadline=None)
settings.load_profile("peftlab")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB = 96
HIDDEN = 32


def _build(config, cls, seed):
    torch.manual_seed(seed)
    model = cls(config)
    return model.float().eval()


def make_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return _build(LlamaConfig(**settings), LlamaForCausalLM, seed)


def make_bert(seed: int = 0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    settings = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, num_labels=3,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, attn_implementation="eager",
    )
    settings.update(overrides)
    return _build(BertConfig(**settings), BertForSequenceClassification, seed)


def make_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = dict(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64,
        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, attn_implementation="eager",
        bos_token_id=1, eos_token_id=2,
    )
    settings.update(overrides)
    return _build(GPT2Config(**settings), GPT2LMHeadModel, seed)


@pytest.fixture
def llama():
    return make_llama()


@pytest.fixture
def bert():
    return make_bert()


@pytest.fixture
def gpt2():
    return make_gpt2()


@pytest.fixture
def ids():
    """A (3 x 7) batch of token ids, no padding."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (3, 7), generator=g)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def randomize_adapters(model, seed: int = 0, std: float = 0.1):
    """Give every adapter parameter random values, so an adapter is no longer a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "adapters." in name:
                if "magnitude" in name:
                    p.mul_(1 + std * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture
def fake_models(monkeypatch):
    """load_model -> a tiny random Llama (same weights every call) with a char tokenizer; or a
    tiny BERT classifier. Records every call."""
    import peftlab.models
    from test_tasks import char_tokenizer, tiny_llama

    calls = []

    def fake_load_model(name_or_path="tiny", task="causal-lm", num_labels=2, device="auto", **kwargs):
        calls.append({"name": name_or_path, "task": task, "num_labels": num_labels})
        tokenizer = char_tokenizer()
        if task == "sequence-classification":
            from transformers import BertConfig, BertForSequenceClassification
            torch.manual_seed(0)
            config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128, num_labels=num_labels)
            model = BertForSequenceClassification(config).eval()
        else:
            model = tiny_llama(len(tokenizer))
        model.config._name_or_path = name_or_path
        return model, tokenizer

    monkeypatch.setattr(peftlab.models, "load_model", fake_load_model)
    return calls


def random_lm_rows(count: int = 6, length: int = 8, seed: int = 0) -> list[dict]:
    """Rows of random token ids over the tiny models' vocabulary, each its own label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (count, length), generator=g)
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def random_lm_batches() -> list[dict]:
    """Two batches of three ``random_lm_rows``."""
    data = random_lm_rows()
    return [{k: torch.stack([r[k] for r in data[i:i + 3]]) for k in data[0]} for i in (0, 3)]


def model_loss(model, batch):
    return model(**batch).loss


class Killed(Exception):
    pass


def dies_at_forward(model, call: int) -> None:
    """Make the backbone's forward number ``call`` raise, as if the process were killed there."""
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) == call:
            raise Killed(f"killed at forward {call}")

    model.base_model.register_forward_pre_hook(hook)


def peft_logits(factory, folder, ids):
    """Logits of ``factory()`` with the adapter in ``folder`` loaded by HF PEFT."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(factory(), str(folder)).eval()
    return logits(model, ids)


def assert_peft_adapter_loads_and_goes_back(factory, folder, ids, expected, quiet: bool = False):
    """The HF PEFT adapter in ``folder`` gives ``expected`` in peftlab, and peftlab's save of it
    gives ``expected`` in HF PEFT again. ``quiet`` silences warnings (peft warns, for one, when it
    regenerates a frozen projection from its key)."""
    import warnings

    import peftlab

    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        ours = peftlab.load(factory(), folder)
        torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
        peftlab.save(ours, folder / "again")
        torch.testing.assert_close(peft_logits(factory, folder / "again", ids), expected, rtol=0, atol=1e-5)


def read_adapter_config(folder) -> dict:
    """The ``adapter_config.json`` in ``folder``, parsed."""
    import json
    from pathlib import Path

    return json.loads((Path(folder) / "adapter_config.json").read_text())


def assert_peftlab_file_loads_in_peft(model, factory, ids, folder, peft_type: str, matters_atol: float = 1e-3) -> dict:
    """peftlab's half of an HF PEFT twin test. ``model`` is ``factory()`` with a peftlab adapter
    attached (and randomized by the caller): its logits differ from the bare ``factory()``'s (beyond
    ``matters_atol``), peftlab saves it to ``folder`` with ``peft_type`` in adapter_config.json, and
    HF PEFT loading that file on ``factory()`` gives the same logits (atol 1e-5). Returns the saved
    adapter_config for the method's own checks."""
    import peftlab

    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(factory(), ids), atol=matters_atol), "the adapter should matter"
    peftlab.save(model, folder)
    config = read_adapter_config(folder)
    assert config["peft_type"] == peft_type
    torch.testing.assert_close(peft_logits(factory, folder, ids), expected, rtol=0, atol=1e-5)
    return config


def peft_adapter_file(factory, config_class, config_kwargs: dict, folder, ids, randomize=None, seed: int = 3,
                      matters_atol: float = 1e-3, **randomize_kwargs) -> torch.Tensor:
    """HF PEFT's half of a twin test: builds ``peft.get_peft_model(factory(), config_class(**config_kwargs))``
    in eval mode with warnings silenced, calls ``randomize(model, seed=seed, **randomize_kwargs)`` when
    ``randomize`` is given, takes its logits, saves it to ``folder`` with ``save_pretrained``, and
    asserts the adapter matters (logits differ from the bare ``factory()``'s beyond ``matters_atol``).
    Returns those logits: what peftlab must give when it loads ``folder``."""
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), config_class(**config_kwargs)).eval()
        if randomize is not None:
            randomize(theirs, seed=seed, **randomize_kwargs)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(folder))
    assert not torch.allclose(expected, logits(factory(), ids), atol=matters_atol), "the adapter should matter"
    return expected


def assert_config_edit_is_a_format_error(folder, config: dict, edit: dict, match: str, error=None,
                                         factory=None) -> None:
    """Rewrites ``folder``'s adapter_config.json as ``config`` updated by ``edit``; loading it with
    peftlab onto a fresh ``factory()`` (``make_llama`` by default) raises ``error``
    (``peftlab.AdapterFormatError`` by default) matching ``match``, and leaves that model without
    adapter layers."""
    import json
    from pathlib import Path

    import peftlab
    from peftlab.core.layer import AdapterLayer

    (Path(folder) / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    fresh = (factory or make_llama)()
    with pytest.raises(error or peftlab.AdapterFormatError, match=match):
        peftlab.load(fresh, folder)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray for every test of the run that needs one (tests/test_ray.py, test_serve_ray.py)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield ray
    ray.shutdown()
