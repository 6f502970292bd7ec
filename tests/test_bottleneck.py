"""Bottleneck adapters (Houlsby, Pfeiffer, parallel, Compacter, Compacter++) and AdapterDrop.

Each test checks what makes a method that method: where its adapters sit, what they read, the
function they compute, Compacter's one shared A_i, AdapterDrop's skipped layers.
"""
from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, logits, make_bert, make_gpt2, make_llama

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import bottleneck as bottleneck_method
from peftlab.methods import compacter as compacter_method
from peftlab.methods.bottleneck import set_drop_layers

BOTTLENECK = ["houlsby", "pfeiffer", "parallel", "compacter[reduction=4]", "compacterpp[reduction=4]"]


def randomize(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in core.all_adapters(model):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter_positions(model, name="default"):
    return sorted(module_name for module_name, _ in core.adapter_layers(model, name))


def record_inputs_and_outputs(module):
    seen = {}

    def hook(m, args, output):
        seen["input"], seen["output"] = args[0], output
    return seen, module.register_forward_hook(hook)


# ---- placement -----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,attn_out,ffn_out", [
    (make_llama, "model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    (make_bert, "bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    (make_gpt2, "transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
])
def test_houlsby_puts_two_adapters_per_layer_and_pfeiffer_one(factory, attn_out, ffn_out):
    houlsby = peftlab.attach(factory(), "houlsby")
    assert adapter_positions(houlsby) == sorted([attn_out.format(i) for i in range(2)] + [ffn_out.format(i) for i in range(2)])
    pfeiffer = peftlab.attach(factory(), "pfeiffer")
    assert adapter_positions(pfeiffer) == [ffn_out.format(i) for i in range(2)]
    compacterpp = peftlab.attach(factory(), "compacterpp[reduction=4]")
    assert adapter_positions(compacterpp) == adapter_positions(pfeiffer)


@pytest.mark.parametrize("spec", BOTTLENECK)
@pytest.mark.parametrize("factory", [make_llama, make_bert])
def test_the_output_equals_the_base_at_init_because_the_up_projection_is_zero(spec, factory, ids):
    base = logits(factory(), ids)
    model = peftlab.attach(factory(), spec)
    deltas = []
    for _, adapter in core.all_adapters(model):
        adapter.register_forward_hook(lambda m, args, out: deltas.append(out))
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    assert deltas and all(not delta.any() for delta in deltas)


def test_a_serial_adapter_adds_up_act_down_of_its_projections_output(llama, ids):
    peftlab.attach(llama, "houlsby[bottleneck=4,activation=tanh]")
    randomize(llama)
    layer = llama.model.layers[1].mlp.down_proj
    adapter = layer.adapters["default"]
    assert adapter.down.weight.shape == (4, 32) and adapter.up.weight.shape == (32, 4)
    seen, handle = record_inputs_and_outputs(layer)
    logits(llama, ids)
    handle.remove()
    h = layer.base_layer(seen["input"])
    expected = h + adapter.up(torch.tanh(adapter.down(h)))
    torch.testing.assert_close(seen["output"], expected)


def test_reduction_sets_the_bottleneck_as_width_over_reduction(llama):
    peftlab.attach(llama, "pfeiffer[reduction=8]")
    assert llama.model.layers[0].mlp.down_proj.adapters["default"].down.weight.shape == (32 // 8, 32)


# ---- bad settings ----------------------------------------------------------------------------------

def test_an_unknown_activation_is_a_clear_error(llama):
    with pytest.raises(peftlab.ConfigError, match="unknown activation 'softmax'.*relu"):
        peftlab.attach(llama, "houlsby[activation=softmax]")


def test_a_reduction_that_leaves_no_bottleneck_is_a_clear_error_and_leaves_the_model_alone(llama, ids):
    base = logits(make_llama(), ids)
    with pytest.raises(peftlab.ConfigError, match="reduction=64 leaves no bottleneck for width 32"):
        peftlab.attach(llama, "houlsby[reduction=64]")
    assert not list(core.adapter_layers(llama))
    torch.testing.assert_close(logits(llama, ids), base, rtol=0, atol=0)


def test_bottleneck_and_reduction_are_exclusive(llama):
    with pytest.raises(peftlab.ConfigError, match="either bottleneck .* or reduction"):
        peftlab.attach(llama, "pfeiffer[bottleneck=4,reduction=2]")


# ---- parallel --------------------------------------------------------------------------------------

def test_a_parallel_adapter_reads_the_ffn_input_and_adds_to_the_ffn_output_on_llama(llama, ids):
    peftlab.attach(llama, "parallel[bottleneck=4]")
    randomize(llama)
    mlp = llama.model.layers[1].mlp
    adapter = mlp.down_proj.adapters["default"]
    seen, handle = record_inputs_and_outputs(mlp)
    logits(llama, ids)
    handle.remove()
    x = seen["input"]
    with peftlab.disabled(llama):
        plain = mlp(x)
    torch.testing.assert_close(seen["output"] - plain, 4.0 * adapter.up(torch.relu(adapter.down(x))), rtol=1e-4, atol=1e-5)


def test_a_parallel_adapter_reads_the_ffn_input_and_adds_to_the_ffn_output_on_bert(ids):
    model = make_bert()
    peftlab.attach(model, "parallel[bottleneck=4,scale=2]")
    randomize(model)
    block = model.bert.encoder.layer[0]
    adapter = block.output.dense.adapters["default"]
    assert adapter_positions(model) == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    ffn_in, h1 = record_inputs_and_outputs(block.intermediate)
    ffn_out, h2 = record_inputs_and_outputs(block.output.dense)
    logits(model, ids)
    h1.remove(), h2.remove()
    plain = block.output.dense.base_layer(ffn_out["input"])
    x = ffn_in["input"]  # the attention block's output: the FFN's input
    torch.testing.assert_close(ffn_out["output"] - plain, 2.0 * adapter.up(torch.relu(adapter.down(x))), rtol=1e-4, atol=1e-5)


def test_wrapping_the_whole_ffn_block_is_the_same_parallel_adapter(ids):
    on_output, on_block = make_llama(), make_llama()
    peftlab.attach(on_output, "parallel")
    peftlab.attach(on_block, "parallel[targets=mlp]")
    assert adapter_positions(on_block) == [f"model.layers.{i}.mlp" for i in range(2)]
    randomize(on_output)
    for i in range(2):
        source = on_output.model.layers[i].mlp.down_proj.adapters["default"]
        on_block.model.layers[i].mlp.adapters["default"].load_state_dict(source.state_dict())
    torch.testing.assert_close(logits(on_block, ids), logits(on_output, ids), rtol=1e-5, atol=1e-6)


def test_a_parallel_adapter_around_attention_reads_the_attention_input(llama, ids):
    peftlab.attach(llama, "parallel[targets=attention,bottleneck=4]")
    assert adapter_positions(llama) == [f"model.layers.{i}.self_attn" for i in range(2)]
    randomize(llama)
    attention = llama.model.layers[0].self_attn  # layer 0: the same input with and without adapters
    adapter = attention.adapters["default"]
    seen = []
    attention.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs["hidden_states"], out[0])),
                                    with_kwargs=True)
    logits(llama, ids)
    with peftlab.disabled(llama):
        logits(llama, ids)
    (x, adapted), (_, plain) = seen
    torch.testing.assert_close(adapted - plain, 4.0 * adapter.up(torch.relu(adapter.down(x))), rtol=1e-4, atol=1e-5)


