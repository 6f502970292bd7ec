"""Quantized bases (peftlab.quantize): the layers, their memory, every method on top, QLoRA end to
end, merging into a quantized base and exporting a merged full-precision model."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_llama, randomize_adapters
from test_method_properties import batch, outputs, perturb, train_a_few_steps, spec_of
from torch import nn

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.formats.io import fingerprint, read_adapter
from peftlab.methods import METHODS
from peftlab.quant import dequantize, is_quantized, merge_report, quantization_record, quantize_like, weight_bytes

pytest.importorskip("bitsandbytes")

FORMATS = ["nf4", "fp4", "int8", "int4"]
# mean |logit error| / mean |logit| of the tiny random Llama: 4-bit formats round each weight to
# one of 16 levels, int8 to one of 255
TOLERANCE = {"nf4": 0.3, "fp4": 0.3, "int8": 0.02, "int4": 0.15}


def quantized_llama(format="nf4", **settings):
    model = make_llama()
    peftlab.quantize(model, format, group_size=16, **settings)
    return model


def quantized_layers(model):
    return {name: m for name, m in model.named_modules() if is_quantized(m)}


@pytest.mark.parametrize("format", FORMATS)
def test_quantize_replaces_the_linear_layers_but_not_the_head_or_embeddings(format):
    model = quantized_llama(format)
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert all(isinstance(m, nn.Linear) for m in layers.values())  # so methods and roles see linear layers
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    expected = outputs(make_llama(), "llama")
    error = (outputs(model, "llama") - expected).abs().mean() / expected.abs().mean()
    assert 0 < error < TOLERANCE[format]


@pytest.mark.parametrize("format", FORMATS)
def test_quantized_layers_compute_in_full_precision_in_training_and_evaluation(format):
    layer = quantized_layers(quantized_llama(format))["model.layers.0.mlp.down_proj"]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        evaluated = layer.eval()(x)
        trained = layer.train()(x)
    assert evaluated.dtype == torch.float32
    torch.testing.assert_close(evaluated, F.linear(x, layer.dequantize()), rtol=0, atol=1e-6)
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)


@pytest.mark.parametrize("format,double_quant,ratio", [("nf4", True, (4 + 8 / 64) / 32), ("nf4", False, (4 + 32 / 64) / 32),
                                                       ("fp4", True, (4 + 8 / 64) / 32), ("int8", True, 8 / 32),
                                                       ("int4", True, (4 + 64 / 32) / 32)])
def test_weight_bytes_of_each_format(format, double_quant, ratio):
    """Bits per weight: 4-bit codes + one fp32 scale per 64 weights (8 bits with double
    quantization, plus per-256 scales and code tables); int8 + one scale per row; int4 + an fp32 scale
    and offset per group of 32."""
    model = nn.Sequential(nn.Linear(1024, 512, bias=False))
    peftlab.quantize(model, format, double_quant=double_quant)
    size = weight_bytes(model)
    assert size["fp32_total"] == size["fp32_quantized"] == 4 * 1024 * 512
    assert size["other"] == 0
    assert ratio <= size["quantized"] / size["fp32_quantized"] < ratio * 1.03


def test_weight_bytes_count_the_base_only_with_embeddings_in_full_precision():
    model = make_llama()
    full = weight_bytes(model)
    assert full["total"] == full["fp32_total"] == sum(p.nbytes for p in model.parameters())
    peftlab.quantize(model, "nf4")
    peftlab.attach(model, "lora[r=4]")
    size = weight_bytes(model)
    assert size["fp32_total"] == full["fp32_total"]  # adapters do not count
    assert size["other"] == sum(p.nbytes for n, p in model.named_parameters()
                                if "embed" in n or "norm" in n or "lm_head" in n)
    assert size["quantized"] < size["fp32_quantized"] / 2
    assert size["total"] == size["quantized"] + size["other"]


def test_summary_counts_a_quantized_weight_at_its_full_size():
    full, quantized = (peftlab.summary(peftlab.attach(model, "lora[r=4]")) for model in (make_llama(), quantized_llama()))
    assert quantized["total"] == full["total"] and quantized["trainable"] == full["trainable"]


def test_quantize_errors_are_clear():
    with pytest.raises(peftlab.ConfigError, match="format must be one of nf4, fp4, int8, int4"):
        peftlab.quantize(make_llama(), "nf3")
    with pytest.raises(peftlab.ConfigError, match="group_size=24 does not divide the 32 input features of 'model.layers.0"):
        peftlab.quantize(make_llama(), "int4", group_size=24)
    with pytest.raises(peftlab.ConfigError, match="loftq_rank"):
        peftlab.quantize(make_llama(), "nf4", loftq_rank=0)
    with pytest.raises(peftlab.StateError, match="before attaching adapters"):
        peftlab.quantize(peftlab.attach(make_llama(), "lora"), "nf4")
    with pytest.raises(peftlab.TargetError, match="quantize"):
        peftlab.quantize(quantized_llama(), "nf4")  # nothing left to quantize


def test_quantize_takes_targets_and_exclude():
    model = make_llama()
    peftlab.quantize(model, "int8", targets="attention", exclude=["re:.*\\.1\\..*"])
    assert sorted(quantized_layers(model)) == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]


def test_a_quantized_model_has_the_fingerprint_of_its_original():
    assert fingerprint(quantized_llama("nf4")) == fingerprint(make_llama()) == fingerprint(quantized_llama("int4"))


# ---- every method on a quantized base ---------------------------------------------------------

WRAPPING = [m for m in METHODS if not core.is_model_method(METHODS[m])]
NEEDS_FULL_PRECISION = {"fishmask": "gradient", "select": "quantized"}  # they change the weight entries themselves


def attached_on_quantized(method):
    model = quantized_llama("nf4")
    for name, spec in getattr(METHODS[method], "EXAMPLE_PREREQUISITES", {}).items():
        peftlab.attach(model, spec, name=name)
        perturb(model)
    return peftlab.attach(model, spec_of(method))


@pytest.mark.parametrize("method", WRAPPING)
def test_every_module_wrapping_method_attaches_on_a_quantized_base(method, tmp_path):
    if method in NEEDS_FULL_PRECISION:
        with pytest.raises(peftlab.ConfigError, match=NEEDS_FULL_PRECISION[method]):
            attached_on_quantized(method)
        return
    model = attached_on_quantized(method)
    if getattr(METHODS[method], "IDENTITY_AT_INIT", True) and not getattr(METHODS[method], "EXAMPLE_PREREQUISITES", None):
        torch.testing.assert_close(outputs(model, "llama"), outputs(quantized_llama("nf4"), "llama"), rtol=0, atol=1e-5)
    wrapped = [m for _, layer in core.adapter_layers(model, "default") for m in layer.base_layer.modules()]
    assert all(is_quantized(m) for m in wrapped if isinstance(m, nn.Linear)), "it wraps the quantized layers (or their blocks)"
    model.train()
    model(**batch("llama")).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    model.eval()
    perturb(model)
    expected = outputs(model, "llama")
    fresh = quantized_llama("nf4")
    for name in getattr(METHODS[method], "EXAMPLE_PREREQUISITES", {}):
        peftlab.load(fresh, peftlab.save(model, tmp_path / name, name), name)
    peftlab.load(fresh, peftlab.save(model, tmp_path / "default"))
    torch.testing.assert_close(outputs(fresh, "llama"), expected, rtol=0, atol=1e-6)


def test_pissa_refuses_a_quantized_base_clearly():
    with pytest.raises(peftlab.ConfigError, match="init=pissa rewrites the base weight in full precision"):
        peftlab.attach(quantized_llama(), "lora[init=pissa]")


# ---- QLoRA end to end -------------------------------------------------------------------------

def test_qlora_trains_saves_and_loads_onto_a_freshly_quantized_base(tmp_path):
    model = quantized_llama("nf4")
    peftlab.attach(model, "lora[r=4,alpha=8]")
    result = train_a_few_steps(model)
    assert result.losses[-1] < result.losses[0] * 0.95, result.losses
    model.eval()
    expected = outputs(model, "llama")
    peftlab.save(model, tmp_path / "qlora")
    assert json.loads((tmp_path / "qlora" / "adapter_config.json").read_text())["peft_type"] == "LORA"  # a plain LoRA
    record = read_adapter(tmp_path / "qlora")[2]["base_quantization"]
    assert record == quantization_record(model) and record[0]["format"] == "nf4" and len(record[0]["modules"]) == 14
    fresh = quantized_llama("nf4")
    peftlab.load(fresh, tmp_path / "qlora")
    torch.testing.assert_close(outputs(fresh, "llama"), expected, rtol=0, atol=1e-6)
    like = quantize_like(make_llama(), tmp_path / "qlora")  # from the record alone
    peftlab.load(like, tmp_path / "qlora")
    torch.testing.assert_close(outputs(like, "llama"), expected, rtol=0, atol=1e-6)


def test_hf_peft_loads_our_qlora_adapter_and_we_load_its(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    ids = batch("llama")["input_ids"]
    ours = randomize_adapters(peftlab.attach(quantized_llama(), "lora[r=4]"))
    peftlab.save(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(quantized_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=0, atol=1e-5)

    peft_model = randomize_adapters(get_peft_model(quantized_llama(), LoraConfig(r=4, target_modules="all-linear")))
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = peftlab.load(quantized_llama(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)


# ---- merging ------------------------------------------------------------------------------------

@pytest.mark.parametrize("format", ["nf4", "int8"])
def test_merging_into_a_quantized_base_requantizes_and_reports_the_error(format):
    model = peftlab.attach(quantized_llama(format), "lora[r=4,alpha=8]")
    perturb(model)
    expected = outputs(model, "llama")
    wanted = {name: layer.base_layer.dequantize() + layer.adapters["default"].delta_weight().detach()
              for name, layer in core.adapter_layers(model)}
    assert merge_report(model) == {"layers": 0}
    peftlab.merge(model)
    assert all(is_quantized(layer.base_layer) for _, layer in core.adapter_layers(model))  # still quantized
    report = merge_report(model)
    assert report["layers"] == 14 and set(report["per_layer"]) == set(wanted)
    errors = {name: (layer.base_layer.dequantize() - wanted[name]).abs() for name, layer in core.adapter_layers(model)}
    assert report["max_abs_error"] == pytest.approx(max(e.max().item() for e in errors.values()))
    assert report["mean_abs_error"] == pytest.approx(sum(e.sum().item() for e in errors.values())
                                                     / sum(e.numel() for e in errors.values()), rel=1e-4)
    assert 0 < report["mean_abs_error"] and 0 < report["mean_abs_change"]
    merged = outputs(model, "llama")
    without = outputs(quantized_llama(format), "llama")
    assert (merged - expected).abs().mean() < 0.5 * (without - expected).abs().mean()  # most of the update survives


def test_a_merged_full_precision_model_exports_from_a_quantized_base(tmp_path):
    from transformers import AutoModelForCausalLM

    model = peftlab.attach(quantized_llama("nf4"), "dora[r=4]")  # DoRA also keeps a reference to its base
    perturb(model)
    expected = outputs(model, "llama")
    dequantize(model)
    assert not quantized_layers(model) and all(type(layer.base_layer) is nn.Linear for _, layer in core.adapter_layers(model))
    torch.testing.assert_close(outputs(model, "llama"), expected, rtol=0, atol=1e-5)
    peftlab.merge(model)
    plain = peftlab.unload(model)
    assert not any(isinstance(m, AdapterLayer) or is_quantized(m) for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    plain.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    torch.testing.assert_close(outputs(reloaded, "llama"), expected, rtol=1e-4, atol=1e-5)


# ---- command line -----------------------------------------------------------------------------

def test_cli_trains_on_a_quantized_base_and_merges_to_full_precision(tmp_path, capsys, fake_models):
    from test_cli import TINY, run
    from test_tasks import char_tokenizer
    from transformers import AutoModelForCausalLM

    import peftlab.models

    code, out, err = run(capsys, "train", "--out", tmp_path / "run", *TINY, "--quantize", "nf4", "--no-double-quant")
    assert code == 0, err
    assert "quantized the linear layers to nf4" in out
    adapter = tmp_path / "run" / "adapter"
    assert read_adapter(adapter)[2]["base_quantization"][0] == {**read_adapter(adapter)[2]["base_quantization"][0],
                                                                "format": "nf4", "double_quant": False}
    code, out, err = run(capsys, "merge", adapter, "--out", tmp_path / "merged")
    assert code == 0, err
    assert "trained on a nf4 base" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    trained, _ = peftlab.models.load_model()
    quantize_like(trained, adapter)
    peftlab.load(trained, adapter)
    ids = torch.tensor([char_tokenizer()("To JSON: Ana paid $5.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-5)

    code, out, err = run(capsys, "generate", "--adapter", adapter, "To JSON: Ana paid $5.")
    assert code == 0 and out.strip(), err

    code, out, err = run(capsys, "train", "--out", tmp_path / "loftq", *TINY, "--quantize", "nf4",
                         "--method", "lora[r=4,init=loftq]")
    assert code == 0 and "quantized the linear layers to nf4 with LoftQ (rank 4)" in out, err
    code, _, err = run(capsys, "train", "--out", tmp_path / "bad", *TINY, "--quantize", "nf5")
    assert code == 2 and "--quantize must be one of nf4, fp4, int8, int4" in err
