"""Selective methods: BitFit trains only biases, LN tuning only norms, ``select`` exactly the chosen
modules; after training and merging, only those parameters of the base differ from the original.
LN tuning reads and writes HF PEFT's LN_TUNING format, checked against the real ``peft`` both ways."""
from __future__ import annotations

from functools import partial

import peft
import pytest
import torch
from conftest import (
    HIDDEN, VOCAB, assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft,
    logits, make_bert, make_llama, peft_adapter_file,
)

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.core.targets import is_norm
from peftlab.train import TrainConfig, train

# weights at a pretrained model's scale, so that a few steps visibly train the adapter
make_llama, make_bert = (partial(f, initializer_range=0.2) for f in (make_llama, make_bert))


def wrapped(model):
    return [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def trained(model, arch: str, lr: float):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (4, 8), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g) if arch == "bert" else ids
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": labels[i]} for i in range(4)]
    train(model, rows, TrainConfig(lr=lr, steps=5, batch_size=4, warmup_steps=0, progress=False, device="cpu"))
    return model.eval()


def changed_after_merging(model, original: dict) -> tuple[set, set]:
    """Merge the adapter, unload it, and return (base tensors that changed, tensors that are new)."""
    peftlab.merge(model)
    merged = peftlab.unload(model).state_dict()
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    return changed, set(merged) - set(original)


ARCHS = {"llama": make_llama, "bert": lambda: make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}


# ---- BitFit -----------------------------------------------------------------------------------

def test_bitfit_default_targets():
    llama = peftlab.attach(make_llama(), "bitfit")
    assert len(wrapped(llama)) == 14 and "lm_head" not in wrapped(llama)  # every linear layer; RMSNorm has no bias
    bert = peftlab.attach(make_bert(), "bitfit")
    names = wrapped(bert)
    assert sum(n.endswith("LayerNorm") for n in names) == 1 + 2 * 2 and "bert.pooler.dense" in names
    assert "classifier" not in names
    assert peftlab.summary(bert)["adapters"]["default"] == sum(
        m.base_layer.bias.numel() for m in bert.modules() if isinstance(m, AdapterLayer))


def test_bitfit_adds_its_delta_to_the_bias():
    model = peftlab.attach(make_bert(), "bitfit")
    layer = model.get_submodule("bert.encoder.layer.0.intermediate.dense")
    with torch.no_grad():
        layer.adapters["default"].bias_delta.normal_()
        x = torch.randn(2, 3, HIDDEN)
        expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + layer.adapters["default"].bias_delta
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_bitfit_without_add_missing_refuses_layers_without_a_bias():
    llama = make_llama()
    with pytest.raises(peftlab.TargetError, match="add_missing"):
        peftlab.attach(llama, "bitfit[add_missing=false]")
    assert not wrapped(llama)
    peftlab.attach(make_bert(), "bitfit[add_missing=false]")  # BERT has every bias already


@pytest.mark.parametrize("arch", list(ARCHS))
def test_bitfit_changes_only_biases(arch):
    original = {k: v.clone() for k, v in ARCHS[arch]().state_dict().items()}
    model = trained(peftlab.attach(ARCHS[arch](), "bitfit"), arch, lr=1e-2)
    changed, new = changed_after_merging(model, original)
    assert changed | new, "training should move some bias"
    assert all(k.endswith(".bias") for k in changed | new), sorted(changed | new)
    if arch == "bert":
        assert not new and len(changed) == 2 * 8 + 2  # 6 linear layers and 2 norms a block, the embeddings' norm, the pooler
    else:  # Llama has no biases: merging gives each linear layer one
        assert len(new) == 14 and not changed


# ---- LN tuning --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", list(ARCHS))
def test_ln_tuning_changes_only_norm_parameters(arch):
    base = ARCHS[arch]()
    norms = {f"{n}.{p}" for n, m in base.named_modules() if is_norm(m) for p, _ in m.named_parameters()}
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = trained(peftlab.attach(ARCHS[arch](), "ln_tuning"), arch, lr=1e-2)
    assert len(wrapped(model)) == 5  # two a block, and the final norm (Llama) or the embeddings' norm (BERT)
    changed, new = changed_after_merging(model, original)
    assert not new and changed and changed <= norms, sorted(changed - norms)


def _move(model, words=("ln_tuning", "adapters."), seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(w in name for w in words):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("factory,spec", [(make_llama, "ln_tuning"), (make_bert, "ln_tuning[modules_to_save=[classifier]]"),
                                          (make_llama, "ln_tuning[targets=[input_layernorm],layers=[1]]")],
                         ids=["llama", "bert", "llama-one-norm"])
def test_peftlab_ln_tuning_loads_in_peft(factory, spec, ids, tmp_path):
    model = _move(peftlab.attach(factory(), spec))
    assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "LN_TUNING")


