"""GLoRA: W' = W + W (.) A + B, b' = b + b (.) D + E + W C with each support tensor of a chosen type
(lora / vector / constant / none), merging, and HF PEFT's GLORA format checked against the real
``peft`` package both ways."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back,
    assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2, make_llama, peft_adapter_file,
    read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
QUERY0 = "bert.encoder.layer.0.attention.self.query"
TYPES = [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "constant"),
         ("none", "lora", "none")]


def randomize(model, seed: int = 0, std: float = 0.1):
    """Every GLoRA tensor (peftlab's or peft's) to random values, so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "glora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def bert_with_biases(seed: int = 0):
    """The tiny BERT with random biases (its init zeroes them), so that D, which scales b, matters."""
    model = make_bert(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def by_hand(a, W, b):
    """(W', b') from the paper's formula, each support tensor rebuilt from its raw parameters."""
    def value(path, shape):
        if path.kind == "lora":
            return path.Xd.detach().double() @ path.Xu.detach().double()
        if path.kind in ("vector", "constant"):
            return path.X.detach().double().reshape(-1)[0] * torch.ones(shape, dtype=torch.float64) \
                if path.kind == "constant" else path.X.detach().double()
        return torch.zeros(shape, dtype=torch.float64)
    out_features, in_features = W.shape
    W = W.double()
    A, B = value(a.glora_A, (out_features, in_features)), value(a.glora_B, (out_features, in_features))
    W_new = torch.empty_like(W)
    for i in range(out_features):  # written out row by row and entry by entry: W'_ij = W_ij (1 + A_ij) + B_ij
        for j in range(in_features):
            A_ij = A[i, j] if A.dim() == 2 and A.shape[1] > 1 else A.reshape(-1)[i]
            B_ij = B[i, j] if B.dim() == 2 and B.shape[1] > 1 else B.reshape(-1)[i]
            W_new[i, j] = W[i, j] * (1 + A_ij) + B_ij
    if b is None:
        return W_new, None
    b = b.double()
    C = value(a.glora_C, (in_features, 1)).reshape(in_features)
    D, E = value(a.glora_D, (out_features,)), value(a.glora_E, (out_features,))
    b_new = torch.stack([b[i] * (1 + D[i]) + E[i] + (W[i] * C).sum() for i in range(out_features)])
    return W_new, b_new


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("ab,c,de", TYPES, ids=["-".join(t) for t in TYPES])
def test_layer_is_the_generalized_prompt_module(ab, c, de):
    """The defining property: the layer computes x W'^T + b' with W' and b' from the paper's
    formula, for every type of support tensor, on a layer with a bias (BERT)."""
    model = randomize(peftlab.attach(bert_with_biases(), f"glora[r=3,ab={ab},c={c},de={de}]"), std=0.2)
    layer = model.get_submodule(QUERY0)
    a = layer.adapters["default"]
    base = layer.base_layer
    W_new, b_new = by_hand(a, base.weight.detach(), base.bias.detach())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ W_new.T + b_new, rtol=1e-5, atol=1e-5)
    counts = {"lora": 3 * (32 + 32), "vector": 32, "constant": 1, "none": 0}
    c_count = {"lora": 3 * (32 + 1), "vector": 32, "none": 0}[c]
    assert sum(p.numel() for p in a.parameters()) == 2 * counts[ab] + c_count + 2 * counts[de]