def test_parallel_works_on_gpt2_and_its_hooks_go_away_with_the_adapter(ids):
    model = make_gpt2()
    base = logits(model, ids)
    peftlab.attach(model, "parallel")
    mlp = model.transformer.h[0].mlp
    assert len(mlp._forward_pre_hooks) == 1
    randomize(model)
    assert not torch.allclose(logits(model, ids), base)
    peftlab.delete(model, "default")
    assert not mlp._forward_pre_hooks
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)


def test_parallel_on_a_linear_that_is_not_an_ffn_output_is_a_clear_error(llama):
    with pytest.raises(peftlab.TargetError, match="not an FFN output projection"):
        peftlab.attach(llama, "parallel[targets=q_proj]")
    assert not list(core.adapter_layers(llama))


def test_a_parallel_adapter_on_ffn_out_refuses_per_row_routing_clearly(llama, ids):
    peftlab.attach(llama, "parallel")
    with pytest.raises(peftlab.StateError, match="cannot be routed per row"):
        with peftlab.routing(llama, ["default", None, "default"]):
            logits(llama, ids)


# ---- AdapterDrop -----------------------------------------------------------------------------------

def count_adapter_calls(model):
    calls = {}
    for module_name, layer in core.adapter_layers(model):
        down = layer.adapters["default"].down
        down.register_forward_hook(lambda m, a, o, key=module_name: calls.__setitem__(key, calls.get(key, 0) + 1))
    return calls


