"""LiLy: locally shared A projectors, globally shared B experts mixed by a per-layer router whose
weights are averaged over the batch's tokens; the grouping rules; no merge; routing refused; and
HF PEFT's LILY format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import (
    assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft, logits, make_bert, make_gpt2,
    make_llama, peft_adapter_file, read_adapter_config,
)
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer

Q, V, DOWN = "model.layers.{}.self_attn.q_proj", "model.layers.{}.self_attn.v_proj", "model.layers.{}.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every LiLy tensor (peftlab's or peft's) to random values, so experts and routers matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lily_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name):
    return model.get_submodule(name).adapters["default"]


def by_hand(x, A, B, router, num_B, scaling):
    """The paper's update, token by token: h = A x; router probabilities per token, averaged over all
    tokens of the batch; the experts' weighted sum; scaling * h @ B_mix."""
    tokens = x.reshape(-1, x.shape[-1])
    hidden = [A @ t for t in tokens]
    probs = [torch.exp(router @ h) / torch.exp(router @ h).sum() for h in hidden]
    p = sum(probs) / len(probs)
    r = A.shape[0]
    mixed = sum(p[e] * B[e * r:(e + 1) * r] for e in range(num_B))
    return torch.stack([scaling * (h @ mixed) for h in hidden]).reshape(*x.shape[:-1], -1)


# ---- the method --------------------------------------------------------------------------------

def test_shared_A_per_stride_and_shared_experts_per_group():
    """The defining property: in a 4-block Llama, stride_A=2 gives q_proj layers 0-1 one A and 2-3
    another; all q_proj layers read one expert set (num_B experts of r x out) and v_proj layers
    another; each layer has its own router; the tensors are stored (and trained) once."""
    model = peftlab.attach(make_llama(num_hidden_layers=4), "lily[r=3,stride_A=2,num_B=3,targets=[q_proj,v_proj]]")
    qs = [adapter(model, Q.format(i)) for i in range(4)]
    vs = [adapter(model, V.format(i)) for i in range(4)]
    for group in (qs, vs):
        assert group[0].shared("lily_A") is group[1].shared("lily_A")
        assert group[2].shared("lily_A") is group[3].shared("lily_A")
        assert group[0].shared("lily_A") is not group[2].shared("lily_A")
        assert all(a.shared("lily_B") is group[0].shared("lily_B") for a in group)
        assert len({id(a.lily_router) for a in group}) == 4
    assert qs[0].shared("lily_B") is not vs[0].shared("lily_B")
    assert qs[0].shared("lily_B").shape == (9, 32) and vs[0].shared("lily_B").shape == (9, 16)
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert sum("lily_A" in n for n in trainable) == 4 and sum("lily_B" in n for n in trainable) == 2
    assert sum("lily_router" in n for n in trainable) == 8
    assert sum(p.numel() for p in trainable.values()) == 4 * 3 * 32 + 9 * 32 + 9 * 16 + 8 * 3 * 3


