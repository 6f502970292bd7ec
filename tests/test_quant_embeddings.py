"""Quantized embeddings (peftlab.quantize(..., embeddings=True)): lookups, a tied head sharing the
quantized table, weight bytes, QLoRA on top, save / quantize_like / load, dequantize, the blockwise
loss on a quantized head, prompt methods, and the CLI flag."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_gpt2, make_llama
from test_method_properties import batch, outputs, perturb, train_a_few_steps
from torch import nn

import peftlab
from peftlab.formats.io import fingerprint, read_adapter
from peftlab.quant import QuantizedEmbedding, dequantize, is_quantized, quantization_record, quantize_like, weight_bytes
from peftlab.quant import _builder as builder
from peftlab.train.loss import plain_head, training_loss

pytest.importorskip("bitsandbytes")

FORMATS = ["nf4", "fp4", "int8", "int4"]
TOLERANCE = {"nf4": 0.3, "fp4": 0.3, "int8": 0.02, "int4": 0.15}  # as in test_quant.py


def tied_llama():
    return make_llama(tie_word_embeddings=True)


def quantized(model, format="nf4", **settings):
    return peftlab.quantize(model, format, group_size=16, embeddings=True, **settings)


def quantized_gpt2(format="nf4"):
    return quantized(make_gpt2(), format, targets=[])  # its blocks are Conv1D layers: only the embeddings


# ---- the layer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("dim", [32, 128])  # 4-bit: rows that split blocks of 64 (whole-table path), and whole blocks
def test_lookup_equals_embedding_of_the_dequantized_table(format, dim):
    torch.manual_seed(0)
    embedding = QuantizedEmbedding.from_embedding(nn.Embedding(300, dim, padding_idx=0), builder(format, True, 16))
    ids = torch.tensor([[0, 5, 299, 5], [17, 1, 2, 250]])
    table = embedding.weight
    assert table.shape == (300, dim) and (embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx) == (300, dim, 0)
    torch.testing.assert_close(embedding(ids), F.embedding(ids, table), rtol=0, atol=0)
    torch.testing.assert_close(table, embedding.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("format", FORMATS)
def test_quantized_embeddings_stay_close_to_the_full_precision_model(format):
    model = quantized(make_llama(), format)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    expected = outputs(make_llama(), "llama")
    error = (outputs(model, "llama") - expected).abs().mean() / expected.abs().mean()
    assert 0 < error < TOLERANCE[format]
    assert fingerprint(model) == fingerprint(make_llama())  # adapters move between the model and its quantized copy
    assert peftlab.summary(model)["total"] == peftlab.summary(make_llama())["total"]


def test_embeddings_stay_in_full_precision_by_default():
    model = peftlab.quantize(make_llama(), "nf4")
    assert type(model.get_input_embeddings()) is nn.Embedding and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("make", [tied_llama, make_gpt2])
def test_a_tied_head_is_the_quantized_table_itself_counted_once(make):
    original = make()
    assert original.get_output_embeddings().weight is original.get_input_embeddings().weight
    model = quantized(make(), targets=[])
    table = model.get_input_embeddings().table
    assert model.get_output_embeddings() is table and is_quantized(table)
    assert sum(p is table.weight for p in model.parameters()) == 1
    size, full = weight_bytes(model), weight_bytes(original)
    assert size["quantized"] == table.stored_bytes()  # once, not once per place
    assert size["fp32_quantized"] == 4 * table.weight_shape[0] * table.weight_shape[1]
    assert size["fp32_total"] == full["fp32_total"] and size["other"] == full["total"] - size["fp32_quantized"]
    assert fingerprint(model) == fingerprint(make())
    hidden = torch.randn(2, 3, table.in_features)
    torch.testing.assert_close(model.get_output_embeddings()(hidden), hidden @ model.get_input_embeddings().weight.t(),
                               rtol=0, atol=1e-5)


def test_an_untied_head_is_quantized_as_its_own_layer():
    model = quantized(make_llama())
    head, table = model.lm_head, model.get_input_embeddings().table
    assert is_quantized(head) and head is not table
    size = weight_bytes(model)
    layers = [m for m in model.modules() if is_quantized(m)]
    assert len(layers) == 2 * 7 + 2 and size["quantized"] == sum(m.stored_bytes() for m in layers)
    assert size["other"] == sum(p.nbytes for n, p in model.named_parameters() if "norm" in n)


def test_dequantize_restores_plain_modules_with_a_shared_weight():
    for model in (quantized_gpt2(), quantized(make_llama())):
        expected = outputs(model, "llama")
        table = model.get_input_embeddings().dequantize()
        dequantize(model)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert type(embedding) is nn.Embedding and type(head) is nn.Linear
        assert not any(is_quantized(m) or isinstance(m, QuantizedEmbedding) for m in model.modules())
        torch.testing.assert_close(embedding.weight, table, rtol=0, atol=0)
        assert (head.weight is embedding.weight) == (model.config.model_type == "gpt2")
        torch.testing.assert_close(outputs(model, "llama"), expected, rtol=0, atol=1e-5)


def test_quantize_embeddings_errors_are_clear():
    with pytest.raises(peftlab.ConfigError, match="get_input_embeddings"):
        peftlab.quantize(nn.Sequential(nn.Linear(8, 8)), "nf4", embeddings=True)
    with pytest.raises(peftlab.ConfigError, match="already quantized"):
        quantized(quantized(make_llama()), targets=[])
    with pytest.raises(peftlab.ConfigError, match="group_size=24 does not divide the 32 input features of 'model.embed_tokens'"):
        peftlab.quantize(make_llama(), "int4", group_size=24, targets=[], embeddings=True)
    with pytest.raises(peftlab.ConfigError, match="embeddings must be true or false"):
        peftlab.quantize(make_llama(), "nf4", embeddings="yes")


# ---- methods on a base with quantized embeddings ------------------------------------------------

def test_all_linear_skips_the_embedding_table_and_lora_cannot_target_it():
    model = peftlab.attach(quantized(make_llama()), "lora[r=4]")
    wrapped = [name for name, m in model.named_modules() if isinstance(m, peftlab.core.layer.AdapterLayer)]
    assert len(wrapped) == 14 and not any("embed" in n or "lm_head" in n for n in wrapped)
    with pytest.raises(peftlab.TargetError, match="embed_tokens"):
        peftlab.attach(quantized(make_llama()), "lora[targets=[embed_tokens]]")


def test_an_adapter_on_the_tied_quantized_head_cannot_be_merged():
    model = peftlab.attach(quantized(tied_llama(), targets=[]), "lora[r=4,targets=[lm_head]]")
    with pytest.raises(peftlab.StateError, match="tied embeddings"):
        peftlab.merge(model)


def test_qlora_trains_with_quantized_embeddings_and_reloads_onto_a_freshly_quantized_base(tmp_path):
    model = peftlab.attach(quantized(make_llama()), "lora[r=4,alpha=8]")
    result = train_a_few_steps(model)
    assert result.losses[-1] < result.losses[0] * 0.95, result.losses
    model.eval()
    expected = outputs(model, "llama")
    peftlab.save(model, tmp_path / "qlora")
    record = read_adapter(tmp_path / "qlora")[2]["base_quantization"]
    assert record == quantization_record(model)
    assert record[-1] == {"format": "nf4", "double_quant": True, "embeddings": True, "modules": ["model.embed_tokens"]}
    assert "lm_head" in record[0]["modules"]  # the untied head: a quantized layer like the others
    like = quantize_like(make_llama(), tmp_path / "qlora")
    assert isinstance(like.get_input_embeddings(), QuantizedEmbedding) and is_quantized(like.lm_head)
    peftlab.load(like, tmp_path / "qlora")
    torch.testing.assert_close(outputs(like, "llama"), expected, rtol=0, atol=1e-6)


def test_quantize_like_replays_a_tied_gpt2():
    model = quantized_gpt2("int8")
    like = quantize_like(make_gpt2(), quantization_record(model))
    assert like.lm_head is like.get_input_embeddings().table
    torch.testing.assert_close(outputs(like, "llama"), outputs(model, "llama"), rtol=0, atol=0)


@pytest.mark.parametrize("make", [tied_llama, make_llama])
def test_blockwise_loss_on_a_quantized_head_equals_the_model_loss(make):
    model = peftlab.attach(quantized(make()), "lora[r=4]")
    perturb(model)
    assert is_quantized(plain_head(model))
    data = batch("llama")
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = model(**data).loss
    expected_grads = torch.autograd.grad(expected, trainable)
    loss = training_loss(model, data)
    grads = torch.autograd.grad(loss, trainable)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not any(p.requires_grad for p in model.lm_head.parameters())


def test_prompt_tuning_starts_from_rows_of_the_quantized_vocabulary():
    model = peftlab.attach(quantized(make_llama()), "prompt[length=5,init=vocab]")
    table = model.get_input_embeddings().weight
    prompt = next(p for p in model.parameters() if p.requires_grad)
    assert prompt.shape == (5, 32) and (prompt[:, None, :] == table[None]).all(-1).any(-1).all()
    model(**batch("llama")).loss.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


@pytest.mark.parametrize("spec", ["prefix[length=4]", "ptuning[length=4]"])
def test_prompt_methods_train_on_quantized_embeddings(spec):
    model = peftlab.attach(quantized(make_llama()), spec)
    model(**batch("llama")).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


# ---- command line ---------------------------------------------------------------------------------

def test_cli_quantizes_the_embeddings_trains_and_merges_to_full_precision(tmp_path, capsys, fake_models):
    from test_cli import TINY, run
    from test_tasks import char_tokenizer
    from transformers import AutoModelForCausalLM

    import peftlab.models

    code, out, err = run(capsys, "train", "--out", tmp_path / "run", *TINY, "--quantize", "int8", "--quantize-embeddings")
    assert code == 0, err
    assert "quantized the linear layers and the embeddings to int8" in out
    adapter = tmp_path / "run" / "adapter"
    assert read_adapter(adapter)[2]["base_quantization"][-1]["embeddings"] is True
    code, out, err = run(capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    trained, _ = peftlab.models.load_model()
    peftlab.load(quantize_like(trained, adapter), adapter)
    ids = torch.tensor([char_tokenizer()("To JSON: Ana paid $5.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-5)

    code, _, err = run(capsys, "train", "--out", tmp_path / "bad", *TINY, "--quantize-embeddings")
    assert code == 2 and "--quantize-embeddings quantizes the embeddings in the format of --quantize" in err