@pytest.mark.parametrize("spec", ["houlsby", "parallel"])
def test_adapterdrop_skips_the_lowest_layers_as_if_their_adapters_were_not_there(spec, ids):
    dropped, kept = make_llama(), make_llama()
    peftlab.attach(dropped, f"{spec}[drop_layers=1]")
    peftlab.attach(kept, f"{spec}[layers=[1]]")
    randomize(dropped)
    for module_name, layer in core.adapter_layers(kept):
        layer.adapters["default"].load_state_dict(dropped.get_submodule(module_name).adapters["default"].state_dict())
    calls = count_adapter_calls(dropped)
    torch.testing.assert_close(logits(dropped, ids), logits(kept, ids), rtol=0, atol=0)
    assert calls and all(".layers.1." in name for name in calls), calls  # layer 0's adapters never ran

    dropped.train()  # specialized AdapterDrop: skipped in training too, so they get no gradient
    dropped(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in dropped.named_parameters() if p.requires_grad}
    assert all((g is None) == (".layers.0." in n) for n, g in grads.items()), sorted(n for n, g in grads.items() if g is None)


def test_robust_adapterdrop_draws_how_many_low_layers_to_skip_for_every_training_batch(ids):
    model = peftlab.attach(make_llama(num_hidden_layers=4), "pfeiffer[drop_robust=true,drop_layers=2]")
    calls = count_adapter_calls(model)
    model.train()
    torch.manual_seed(0)
    lowest_seen = []
    for _ in range(40):
        calls.clear()
        model(input_ids=ids)
        ran = sorted(int(name.split(".")[2]) for name in calls)
        assert ran == list(range(ran[0], 4))  # always the top layers, from the lowest one not dropped
        lowest_seen.append(ran[0])
    assert set(lowest_seen) == {0, 1, 2, 3}, lowest_seen  # k drawn from {0, ..., L-1}
    model.eval()
    calls.clear()
    model(input_ids=ids)
    assert sorted(int(name.split(".")[2]) for name in calls) == [2, 3]  # inference: drop_layers


def test_robust_adapterdrop_draws_from_torchs_generator_so_seeded_runs_repeat(ids):
    def lowest_layers(seed):
        model = peftlab.attach(make_llama(num_hidden_layers=4), "houlsby[drop_robust=true]")
        model.train()
        torch.manual_seed(seed)
        out = []
        for _ in range(8):
            model(input_ids=ids)
            out.append(model.model.layers[3].mlp.down_proj.adapters["default"].drop_count)
        return out
    assert lowest_layers(3) == lowest_layers(3)


def test_set_drop_layers_changes_inference_and_is_saved(llama, ids, tmp_path):
    peftlab.attach(llama, "houlsby")
    randomize(llama)
    full = logits(llama, ids)
    set_drop_layers(llama, "default", 2)
    torch.testing.assert_close(logits(llama, ids), logits(make_llama(), ids), rtol=0, atol=0)  # every adapter dropped
    peftlab.save(llama, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(make_llama(), ids), rtol=0, atol=0)
    set_drop_layers(loaded, "default", 0)
    torch.testing.assert_close(logits(loaded, ids), full, rtol=0, atol=1e-6)
    with pytest.raises(peftlab.ConfigError, match="drop_layers"):
        set_drop_layers(loaded, "default", -1)