def test_a_layer_without_a_bias_has_no_bias_terms():
    model = randomize(peftlab.attach(make_llama(), "glora[r=4]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    assert (a.glora_C.kind, a.glora_D.kind, a.glora_E.kind) == ("none", "none", "none")
    W_new, _ = by_hand(a, layer.base_layer.weight.detach(), None)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), x.double() @ W_new.T, rtol=1e-5, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".glora_A." in n or ".glora_B." in n for n in trainable)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_delta(routed):
    model = randomize(peftlab.attach(bert_with_biases(), "glora[ab=vector,de=vector]"))
    layer = model.get_submodule(QUERY0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        dW, db = a.deltas()
        expected = layer.base_layer(x) + x @ dW.T + db
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_path():
    model = randomize(peftlab.attach(bert_with_biases(), "glora[r=2,ab=lora,c=lora,de=vector]"))
    model.train()
    layer = model.get_submodule(QUERY0)
    layer(torch.randn(2, 4, 32)).square().sum().backward()
    a = layer.adapters["default"]
    for name, p in a.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.base_layer.weight.grad is None


def test_starts_as_the_base_model(ids):
    for factory in (make_llama, make_bert):
        for ab, c, de in TYPES:
            model = peftlab.attach(factory(), f"glora[ab={ab},c={c},de={de}]")
            torch.testing.assert_close(logits(model, ids), logits(factory(), ids), rtol=0, atol=0)
    random = peftlab.attach(make_bert(), "glora[init=random]")  # PEFT's init_weights=False
    assert not torch.allclose(logits(random, ids), logits(make_bert(), ids), atol=1e-4)


@pytest.mark.parametrize("factory,spec", [(make_llama, "glora"), (bert_with_biases, "glora[ab=vector,c=vector,de=vector]"),
                                          (bert_with_biases, "glora[ab=constant,de=constant]")])
def test_merge_equals_unmerged_and_unmerge_restores(factory, spec, ids):
    model = randomize(peftlab.attach(factory(), spec))
    layer = model.get_submodule(Q0 if factory is make_llama else QUERY0)
    base = layer.base_layer
    W, b = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    W_new, b_new = by_hand(layer.adapters["default"], W, b)
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(base.weight.double(), W_new, rtol=0, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(base.bias.double(), b_new, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(base.weight, W, rtol=0, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(base.bias, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_a_scale_that_cannot_be_undone_is_not_merged(ids):
    model = peftlab.attach(make_llama(), "glora[ab=constant]")
    with torch.no_grad():
        adapter(model).glora_A.X.fill_(-1.0)  # W (1 + A) = 0: the base weight could not be recovered
    W = model.get_submodule(Q0).base_layer.weight.detach().clone()
    with pytest.raises(peftlab.StateError, match="1 \\+ A"):
        peftlab.merge(model)
    torch.testing.assert_close(model.get_submodule(Q0).base_layer.weight, W, rtol=0, atol=0)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_bert(), "glora[r=4,ab=vector,c=lora,de=vector]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    model = peftlab.attach(make_llama(), "glora")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    a = adapter(model)
    assert (a.r, a.ab, a.de) == (8, "lora", "none") and a.glora_A.Xd.shape == (32, 8)
    bert = adapter(peftlab.attach(make_bert(), "glora"), QUERY0)
    assert (bert.c, bert.de) == ("lora", "constant") and bert.glora_C.Xu.shape == (8, 1)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("ab=diagonal", "ab must"), ("c=constant", "c must"),
                                           ("de=lora", "de must"), ("init=ones", "init"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"glora[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "glora")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "glora"),
    ("llama-constant", make_llama, "glora[ab=constant,targets=[q_proj,v_proj,down_proj]]"),
    ("bert-head-vector", bert_with_biases, "glora[r=4,ab=vector,c=vector,de=vector,modules_to_save=[classifier]]"),
    ("bert-none-ab", make_bert, "glora[ab=none,c=lora,de=constant,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_glora_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.2)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "GLORA")
    assert config["init_weights"] is True


PEFTS = [
    ("llama-q-v", make_llama, dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-vector", make_llama, dict(config_A_B="vector", target_modules="all-linear", task_type="CAUSAL_LM")),
    ("bert-seq-cls", bert_with_biases, dict(r=2, config_A_B="lora", config_C="lora", config_D_E="vector",
                                     target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
    ("bert-constant-none", make_bert, dict(config_A_B="constant", config_C="none", config_D_E="constant",
                                           target_modules=["value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_glora_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.GloraConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.2)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_format_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save(peftlab.attach(make_llama(), "glora[r=4]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"r": 2}, "do not belong together")
    for bad, match in (({"bias": "all"}, "bias"), ({"config_D_E": "lora"}, "de must")):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(peftlab.AdapterFormatError, match=match):
            peftlab.load(make_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("glora_C.zeros"))
    save_file({**tensors, key: torch.ones_like(tensors[key])}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="not zero"):
        peftlab.load(make_llama(), tmp_path)
    save_file({**tensors, "base_model.model.model.layers.0.self_attn.q_proj.glora_Z.X": torch.zeros(1)},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="unexpected tensor"):
        peftlab.load(make_llama(), tmp_path)
