"""The adapter life cycle on real (tiny) transformers: attach, freeze, train, target matching,
configs and spec strings, many named adapters, merge / unmerge / unload / delete."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import VOCAB, logits, make_bert, make_gpt2, make_llama, randomize_adapters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peftlab
from peftlab.core.config import parse_spec, parse_value
from peftlab.core.layer import AdapterLayer
from peftlab.core.state import STATE_ATTR
from peftlab.methods.lora import LoraConfig


def wrapped(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, AdapterLayer))


def leaf_names(model):
    return {n.split(".")[-1] for n in wrapped(model)}


# ---- attach: output equals the base at init -----------------------------------------------------

INIT_CASES = [
    (make_llama, "lora[r=4]", 0),
    (make_llama, "lora[r=4,init=gaussian]", 0),
    (make_llama, "lora[r=4,rslora=true,dropout=0.1]", 0),
    (make_llama, "dora[r=4]", 1e-5),
    (make_llama, "lora[r=4,init=pissa]", 1e-5),
    (make_llama, "lora[r=4,targets=embed_tokens]", 0),
    (make_llama, "lora[r=4,targets=[embed_tokens,q_proj,down_proj,lm_head]]", 0),
    (make_gpt2, "lora[r=4]", 0),
    (make_gpt2, "lora[r=4,targets=[wte,c_attn]]", 0),
    (make_gpt2, "lora[r=4,init=pissa]", 1e-5),
    (make_gpt2, "dora[r=4,init=gaussian]", 1e-5),
    (make_bert, "lora[r=4,modules_to_save=classifier]", 0),
    (make_bert, "dora[r=2,targets=[query,value]]", 1e-5),
]


@pytest.mark.parametrize("factory,spec,tol", INIT_CASES, ids=[f"{f.__name__[5:]}-{s}" for f, s, _ in INIT_CASES])
def test_attach_output_equals_base_at_init(factory, spec, tol, ids):
    base = factory()
    model = peftlab.attach(factory(), spec)
    assert wrapped(model), "nothing was wrapped"
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=max(tol, 1e-6))


def test_attach_freezes_everything_but_adapters(llama):
    peftlab.attach(llama, "lora[r=4,targets=[q_proj,v_proj]]")
    trainable = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # (A, B) x (q, v) x 2 layers
    s = peftlab.summary(llama)
    assert s["trainable"] == sum(llama.get_parameter(n).numel() for n in trainable) == s["adapters"]["default"]


def test_modules_to_save_are_trainable(bert):
    peftlab.attach(bert, "lora[r=4,targets=[query,value],modules_to_save=[classifier]]")
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert all(n.startswith("classifier.") or ".adapters.default." in n for n in trainable)


@pytest.mark.parametrize("factory,spec", [
    (make_llama, "lora[r=4,init=gaussian,targets=all-linear]"),
    (make_llama, "dora[r=4,targets=[q_proj,v_proj,up_proj]]"),
    (make_llama, "lora[r=4,init=pissa,targets=[q_proj,o_proj]]"),
    (make_llama, "lora[r=4,targets=[embed_tokens,v_proj]]"),
    (make_gpt2, "lora[r=4,targets=[c_attn,c_fc]]"),
    (make_bert, "lora[r=4,targets=[query,value],modules_to_save=[classifier]]"),
])
def test_training_step_changes_only_adapter_params(factory, spec, ids):
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)  # B = 0 at init would leave A without gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # deliberately *all* parameters
    out = model(input_ids=ids, labels=ids if factory is not make_bert else torch.tensor([0, 1, 2]))
    out.loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    allowed = {n for n in before if ".adapters.default." in n or n.startswith("classifier.")}
    assert changed and changed <= allowed
    assert {n for n in allowed if n not in changed} == set(), "every adapter parameter should have moved"
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=0, atol=0)


def test_hooks_on_wrapped_modules_still_run(ids):
    """Forward hooks on a wrapped module (activation capture, offload hooks) keep working."""
    for spec in ("lora[r=2,targets=q_proj]", "dora[r=2,targets=q_proj]", "lora[r=2,targets=q_proj,init=pissa]"):
        model = make_llama()
        seen = []
        q = model.model.layers[0].self_attn.q_proj
        q.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
        q.register_forward_hook(lambda mod, args, out: out * 0.5)
        expected = logits(model, ids)
        peftlab.attach(model, spec)
        assert seen == ["pre"]
        out = logits(model, ids)
        assert seen == ["pre", "pre"], spec
        if "pissa" not in spec:  # (PiSSA's base layer holds only the residual, so the hook sees that)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5, msg=spec)


# ---- targets ----------------------------------------------------------------------------------

def test_targets_suffixes(llama):
    peftlab.attach(llama, "lora[targets=[q_proj,v_proj]]")
    assert wrapped(llama) == sorted(f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj"))


def test_targets_dotted_suffix(llama):
    peftlab.attach(llama, "lora[targets=mlp.down_proj]")
    assert wrapped(llama) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_targets_regex(llama):
    peftlab.attach(llama, r"lora[targets='re:.*layers\.1\..*_proj']")
    names = wrapped(llama)
    assert len(names) == 7 and all(".layers.1." in n for n in names)
    # a regex must match the whole name, not a part of it
    with pytest.raises(peftlab.TargetError):
        peftlab.attach(make_llama(), "lora[targets='re:q_proj']")


def test_all_linear_excludes_output_head(llama, bert, gpt2):
    peftlab.attach(llama, "lora[targets=all-linear]")
    assert len(wrapped(llama)) == 14 and "lm_head" not in wrapped(llama)
    peftlab.attach(bert, "lora")  # all-linear is the default
    assert "classifier" not in wrapped(bert) and len(wrapped(bert)) == 2 * 6 + 1  # + pooler.dense
    peftlab.attach(gpt2, "lora")
    assert leaf_names(gpt2) == {"c_attn", "c_proj", "c_fc"} and "lm_head" not in wrapped(gpt2)


def test_targets_layers_and_exclude(llama):
    peftlab.attach(llama, "lora[targets=all-linear,layers=[1],exclude=[o_proj,'re:.*mlp\\.up_proj']]")
    names = wrapped(llama)
    assert all(".layers.1." in n for n in names)
    assert leaf_names(llama) == {"q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"}
    m = peftlab.attach(make_llama(), "lora[targets=q_proj,layers=0]")
    assert wrapped(m) == ["model.layers.0.self_attn.q_proj"]


def test_target_matching_nothing_names_close_modules(llama):
    with pytest.raises(peftlab.TargetError) as info:
        peftlab.attach(llama, "lora[targets=[q_prj]]")
    assert "q_proj" in str(info.value)
    with pytest.raises(peftlab.TargetError) as info:
        peftlab.attach(llama, "lora[targets=q_proj,layers=[7]]")
    assert "layers [7]" in str(info.value)
    assert not wrapped(llama) and all(p.requires_grad for p in llama.parameters()), "a failed attach touched the model"


def test_target_that_cannot_be_wrapped(llama):
    with pytest.raises(peftlab.TargetError, match="RMSNorm"):
        peftlab.attach(llama, "lora[targets=input_layernorm]")
    with pytest.raises(peftlab.TargetError, match="Embedding"):
        peftlab.attach(llama, "dora[targets=embed_tokens]")


def test_failed_attach_leaves_model_untouched(llama, ids):
    """Errors found while building adapters must not leave half an adapter behind."""
    ref = logits(llama, ids)
    weights = {k: v.clone() for k, v in llama.state_dict().items()}
    bad = [
        "lora[targets=[q_proj],modules_to_save=[no_such_head]]",
        "lora[init=pissa,targets=[q_proj,embed_tokens]]",  # pissa cannot do embeddings: found mid-way
        "lora[init=pissa,targets=[q_proj,lm_head,embed_tokens]]",
    ]
    for spec in bad:
        with pytest.raises(peftlab.PeftlabError):
            peftlab.attach(llama, spec)
        assert not wrapped(llama), spec
        assert all(p.requires_grad for p in llama.parameters()), spec
        for k, v in llama.state_dict().items():
            torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    peftlab.attach(llama, "lora[r=2]")  # the name 'default' is still free
    torch.testing.assert_close(logits(llama, ids), ref, rtol=0, atol=1e-6)


def test_two_methods_cannot_claim_one_module(llama):
    with pytest.raises(peftlab.TargetError, match="both target"):
        peftlab.attach(llama, "lora[targets=q_proj]|dora[targets=[q_proj,v_proj]]")
    peftlab.attach(llama, "lora[targets=q_proj]|dora[targets=v_proj]")
    assert peftlab.summary(llama)["methods"].keys() == {"lora", "dora"}


# ---- configs and spec strings ----------------------------------------------------------------

def test_spec_strings_parse():
    assert parse_spec("lora[r=16,alpha=32,targets=[q_proj,v_proj]]|dora") == [
        ("lora", {"r": 16, "alpha": 32, "targets": ["q_proj", "v_proj"]}), ("dora", {})]
    assert parse_spec(" LoRA[ dropout = 0.05 , rslora=True, layers=[0, 1], init=none ] ") == [
        ("lora", {"dropout": 0.05, "rslora": True, "layers": [0, 1], "init": None})]
    assert parse_spec("lora[targets='re:.*(q|v)_proj',exclude=['a,b']]") == [
        ("lora", {"targets": "re:.*(q|v)_proj", "exclude": ["a,b"]})]


def test_spec_string_targets_reach_the_model(llama):
    peftlab.attach(llama, "lora[r=2, targets=[q_proj, v_proj]]")
    assert leaf_names(llama) == {"q_proj", "v_proj"}


_ident = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "none", "null", "inf", "nan", "infinity"))
_scalar = st.one_of(
    st.integers(-10**6, 10**6), st.booleans(), st.none(), _ident,
    st.floats(allow_nan=False, allow_infinity=False, width=32).filter(lambda f: not f.is_integer()),
    st.from_regex(r"[a-z.*()|\\:,\[\] ]{1,12}", fullmatch=True).map(lambda s: "re:" + s),  # needs quotes
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=4))


def _fmt(v):
    if isinstance(v, list):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str) and not v.isidentifier():
        return "'" + v + "'"
    return str(v)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True),
                          st.dictionaries(_ident, _value, max_size=5)), min_size=1, max_size=3))
def test_spec_string_round_trip(parts):
    spec = "|".join(f"{name}[{','.join(f'{k}={_fmt(v)}' for k, v in body.items())}]" for name, body in parts)
    assert parse_spec(spec) == [(name, body) for name, body in parts]


@pytest.mark.parametrize("raw,value", [("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-4", 1e-4), ("TRUE", True),
                                       ("None", None), ("'3'", "3"), ("[]", []), ("[a,[1,2]]", ["a", [1, 2]])])
def test_parse_value(raw, value):
    assert parse_value(raw) == value


def test_unknown_method_suggests():
    with pytest.raises(peftlab.ConfigError, match="did you mean 'lora'"):
        peftlab.attach(make_llama(), "lorra[r=4]")


def test_unknown_key_suggests():
    with pytest.raises(peftlab.ConfigError, match="did you mean 'alpha'") as info:
        peftlab.attach(make_llama(), "lora[alpah=4]")
    assert "known settings" in str(info.value)


def test_unknown_key_from_a_file_warns():
    with pytest.warns(UserWarning, match="newer peftlab"):
        config = LoraConfig.from_dict({"r": 4, "fancy_new_thing": 1}, strict=False)
    assert config.r == 4


@pytest.mark.parametrize("spec", [
    "", "lora[r=0]", "lora[r=-4]", "lora[r=2.5]", "lora[r=abc]", "lora[r=true]", "lora[alpha=0]", "lora[alpha=x]",
    "lora[dropout=1.0]", "lora[dropout=-0.1]", "lora[dropout=x]", "lora[init=svd]", "lora[targets=[]]",
    "lora[layers=[-1]]", "lora[layers=[a]]", "lora[layers=true]", "lora[layers=[true]]", "lora[layers=x]", "lora[r=4", "lora[r]", "lora[targets=[q_proj]", "lora[rank_pattern=5]",
    "lora[alpha_pattern=[1]]", "lora[targets=5]", "lora[exclude=3]", "lora[rslora=maybe]", "dora[init=pissa]",
    "lora[modules_to_save=[1]]", "lo ra", "lora|",
])
def test_bad_configs_raise_config_error(spec):
    with pytest.raises(peftlab.ConfigError):
        peftlab.attach(make_llama(), spec)


def test_bad_adapter_names(llama):
    for name in ("", "a.b", 3):
        with pytest.raises(peftlab.ConfigError):
            peftlab.attach(llama, "lora", name=name)
    peftlab.attach(llama, "lora")
    with pytest.raises(peftlab.ConfigError, match="already has an adapter"):
        peftlab.attach(llama, "lora")


def test_config_objects_and_dicts(llama, ids):
    peftlab.attach(llama, LoraConfig(r=2, targets=["q_proj"]), name="a")
    peftlab.attach(llama, {"method": "dora", "r": 2, "targets": "v_proj"}, name="b")
    assert leaf_names(llama) == {"q_proj", "v_proj"}
    with pytest.raises(peftlab.ConfigError):
        peftlab.attach(llama, LoraConfig(r=0), name="c")


# ---- many named adapters ----------------------------------------------------------------------

def _manual_lora(base, model, names):
    """Independent oracle: fold s * B @ A of adapters ``names`` into a copy of the base by hand."""
    ref = copy.deepcopy(base)
    if hasattr(ref, "lm_head"):  # untie: an adapter on the input embedding does not change the output head
        ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
    for mod_name, layer in model.named_modules():
        if not isinstance(layer, AdapterLayer):
            continue
        target = ref.get_submodule(mod_name)
        for n in names:
            if n not in layer.adapters:
                continue
            a = layer.adapters[n]
            with torch.no_grad():
                if hasattr(a, "lora_embedding_A"):
                    target.weight += (a.lora_embedding_B @ a.lora_embedding_A).t() * a.scaling
                else:
                    d = (a.lora_B.weight @ a.lora_A.weight) * a.scaling
                    target.weight += d.t() if type(target).__name__ == "Conv1D" else d
    return ref


def _two_adapters(factory=make_llama):
    base = factory()
    model = factory()
    peftlab.attach(model, "lora[r=4,targets=[q_proj,v_proj,down_proj,embed_tokens,c_attn,wte]]", name="x")
    peftlab.attach(model, "lora[r=2,alpha=4,targets=[q_proj,up_proj,c_fc]]", name="y")
    randomize_adapters(model)
    return base, model


@pytest.mark.parametrize("factory", [make_llama, make_gpt2])
def test_set_active_one_or_several(factory, ids):
    base, model = _two_adapters(factory)
    for active in (["x"], ["y"], ["x", "y"], ["y", "x"], []):
        peftlab.set_active(model, active)
        expected = logits(_manual_lora(base, model, active), ids)
        torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'z'"):
        peftlab.set_active(model, "z")


def test_set_active_switches_what_trains():
    _, model = _two_adapters()
    peftlab.set_active(model, "y")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.y." in n for n in trainable)
    peftlab.set_active(model, ["x", "y"])
    assert any(".adapters.x." in n for n, p in model.named_parameters() if p.requires_grad)


def test_disabled_is_exactly_the_base(ids):
    base, model = _two_adapters()
    peftlab.attach(model, "dora[r=2,targets=[k_proj]]", name="d")
    randomize_adapters(model, seed=3)
    peftlab.set_active(model, ["x", "y", "d"])
    assert not torch.allclose(logits(model, ids), logits(base, ids), atol=1e-3)
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)
    assert not torch.allclose(logits(model, ids), logits(base, ids), atol=1e-3)


def test_delete(ids):
    base, model = _two_adapters()
    peftlab.set_active(model, ["x", "y"])
    peftlab.delete(model, "x")
    assert peftlab.summary(model)["active"] == ["y"]
    assert all("x" not in m.adapters for m in model.modules() if isinstance(m, AdapterLayer))
    assert not any("embed_tokens" in n or "down_proj" in n for n in wrapped(model)), "layers left empty stay wrapped"
    torch.testing.assert_close(logits(model, ids), logits(_manual_lora(base, model, ["y"]), ids), rtol=0, atol=1e-5)
    peftlab.delete(model, "y")
    assert not wrapped(model)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=0, atol=0)
    with pytest.raises(peftlab.StateError):
        peftlab.set_active(model, "y")


MERGE_CASES = [
    (make_llama, "lora[r=4,targets=[q_proj,v_proj,o_proj,gate_proj]]"),
    (make_llama, "lora[r=4,rslora=true,targets=[embed_tokens,lm_head]]"),
    (make_gpt2, "lora[r=4,targets=[c_attn,c_proj,c_fc]]"),
    (make_llama, "dora[r=4,targets=[q_proj,v_proj,up_proj]]"),
    (make_gpt2, "dora[r=4,targets=[c_attn,c_fc]]"),
    (make_bert, "dora[r=4,targets=[query,value,dense]]"),  # with biases
    (make_llama, "lora[r=4,init=pissa,targets=[q_proj,down_proj]]"),
]


@pytest.mark.parametrize("factory,spec", MERGE_CASES, ids=[f"{f.__name__[5:]}-{s}" for f, s in MERGE_CASES])
def test_merge_equals_unmerged_and_unmerge_restores(factory, spec, ids):
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    peftlab.merge(model)
    assert peftlab.summary(model)["merged"] == ["default"]
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(peftlab.StateError):
        peftlab.merge(model)
    with pytest.raises(peftlab.StateError):
        with peftlab.disabled(model):
            pass  # entering is fine; running the base is not
        with peftlab.disabled(model):
            logits(model, ids)
    peftlab.unmerge(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    with pytest.raises(peftlab.StateError):
        peftlab.unmerge(model)


def test_merge_one_of_several(ids):
    _, model = _two_adapters()
    peftlab.attach(model, "lora[r=2,init=pissa,targets=[q_proj,k_proj]]", name="p")
    randomize_adapters(model, seed=5)
    for active in (["x", "p"], ["p", "y"], ["x", "y"]):
        peftlab.set_active(model, active)
        ref = logits(model, ids)
        for name in active:
            peftlab.merge(model, name)
            torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5, msg=f"{active} merged {name}")
        for name in reversed(active):
            peftlab.unmerge(model, name)
            torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5, msg=f"{active} unmerged {name}")


@pytest.mark.parametrize("target", ["wte", "lm_head"])
def test_merge_refuses_tied_weights(gpt2, target, ids):
    """GPT-2 ties lm_head to wte: merging into one would silently change the other."""
    peftlab.attach(gpt2, f"lora[r=4,targets={target}]")
    randomize_adapters(gpt2)
    expected = logits(gpt2, ids)
    with pytest.raises(peftlab.StateError, match="tied"):
        peftlab.merge(gpt2)
    assert peftlab.summary(gpt2)["merged"] == []
    torch.testing.assert_close(logits(gpt2, ids), expected, rtol=0, atol=0)


def _state_keys(model):
    return list(model.state_dict().keys())


@pytest.mark.parametrize("factory,spec", [
    (make_llama, "lora[r=4,targets=[q_proj,embed_tokens,lm_head]]"),
    (make_gpt2, "dora[r=4]"),
    (make_llama, "lora[r=4,init=pissa]"),
    (make_bert, "lora[r=4,modules_to_save=classifier]"),
])
def test_unload_unmerged_gives_the_base(factory, spec, ids):
    original = factory()
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)
    plain = peftlab.unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert not hasattr(plain, STATE_ATTR)
    assert _state_keys(plain) == _state_keys(original)
    tol = 1e-5 if "pissa" in spec else 0
    for k, v in original.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[k], v, rtol=0, atol=tol, msg=k)
    torch.testing.assert_close(logits(plain, ids), logits(original, ids), rtol=0, atol=tol)


@pytest.mark.parametrize("factory,spec", [
    (make_llama, "lora[r=4,targets=[q_proj,embed_tokens]]"),
    (make_gpt2, "dora[r=4]"),
    (make_llama, "lora[r=4,init=pissa]"),
])
def test_unload_merged_keeps_the_adapter(factory, spec, ids):
    original = factory()
    model = peftlab.attach(factory(), spec)
    randomize_adapters(model)
    expected = logits(model, ids)
    peftlab.merge(model)
    plain = peftlab.unload(model)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert _state_keys(plain) == _state_keys(original)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=0, atol=1e-5)


def test_lifecycle_errors_without_adapters(llama):
    for call in (peftlab.merge, peftlab.unmerge, peftlab.unload, lambda m: peftlab.set_active(m, "x")):
        with pytest.raises(peftlab.StateError, match="no peftlab adapters"):
            call(llama)
    with pytest.raises(TypeError):
        peftlab.attach("not a model", "lora")


def test_summary_counts(llama):
    total = sum(p.numel() for p in llama.parameters())
    peftlab.attach(llama, "lora[r=4,targets=q_proj]")
    s = peftlab.summary(llama)
    assert s["adapters"]["default"] == 2 * (4 * 32 + 32 * 4)
    assert s["base"] == total and s["total"] == total + s["adapters"]["default"]
    assert math.isclose(s["trainable_percent"], round(100 * s["trainable"] / s["total"], 4))
    assert VOCAB == llama.config.vocab_size