# ---- Compacter -------------------------------------------------------------------------------------

def test_phm_weight_is_a_sum_of_kronecker_products():
    g = torch.Generator().manual_seed(0)
    rule, s, t = torch.randn(4, 4, 4, generator=g), torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, 5, generator=g)
    expected = sum(torch.kron(rule[i], s[i] @ t[i]) for i in range(4))
    torch.testing.assert_close(compacter_method.phm_weight(rule, s, t), expected)
    assert compacter_method.phm_weight(rule, s, t).shape == (12, 20)
    assert torch.linalg.matrix_rank(s[0] @ t[0]) == 2  # B_i has rank phm_rank


@pytest.mark.parametrize("factory", [make_llama, make_bert])
def test_compacter_shares_one_a_across_all_layers_trained_by_every_layer(factory, ids):
    model = peftlab.attach(factory(), "compacter[reduction=4,n=4]")
    adapters = [adapter for _, adapter in core.all_adapters(model)]
    assert len(adapters) == 4
    rule = adapters[0].phm_rule
    assert all(adapter.rule is rule for adapter in adapters)
    assert sum(p is rule for p in model.parameters()) == 1
    assert sum(p.shape == (4, 4, 4) for p in model.parameters()) == 1
    randomize(model)
    outputs = []
    for adapter in adapters:
        adapter.register_forward_hook(lambda m, a, out: outputs.append(out))
    model(input_ids=ids)
    for out in outputs:  # the one A gets gradient through every layer's adapter
        (grad,) = torch.autograd.grad(out.sum(), rule, retain_graph=True)
        assert grad.abs().sum() > 0


def test_compacter_parameter_count_and_the_shared_a_saved_once(llama, tmp_path):
    from safetensors import safe_open

    peftlab.attach(llama, "compacter[bottleneck=8,n=4,phm_rank=2]")
    d, b, n, r, adapters = 32, 8, 4, 2, 4
    per_layer = (r * (d + b) + b) + (r * (b + d) + d)  # down and up: s, t and bias
    assert peftlab.summary(llama)["adapters"]["default"] == n ** 3 + adapters * per_layer
    peftlab.save(llama, tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert sum(k.endswith("phm_rule") for k in keys) == 1


def test_compacter_n_must_divide_the_widths(llama):
    with pytest.raises(peftlab.ConfigError, match="n=3 must divide the model width"):
        peftlab.attach(llama, "compacter[bottleneck=8,n=3]")


@pytest.mark.parametrize("method", ["compacter", "compacterpp"])
@pytest.mark.parametrize("width,heads,n,size", [(32, 4, 4, 4), (30, 3, 3, 3), (36, 3, 4, 4)])
def test_compacter_defaults_fit_any_width(method, width, heads, n, size, ids):
    """At its defaults (reduction 16, n unset) Compacter takes the paper's n=4 or the largest smaller
    divisor of the width, and rounds the bottleneck up to a multiple of it."""
    model = peftlab.attach(make_llama(hidden_size=width, num_attention_heads=heads, num_key_value_heads=heads), method)
    adapter = next(a for _, a in bottleneck_method.family_adapters(model, "default", method))
    assert adapter.phm_rule.shape == (n, n, n) and adapter.down.s.shape[:2] == (n, size // n)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert adapter.phm_rule.grad is not None


def test_compacter_settings_given_by_hand_that_do_not_divide_stay_errors(llama):
    with pytest.raises(peftlab.ConfigError, match="n=4 must divide the model width \\(32\\) and the bottleneck \\(6\\)"):
        peftlab.attach(llama, "compacter[bottleneck=6]")


def test_bottleneck_adapters_train_on_gpt2(ids):
    model = peftlab.attach(make_gpt2(), "pfeiffer|compacterpp[reduction=4,targets=attn-out]")
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model(input_ids=ids).logits.shape == (3, 7, VOCAB)
