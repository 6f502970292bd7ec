"""The soft-prompt family: prompt tuning, P-tuning, prefix tuning, P-tuning v2, LLaMA-Adapter.

Each method's defining property, checked against the plain model fed by hand; the sequence
bookkeeping (training with labels, KV-cached and left-padded ``generate``); folding; the clear
errors. Interoperability with HF PEFT is in ``test_prompt_peft.py``.
"""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama
from transformers import DynamicCache

import peftlab
from peftlab.core import kv_cache, model_adapters
from peftlab.methods import prefix as prefix_method
from peftlab.methods import ptuning as ptuning_method
from peftlab.methods.prompting import PrefixShape, split_prefix
from peftlab.train.checkpointing import gradient_checkpointing
from peftlab.train.loss import training_loss

SCALE = dict(initializer_range=0.2)  # weights at a pretrained scale, so virtual tokens visibly matter
SOFT_PROMPTS = ["prompt[length=3]", "ptuning[length=3,hidden=16]", "ptuning[length=3,encoder=lstm,hidden=8]",
                "prefix[length=3,hidden=16]", "ptuning2[length=3]"]
ALL = SOFT_PROMPTS + ["llama_adapter[length=3]"]


def llama(**overrides):
    return make_llama(**{**SCALE, **overrides})


def the_module(model, name="default"):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model, name)]
    return module


def ids_and_mask(rows=3, length=6, seed=1, pad=(0, 2, 0)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for row, count in enumerate(pad):
        mask[row, :count] = 0
        ids[row, :count] = 0
    return ids, mask


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# ---- the defining properties -------------------------------------------------------------------

def test_prompt_tuning_is_the_base_model_fed_the_soft_prompt_first():
    """Lester et al.: the frozen model reads [P; E(x)]; only P (length x hidden) trains."""
    model = peftlab.attach(llama(), "prompt[length=4]")
    prompt = the_module(model).prompt_embeddings
    assert prompt.shape == (4, 32) and prompt.requires_grad
    assert peftlab.summary(model)["trainable"] == 4 * 32
    ids, _ = ids_and_mask(pad=(0, 0, 0))
    base = llama()
    embeds = torch.cat([prompt.detach().expand(3, -1, -1), base.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds).logits[:, 4:]
    torch.testing.assert_close(run(model, ids), expected, rtol=0, atol=1e-6)


def test_prompt_init_from_the_vocabulary_or_a_text():
    table = llama().get_input_embeddings().weight
    vocab = the_module(peftlab.attach(llama(), "prompt[length=5]")).prompt_embeddings
    assert all(any(torch.equal(row, t) for t in table) for row in vocab), "init=vocab: rows of the embedding table"
    text = the_module(peftlab.attach(llama(), "prompt[length=5,init=text,init_ids=[7,8]]")).prompt_embeddings
    torch.testing.assert_close(text, table[[7, 8, 7, 8, 7]], rtol=0, atol=0)
    random = the_module(peftlab.attach(llama(), "prompt[length=400,init=random]")).prompt_embeddings
    assert abs(random.std().item() / table.std().item() - 1) < 0.1, "init=random: the table's scale"


def test_text_init_reads_the_tokenizer_once_and_records_the_ids(tmp_path):
    from test_tasks import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    model = peftlab.attach(llama(), f"prompt[length=4,init=text,init_text=ab,tokenizer='{tmp_path / 'tok'}']")
    config = peftlab.core.state.get_state(model).configs["default"][0]
    expected = char_tokenizer()("ab")["input_ids"]
    assert config.init_ids == expected
    table = llama().get_input_embeddings().weight
    torch.testing.assert_close(the_module(model).prompt_embeddings, table[(expected * 4)[:4]], rtol=0, atol=0)
    with pytest.raises(peftlab.ConfigError, match="could not load tokenizer"):
        peftlab.attach(llama(), f"prompt[init=text,init_text=ab,tokenizer='{tmp_path / 'missing'}']")


@pytest.mark.parametrize("spec", ["prefix[length=3,hidden=16]", "ptuning2[length=3]"])
def test_prefix_is_per_layer_keys_and_values_in_front_of_the_cache(spec):
    """Li & Liang: every layer attends to its own prefix. The model equals the plain model given a
    KV cache that already holds the prefix (and a mask that covers it)."""
    model = peftlab.attach(llama(), spec)
    ids, mask = ids_and_mask()
    shape = PrefixShape(model.config)
    layers = split_prefix(the_module(model).prefix().detach(), shape)
    assert len(layers) == 2 and layers[0][0].shape == (2, 3, 8), "(kv heads, length, head dim) per layer"
    assert not torch.equal(layers[0][0], layers[1][0]), "each layer has its own prefix"
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(layers):
        cache.update(k.expand(3, -1, -1, -1), v.expand(3, -1, -1, -1), i)
    full_mask = torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], 1)
    with torch.no_grad():
        base = llama()
        expected = base(input_ids=ids, attention_mask=full_mask, **{kv_cache.keyword(base): cache}).logits
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
    returned = kv_cache.from_output(out)
    assert returned.get_seq_length() == 3 + 6
    torch.testing.assert_close(returned.layers[1].keys[:, :, :3], layers[1][0].expand(3, -1, -1, -1))