@pytest.mark.parametrize("shape", [(3, 5, 32), (4, 32)], ids=["tokens", "rows"])
def test_layer_adds_the_routed_expert_mixture(shape):
    model = randomize(peftlab.attach(make_llama(), "lily[r=4,num_B=3,scaling=0.5,targets=[q_proj,v_proj]]"))
    layer = model.get_submodule(V.format(1))
    a = layer.adapters["default"]
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = layer.base_layer(x) + by_hand(x, a.shared("lily_A"), a.shared("lily_B"), a.lily_router, 3, 0.5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_the_router_averages_over_the_whole_batch():
    """Not row-separable (as in the paper's code and PEFT): a row's update depends on the other rows."""
    model = randomize(peftlab.attach(make_llama(), "lily[r=4,targets=q_proj]"))
    layer = model.get_submodule(Q.format(0))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert not torch.allclose(layer(x)[:1], layer(x[:1]), atol=1e-5)


def test_routing_a_part_of_the_batch_is_refused_clearly(ids):
    model = randomize(peftlab.attach(make_llama(), "lily[r=4]"))
    expected = logits(model, ids)
    with peftlab.routing(model, ["default"] * len(ids)):  # every row: the batch it sees alone
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    with pytest.raises(peftlab.StateError, match="cannot run on part of a routed batch"):
        with peftlab.routing(model, ["default", None, "default"]):
            logits(model, ids)


def test_identity_at_init_and_gradients(ids):
    model = peftlab.attach(make_llama(), "lily")
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    a = adapter(model, Q.format(1))
    assert torch.count_nonzero(a.shared("lily_B").grad), "the zero experts get a gradient from the first step"
    random = peftlab.attach(make_llama(), "lily[init=random]")
    assert torch.count_nonzero(adapter(random, Q.format(0)).shared("lily_B"))


def test_merge_is_refused_clearly():
    model = peftlab.attach(make_llama(), "lily")
    with pytest.raises(peftlab.StateError, match="cannot be merged"):
        peftlab.merge(model)


def test_share_rules():
    shape = peftlab.attach(make_llama(), "lily[share_by=shape,targets=[q_proj,o_proj]]")  # both 32 x 32
    a = [adapter(shape, n.format(i)) for i in range(2) for n in (Q, "model.layers.{}.self_attn.o_proj")]
    assert all(x.shared("lily_B") is a[0].shared("lily_B") for x in a)
    layer = peftlab.attach(make_llama(), "lily[share_by=layer,stride_A=2,targets=q_proj]")
    assert adapter(layer, Q.format(0)).shared("lily_A") is not adapter(layer, Q.format(1)).shared("lily_A")
    assert adapter(layer, Q.format(0)).shared("lily_B") is not adapter(layer, Q.format(1)).shared("lily_B")


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "lily[r=4,stride_A=2,num_B=3]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)
    assert adapter(loaded, Q.format(0)).shared("lily_A") is adapter(loaded, Q.format(1)).shared("lily_A")


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("stride_A=0", "stride_A"), ("num_B=1", "two to learn"),
                                           ("scaling=x", "scaling"), ("share_by=block", "share_by"), ("init=ones", "init"),
                                           ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"lily[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "lily")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "lily"),
    ("llama-stride-shape", lambda: make_llama(num_hidden_layers=3), "lily[r=4,stride_A=2,num_B=3,share_by=shape]"),
    ("llama-some-layers", make_llama, "lily[r=4,stride_A=2,targets=[q_proj,down_proj],layers=[1]]"),
    ("llama-per-layer", make_llama, "lily[r=4,share_by=layer,targets=[q_proj,v_proj]]"),
    ("bert-head", make_bert, "lily[r=4,num_B=3,stride_A=2,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_lily_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec)).eval()
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "LILY")
    assert config["num_B"] == core.get_state(model).configs["default"][0].num_B
    # peft shares what peftlab shares: the same groups after peft loads the file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(factory(), str(tmp_path))
    ours = {n: (id(a.shared("lily_A")), id(a.shared("lily_B"))) for n, a in core.method_adapters(model, "default", "lily")}
    peft_ids = {n.removeprefix("base_model.model."): (id(m.lily_A["default"]), id(m.lily_B["default"]))
                for n, m in theirs.named_modules() if hasattr(m, "lily_router") and "default" in m.lily_router}
    assert _partition(ours) == _partition(peft_ids)


def _partition(owners: dict):
    out = []
    for k in (0, 1):
        groups = {}
        for name, ident in owners.items():
            groups.setdefault(ident[k], []).append(name)
        out.append(sorted(groups.values()))
    return out


PEFTS = [
    ("llama-q-v-stride", lambda: make_llama(num_hidden_layers=3),
     dict(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=3, target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-regex", lambda: make_llama(num_hidden_layers=3),
     dict(r=4, stride_A=2, target_modules=r".*\.(q_proj|o_proj)", task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(r=4, num_B=2, scaling=0.5, target_modules=["query", "value", "dense"],
                                     task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_lily_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.LilyConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_inconsistent_or_incomplete_files_are_format_errors(tmp_path):
    peftlab.save(randomize(peftlab.attach(make_llama(), "lily[r=4,targets=q_proj]")), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = f"base_model.model.{Q.format(1)}.lily_B.weight"  # shared with layer 0's
    save_file({**tensors, key: tensors[key] + 1}, weights)
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="shares lily_B"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    save_file({k: v for k, v in tensors.items() if "router" not in k or "layers.1" not in k}, weights)
    with pytest.raises(peftlab.AdapterFormatError, match="lacks lily_router"):
        peftlab.load(make_llama(), tmp_path)
    save_file(tensors, weights)
    config = read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))
    with pytest.raises(peftlab.AdapterFormatError, match="do not belong together"):
        peftlab.load(make_llama(), tmp_path)
    peftlab.save(peftlab.attach(make_llama(), "lily[r=4,targets=[q_proj,k_proj]]"), tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())  # PEFT: q0 alone, q1 alone, k0 with k1
    mixed = {**config, "target_modules": ["model.layers.0.self_attn.q_proj", "q_proj", "k_proj"]}
    (tmp_path / "mixed" / "adapter_config.json").write_text(json.dumps(mixed))
    with pytest.raises(peftlab.AdapterFormatError, match="none of peftlab's rules"):
        peftlab.load(make_llama(), tmp_path / "mixed")


@pytest.mark.parametrize("spec", ["lily[targets=[k_proj,v_proj]]", "lily[r=4,stride_A=2,targets=[q_proj,k_proj,o_proj]]",
                                  "lily[r=4,share_by=shape,targets=[q_proj,o_proj]]",
                                  "lily[r=4,share_by=layer,targets=[q_proj]]"])
def test_peftlab_info_reads_the_file_and_counts_shared_tensors_once(tmp_path, spec):
    """PEFT's file holds a shared A or B under every layer that reads it: info counts the numbers the
    adapter trains, as the model has them."""
    from peftlab import cli

    model = peftlab.attach(make_llama(), spec)
    peftlab.save(model, tmp_path)
    info = cli.adapter_info(tmp_path)
    trained = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert info["peft_type"] == "LILY" and info["adapted_modules"] == len(list(core.all_adapters(model)))
    assert info["adapter_parameters"] == trained
