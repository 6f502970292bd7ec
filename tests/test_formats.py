"""The Hugging Face PEFT format, checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import logits, make_bert, make_gpt2, make_llama, randomize_adapters
from safetensors import safe_open

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods.lora import LoraConfig

LABELS = torch.tensor([0, 1, 2])


def _perturb_head(model, name="classifier", seed=9):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_submodule(name).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def _peft_logits(base, folder, ids):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    return logits(model, ids)


OURS = [
    ("lora", make_llama, "lora[r=4,alpha=8,targets=[q_proj,v_proj]]"),
    ("lora-all-linear", make_llama, "lora[r=4,alpha=16,init=gaussian]"),
    ("dora", make_llama, "dora[r=4,targets=[q_proj,v_proj,down_proj]]"),
    ("rslora", make_llama, "lora[r=8,alpha=4,rslora=true,targets=[k_proj,o_proj]]"),
    ("rslora-dora", make_llama, "dora[r=8,alpha=4,rslora=true,targets=[up_proj]]"),
    ("embedding", make_llama, "lora[r=4,targets=[embed_tokens,q_proj]]"),
    ("gpt2-conv1d", make_gpt2, "lora[r=4,targets=[c_attn,c_proj,c_fc]]"),
    ("gpt2-dora", make_gpt2, "dora[r=2,targets=[c_attn]]"),
    ("layers", make_llama, "lora[r=2,targets=[q_proj,v_proj],layers=[1]]"),
    ("pissa", make_llama, "lora[r=4,init=pissa,targets=[q_proj,v_proj,gate_proj]]"),
    ("pissa-rslora-gpt2", make_gpt2, "lora[r=2,alpha=4,rslora=true,init=pissa,targets=[c_attn,c_fc]]"),
    ("bert-cls", make_bert, "lora[r=4,targets=[query,value],modules_to_save=[classifier]]"),
    ("bert-cls-dora", make_bert, "dora[r=2,targets=[query,key,dense],modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_adapter_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)
    if factory is make_bert:
        _perturb_head(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    torch.testing.assert_close(_peft_logits(factory(), tmp_path, ids), expected, rtol=0, atol=1e-5)


def test_rank_and_alpha_pattern_load_in_peft(ids, tmp_path):
    config = LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                        rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"layers.0.self_attn.q_proj": 3})
    model = peftlab.attach(make_llama(), config)
    randomize_adapters(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and len(saved["rank_pattern"]) == 3
    torch.testing.assert_close(_peft_logits(make_llama(), tmp_path, ids), expected, rtol=0, atol=1e-5)
    back = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(back, ids), expected, rtol=0, atol=0)


def test_saved_config_fields(tmp_path):
    model = peftlab.attach(make_gpt2(), "dora[r=4,alpha=8,rslora=true,init=gaussian,targets=[c_attn,c_fc]]")
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["use_dora"] is True and config["use_rslora"] is True and config["fan_in_fan_out"] is True
    assert config["init_lora_weights"] == "gaussian" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == ["c_attn", "c_fc"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        info = json.loads(f.metadata()["peftlab"])
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" in keys
    assert info["config"]["method"] == "dora" and len(info["base_fingerprint"]) == 16
    # a selection a suffix cannot express is written as full module names
    model = peftlab.attach(make_llama(), "lora[targets=q_proj,layers=[0]]")
    peftlab.save(model, tmp_path / "full")
    config = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]


PEFTS = [
    ("lora", make_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("dora", make_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True)),
    ("rslora", make_llama, dict(r=8, lora_alpha=4, target_modules=["k_proj", "up_proj"], use_rslora=True)),
    ("embedding", make_llama, dict(r=4, target_modules=["embed_tokens", "o_proj"])),
    ("all-linear", make_llama, dict(r=2, target_modules="all-linear")),
    ("patterns", make_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                  rank_pattern={"v_proj": 2}, alpha_pattern={"model.layers.1.self_attn.q_proj": 2})),
    ("layers", make_llama, dict(r=2, target_modules=["q_proj"], layers_to_transform=[1])),
    ("gpt2-conv1d", make_gpt2, dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    ("gpt2-dora", make_gpt2, dict(r=4, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True)),
    ("bert-cls", make_bert, dict(r=4, target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    ("bert-cls-auto-head", make_bert, dict(r=2, target_modules=["query"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_adapter_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(factory(), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    ours = peftlab.load(factory(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    # and back again: re-saved by peftlab, loaded by peft
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(_peft_logits(factory(), tmp_path / "again", ids), expected, rtol=0, atol=1e-5)


ROUND_TRIPS = [
    (make_llama, "lora[r=4,targets=[q_proj,embed_tokens,lm_head]]"),
    (make_llama, "dora[r=2,rslora=true]"),
    (make_gpt2, "lora[r=2,targets=[c_attn,wte]]"),
    (make_bert, "dora[r=2,modules_to_save=classifier]"),
]


@pytest.mark.parametrize("factory,spec", ROUND_TRIPS)
def test_round_trip_is_exact(factory, spec, ids, tmp_path):
    model = peftlab.attach(factory(), spec, name="mine")
    randomize_adapters(model)
    if factory is make_bert:
        _perturb_head(model)
    peftlab.save(model, tmp_path, name="mine")
    back = peftlab.load(factory(), tmp_path, name="again")
    assert peftlab.summary(back)["active"] == ["again"]
    theirs = {k.replace(".mine.", "."): v for k, v in model.state_dict().items()}
    mine = {k.replace(".again.", "."): v for k, v in back.state_dict().items()}
    assert theirs.keys() == mine.keys()
    for k in theirs:
        assert torch.equal(theirs[k], mine[k]), k
    assert torch.equal(logits(back, ids), logits(model, ids))
    trainable = {n for n, p in back.named_parameters() if p.requires_grad}
    assert trainable == {n.replace(".mine.", ".again.") for n, p in model.named_parameters() if p.requires_grad}


def test_load_as_second_adapter(ids, tmp_path):
    model = peftlab.attach(make_llama(), "lora[r=2,targets=q_proj]", name="a")
    randomize_adapters(model)
    peftlab.save(model, tmp_path, name="a")
    expected = logits(model, ids)
    peftlab.attach(model, "lora[r=2,targets=v_proj]", name="b")
    randomize_adapters(model, seed=3)
    peftlab.load(model, tmp_path, name="c")
    assert peftlab.summary(model)["active"] == ["c"]
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)
    with pytest.raises(peftlab.ConfigError, match="already has an adapter"):
        peftlab.load(model, tmp_path, name="c")


def test_a_union_is_saved_in_peftlab_format_and_round_trips(tmp_path, ids):
    model = randomize_adapters(peftlab.attach(make_llama(), "lora[targets=q_proj]|dora[r=2,targets=v_proj]"))
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PEFTLAB"
    assert [m["method"] for m in config["methods"]] == ["lora", "dora"]
    assert config["methods"][1]["modules"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    assert peftlab.summary(loaded)["methods"] == peftlab.summary(model)["methods"]


def test_save_refuses_what_it_cannot_write(tmp_path):
    model = peftlab.attach(make_llama(), "lora[targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'x'"):
        peftlab.save(model, tmp_path, name="x")
    peftlab.merge(model)
    with pytest.raises(peftlab.PeftlabError, match="unmerge"):
        peftlab.save(model, tmp_path)
    assert not any(tmp_path.iterdir())
    assert not any(isinstance(m, AdapterLayer) for m in peftlab.unload(model).modules())