@pytest.mark.parametrize("factory,kwargs", [(make_llama, dict(task_type="CAUSAL_LM")),
                                            (make_bert, dict(task_type="SEQ_CLS", target_modules=["LayerNorm"]))],
                         ids=["llama-defaults", "bert"])
def test_peft_ln_tuning_loads_in_peftlab(factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.LNTuningConfig, kwargs, tmp_path, ids, randomize=_move, seed=0,
                                 words=("ln_tuning",))
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


# ---- select -----------------------------------------------------------------------------------

def _count(model, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def test_select_trains_exactly_the_chosen_modules():
    model = peftlab.attach(make_llama(), "select[targets=attention,layers=[1]]")
    assert {n.split(".")[-1] for n in wrapped(model)} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == _count(make_llama(), "model.layers.1.self_attn.") == 2 * 32 * 32 + 2 * 16 * 32
    original = {k: v.clone() for k, v in make_llama().state_dict().items()}
    changed, new = changed_after_merging(trained(model, "llama", lr=1e-3), original)
    assert not new and changed == {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}


def test_top_layers_selects_the_last_blocks():
    top = peftlab.attach(make_llama(), "select[top_layers=1]")
    assert wrapped(top) == wrapped(peftlab.attach(make_llama(), "select[layers=[1]]")) and len(wrapped(top)) == 7
    both = peftlab.attach(make_bert(), "select[targets=[all-linear,norms],top_layers=2]")
    assert sum(p.numel() for p in both.parameters() if p.requires_grad) == _count(make_bert(), "bert.encoder.layer.")
    with pytest.raises(peftlab.ConfigError, match="top_layers=3.*only 2"):
        peftlab.attach(make_llama(), "select[top_layers=3]")


def test_select_cross_attention_only():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        is_decoder=True, add_cross_attention=True, attn_implementation="eager")
    model = BertModel(config).eval()
    peftlab.attach(model, "select[targets=crossattention]")
    assert wrapped(model) and all(".crossattention." in n for n in wrapped(model))
    crossattention = sum(_count(model, f"encoder.layer.{i}.crossattention.") // 2 for i in range(2))  # base + delta
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == crossattention
    ids, memory = torch.randint(3, VOCAB, (2, 5)), torch.randn(2, 4, HIDDEN)
    model(input_ids=ids, encoder_hidden_states=memory).last_hidden_state.square().mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(".crossattention." in n and ".deltas." in n for n in with_grad), sorted(with_grad)


def test_select_computes_with_weight_plus_delta(ids):
    model = peftlab.attach(make_llama(), "select[targets=[v_proj,post_attention_layernorm]]")
    _move(model)
    by_hand = make_llama()
    with torch.no_grad():
        for name in wrapped(model):
            for pname, delta in model.get_submodule(name).adapters["default"].deltas.items():
                getattr(by_hand.get_submodule(name), pname).add_(delta)
    torch.testing.assert_close(logits(model, ids), logits(by_hand, ids), rtol=1e-5, atol=1e-5)
    with peftlab.routing(model, ["default", None, "default"]):  # the delta path, row by row
        routed = logits(model, ids)
    torch.testing.assert_close(routed[[0, 2]], logits(by_hand, ids)[[0, 2]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], logits(make_llama(), ids)[1], rtol=0, atol=1e-5)


def test_an_empty_selection_is_a_clear_error():
    with pytest.raises(peftlab.TargetError, match="crossattention"):
        peftlab.attach(make_llama(), "select[targets=crossattention]")
    with pytest.raises(peftlab.TargetError, match="layers"):
        peftlab.attach(make_llama(), "select[targets=attention,layers=[5]]")


# ---- the target rules these defaults rely on ----------------------------------------------------

def test_targets_mix_all_linear_with_roles_and_type_roles_skip_what_a_method_cannot_wrap():
    lora = peftlab.attach(make_llama(), "lora[targets=[all-linear,norms]]")
    assert len(wrapped(lora)) == 14  # LoRA cannot wrap RMSNorm: the norms are left out
    with pytest.raises(peftlab.TargetError, match="RMSNorm"):  # ...unless nothing else is left
        peftlab.attach(make_llama(), "lora[targets=norms]")
    with pytest.raises(peftlab.TargetError, match="RMSNorm"):  # a norm named explicitly is still an error
        peftlab.attach(make_llama(), "lora[targets=[q_proj,input_layernorm]]")


def test_a_container_stands_for_the_modules_inside_it():
    model = peftlab.attach(make_llama(), "lora[targets=mlp,layers=[0]]")
    assert wrapped(model) == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