def test_prefix_trains_through_its_mlp_and_fold_removes_it_with_the_same_outputs():
    model = peftlab.attach(llama(), "prefix[length=3,hidden=16]")
    module = the_module(model)
    flat = 2 * 2 * 16  # layers x (keys, values) x kv heads * head dim
    assert {n for n, _ in module.named_parameters()} == {"embedding", "transform.0.weight", "transform.0.bias",
                                                         "transform.2.weight", "transform.2.bias"}
    model(**train_batch()).loss.backward()
    assert module.transform[2].weight.grad is not None and module.embedding.grad is not None
    ids, mask = ids_and_mask()
    before = run(model, ids, attention_mask=mask)
    prefix_method.fold(model)
    assert [n for n, _ in module.named_parameters()] == ["prompt_embeddings"]
    assert module.prompt_embeddings.shape == (3, flat) and module.prompt_embeddings.requires_grad
    assert peftlab.summary(model)["adapters"]["default"] == 3 * flat
    torch.testing.assert_close(run(model, ids, attention_mask=mask), before, rtol=0, atol=1e-6)


def test_saving_writes_the_folded_prefix_and_leaves_the_model_unfolded(tmp_path):
    from safetensors import safe_open

    model = peftlab.attach(llama(), "ptuning[length=3,hidden=16]")
    ids, mask = ids_and_mask()
    expected = run(model, ids, attention_mask=mask)
    peftlab.save(model, tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"] and f.get_tensor("prompt_embeddings").shape == (3, 32)
    assert hasattr(the_module(model), "encoder"), "saving does not fold the model being trained"
    loaded = peftlab.load(llama(), tmp_path)
    assert [n for n, _ in the_module(loaded).named_parameters()] == ["prompt_embeddings"]
    torch.testing.assert_close(run(loaded, ids, attention_mask=mask), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
def test_ptuning_virtual_tokens_come_from_the_prompt_encoder(encoder):
    """Liu et al. (2021): the prompt is encoder(embedding), prepended like a soft prompt."""
    model = peftlab.attach(llama(), f"ptuning[length=4,encoder={encoder},hidden=8]")
    module = the_module(model)
    assert type(module.encoder).__name__ == ("LstmEncoder" if encoder == "lstm" else "Sequential")
    with torch.no_grad():
        tokens = module.encoder(module.embedding)
    assert tokens.shape == (4, 32)
    ids, _ = ids_and_mask(pad=(0, 0, 0))
    base = llama()
    embeds = torch.cat([tokens.expand(3, -1, -1), base.get_input_embeddings()(ids)], 1)
    with torch.no_grad():
        expected = base(inputs_embeds=embeds).logits[:, 4:]
    torch.testing.assert_close(run(model, ids), expected, rtol=0, atol=1e-6)
    before = run(model, ids)
    ptuning_method.fold(model)
    torch.testing.assert_close(run(model, ids), before, rtol=0, atol=1e-6)
    assert peftlab.summary(model)["adapters"]["default"] == 4 * 32


def test_ptuning_v2_is_prefix_tuning_without_reparameterization():
    v2 = peftlab.attach(llama(), "ptuning2[length=5]")
    assert [n for n, _ in the_module(v2).named_parameters()] == ["prompt_embeddings"]
    assert peftlab.summary(v2)["trainable"] == 5 * 2 * 2 * 16
    plain = peftlab.attach(llama(), "prefix[length=5,reparam=false]")
    with torch.no_grad():
        the_module(plain).prompt_embeddings.copy_(the_module(v2).prompt_embeddings)
    ids, mask = ids_and_mask()
    torch.testing.assert_close(run(v2, ids, attention_mask=mask), run(plain, ids, attention_mask=mask), rtol=0, atol=0)


def test_llama_adapter_is_zero_gated_attention_to_prompts_in_the_top_blocks():
    """Zhang et al.: the output is the base model's at init (gate 0) although the prompts are not 0;
    with an open gate each adapted block adds W_o gate softmax(q K_p^T / sqrt(d)) V_p."""
    model = peftlab.attach(llama(), "llama_adapter[length=3,layers=1]")
    layers = [name for name, _ in peftlab.core.adapters.adapter_layers(model)]
    assert layers == ["model.layers.1.self_attn"], "layers=1: the top block only"
    adapter = model.get_submodule(layers[0]).adapters["default"]
    assert adapter.adaption_prompt.shape == (1, 3, 32) and adapter.adaption_prompt.abs().sum() > 0
    assert adapter.adaption_gate.item() == 0
    ids, mask = ids_and_mask(pad=(0, 0, 0))
    torch.testing.assert_close(run(model, ids), run(llama(), ids), rtol=0, atol=0)
    with torch.no_grad():
        adapter.adaption_gate.fill_(0.7)
    attention = model.model.layers[1].self_attn.base_layer
    captured = {}
    handle = attention.register_forward_hook(lambda m, a, kw, out: captured.update(kw=kw, out=out[0]), with_kwargs=True)
    adapted = run(model, ids)
    handle.remove()
    hidden, (cos, sin) = captured["kw"]["hidden_states"], captured["kw"]["position_embeddings"]
    q = attention.q_proj(hidden).view(3, 6, 4, 8).transpose(1, 2)
    rotated = torch.cat([-q[..., 4:], q[..., :4]], -1)
    q = q * cos[:, None] + rotated * sin[:, None]
    k = attention.k_proj(adapter.adaption_prompt).view(1, 3, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    v = attention.v_proj(adapter.adaption_prompt).view(1, 3, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
    mixed = 0.7 * torch.softmax(q @ k.transpose(2, 3) / 8 ** 0.5, -1) @ v
    delta = attention.o_proj(mixed.transpose(1, 2).reshape(3, 6, 32))
    with torch.no_grad():
        block_out = adapter(hidden, captured["out"], (), captured["kw"])
    torch.testing.assert_close(block_out, delta, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, run(llama(), ids), atol=1e-4)


def test_llama_adapter_layers_count_from_the_top_or_list_blocks():
    def adapted(spec):
        model = peftlab.attach(make_llama(num_hidden_layers=3), spec)
        return [name.split(".")[2] for name, _ in peftlab.core.adapters.adapter_layers(model)]

    assert adapted("llama_adapter") == ["0", "1", "2"]
    assert adapted("llama_adapter[layers=2]") == ["1", "2"]
    assert adapted("llama_adapter[layers=[0]]") == ["0"]
    with pytest.raises(peftlab.TargetError, match="top 4 blocks, but the model has 3"):
        peftlab.attach(make_llama(num_hidden_layers=3), "llama_adapter[layers=4]")


def test_llama_adapter_refuses_other_architectures_clearly():
    model = make_bert()
    with pytest.raises(peftlab.TargetError, match="BertSelfAttention; LLaMA-Adapter supports Llama-architecture"):
        peftlab.attach(model, "llama_adapter")
    assert not any("Adapter" in type(m).__name__ for m in model.modules()), "a refused attach leaves the model as it was"


# ---- training, caches and generation ---------------------------------------------------------

def train_batch():
    ids, mask = ids_and_mask()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("spec", ALL)
def test_training_sees_the_users_sequence_and_the_blockwise_loss_agrees(spec):
    model = peftlab.attach(llama(), spec)
    batch = train_batch()
    out = model(**batch)
    assert out.logits.shape == (3, 6, VOCAB), "virtual positions are dropped before the head"
    blockwise = training_loss(model, batch)
    torch.testing.assert_close(blockwise, out.loss, rtol=1e-5, atol=1e-6)
    blockwise.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def greedy_by_full_forwards(model, ids, steps, eos=2, pad=0):
    """Greedy decoding the slow way: the whole sequence again at every step, no cache; rows that
    produced ``eos`` are padded, as ``generate`` does."""
    done = torch.zeros(ids.shape[0], 1, dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        token = logits[:, -1:].argmax(-1).masked_fill(done, pad)
        done |= token == eos
        ids = torch.cat([ids, token], 1)
    return ids


def trained(model):
    """Every adapter parameter moved off its init (LLaMA-Adapter's gate opened), as after training."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("spec", ALL)
def test_cached_generate_equals_full_forwards(spec):
    model = trained(peftlab.attach(llama(), spec))
    ids, _ = ids_and_mask(rows=2, pad=(0, 0))
    with torch.no_grad():
        generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, greedy_by_full_forwards(model, ids, 6), rtol=0, atol=0)
    with peftlab.disabled(model), torch.no_grad():
        base = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(generated, base), "the adapter steers generation"


@pytest.mark.parametrize("spec", ALL)
def test_left_padded_rows_generate_as_they_do_alone(spec):
    model = trained(peftlab.attach(llama(), spec))
    ids, mask = ids_and_mask(rows=3, pad=(0, 3, 1))
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row in range(3):
            real = ids[row:row + 1, int((mask[row] == 0).sum()):]
            alone = model.generate(input_ids=real, attention_mask=torch.ones_like(real), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0)
            torch.testing.assert_close(batched[row, -5:], alone[0, -5:], rtol=0, atol=0)


@pytest.mark.parametrize("spec", SOFT_PROMPTS)
def test_a_cache_continues_where_the_virtual_tokens_left_off(spec):
    """Two calls sharing a KV cache (the second one decoding) equal one call over both parts."""
    model = peftlab.attach(llama(), spec)
    ids, _ = ids_and_mask(rows=2, length=8, pad=(0, 0))
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], use_cache=True)
        cache = {kv_cache.keyword(model): kv_cache.from_output(first)}
        second = model(input_ids=ids[:, 5:], **cache, use_cache=True).logits
        whole = model(input_ids=ids).logits
    # cached and whole forwards multiply matrices of other shapes: fp32 rounding differs by ~1e-6 at
    # these weights' scale, and wrong positions or a doubled prefix would differ by far more than 1e-5
    torch.testing.assert_close(second, whole[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SOFT_PROMPTS)
def test_bert_classification_with_virtual_tokens(spec):
    model = peftlab.attach(make_bert(**SCALE), spec.replace("]", ",modules_to_save=[classifier]]"))
    model.train()
    ids, mask = ids_and_mask(pad=(0, 2, 0))
    token_types = torch.zeros_like(ids)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3)
    out.loss.backward()
    assert model.classifier.weight.grad is not None
    assert all(p.grad is not None for _, _, m in model_adapters.model_adapters(model) for p in m.parameters())


# ---- the rest of the life cycle -----------------------------------------------------------------

@pytest.mark.parametrize("spec", SOFT_PROMPTS)
def test_routing_rows_to_soft_prompts_is_a_clear_error(spec):
    model = peftlab.attach(llama(), spec)
    ids, _ = ids_and_mask(rows=2, pad=(0, 0))
    with pytest.raises(peftlab.StateError, match="change the model's inputs"):
        with peftlab.routing(model, ["default", None]):
            model(input_ids=ids)


def test_routing_rows_to_llama_adapter_is_a_clear_error():
    model = peftlab.attach(llama(), "llama_adapter[length=2]")
    ids, _ = ids_and_mask(rows=2, pad=(0, 0))
    with pytest.raises(peftlab.StateError, match="cannot be routed per row"):
        with peftlab.routing(model, ["default", None]):
            model(input_ids=ids)


def test_a_union_with_lora_round_trips_in_the_native_format_folded(tmp_path):
    model = peftlab.attach(llama(), "prefix[length=3,hidden=16]|lora[r=2,targets=[q_proj]]")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids, mask = ids_and_mask()
    expected = run(model, ids, attention_mask=mask)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(llama(), tmp_path)
    torch.testing.assert_close(run(loaded, ids, attention_mask=mask), expected, rtol=0, atol=1e-6)
    assert [n for n, _ in the_module(loaded).named_parameters()] == ["prompt_embeddings"]


@pytest.mark.parametrize("order", [["input", "deep"], ["deep", "input"]])
def test_two_active_soft_prompts_stack(order):
    """A prompt and a prefix active together, in either order: generation equals full forwards."""
    model = peftlab.attach(llama(), "prompt[length=2]", name="input")
    peftlab.attach(model, "ptuning2[length=3]", name="deep")
    peftlab.set_active(model, order)
    ids, mask = ids_and_mask(rows=2, pad=(0, 0))
    with torch.no_grad():
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, greedy_by_full_forwards(model, ids, 4), rtol=0, atol=0)
    both = run(model, ids)
    for name in order:
        peftlab.set_active(model, name)
        assert not torch.allclose(run(model, ids), both), f"{name} alone differs from both together"


@pytest.mark.parametrize("setting,message", [
    ("prompt[init=text,init_ids=[500]]", "token id 500, but the model's vocabulary has 96"),
    ("prompt[init=text,init_text=hi]", "init=text needs init_ids"),
    ("ptuning[encoder=mlp,encoder_layers=3]", "encoder_layers sets the LSTM's depth"),
    ("prefix[hidden=-1]", "hidden"),
])
def test_bad_settings_say_what_to_do(setting, message):
    with pytest.raises(peftlab.ConfigError, match=message):
        peftlab.attach(make_llama(), setting)


def test_models_without_a_token_table_or_a_kv_cache_are_refused_clearly():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(peftlab.TargetError, match="get_input_embeddings"):
        peftlab.attach(plain, "prompt")
    with pytest.raises(peftlab.TargetError, match="needs a transformers model"):
        peftlab.attach(plain, "prefix")


def test_a_prefix_trains_under_gradient_checkpointing():
    """transformers drops the KV cache in checkpointed layers; the prefix arrives in a cache they may
    keep (prompting.PrefixOnlyCache), so the loss is the one without checkpointing."""
    model = peftlab.attach(llama(), "ptuning2[length=3]")
    model.train()
    plain = model(**train_batch()).loss
    with gradient_checkpointing(model):
        checkpointed = model(**train_batch()).loss
        checkpointed.backward()
    torch.testing.assert_close(checkpointed, plain)
    assert the_module(model).prompt_embeddings.grad.abs().sum() > 0
