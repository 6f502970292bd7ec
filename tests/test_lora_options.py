"""HF PEFT's LoRA options in peftlab's LoRA: OLoRA init, lora_bias, LoRA+ (golden-tested against peft)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.methods import lora as lora_mod
from peftlab.train import TrainConfig
from peftlab.train.loop import make_optimizer, set_learning_rate, trainable_parameters
from peftlab.train.loraplus import loraplus_groups

from conftest import logits, make_bert, make_gpt2, make_llama, peft_logits, random_lm_rows, randomize_adapters

peft = pytest.importorskip("peft")

Q0 = "model.layers.0.self_attn.q_proj"


def _peft_model(factory, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(factory(), peft.LoraConfig(**kwargs)).eval()


def _nudge(model, scale=0.05, seed=0):
    """"Train" every adapter parameter a little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


# ---- OLoRA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,name", [(make_llama, Q0), (make_gpt2, "transformer.h.0.attn.c_attn")])
def test_olora_factors_and_unchanged_model(factory, name, ids):
    original = factory()
    W = lora_mod.base_weight(original.get_submodule(name)).detach().clone()  # (out x in), Conv1D transposed
    model = peftlab.attach(factory(), "lora[r=4,alpha=8,init=olora]")
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)
    layer = model.get_submodule(name)
    a = layer.adapters["default"]
    A, B = a.lora_A.weight, a.lora_B.weight
    Q, R = torch.linalg.qr(W)
    # B = Q[:, :r] has orthonormal columns, A = R[:r] is upper triangular (OLoRA, as peft's olora_init)
    torch.testing.assert_close(B.T @ B, torch.eye(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(A, torch.triu(A), rtol=0, atol=0)
    torch.testing.assert_close(B @ A, Q[:, :4] @ R[:4], rtol=0, atol=1e-5)
    # the base keeps W - s B A (not divided by s, as in peft)
    torch.testing.assert_close(lora_mod.base_weight(layer.base_layer), W - a.scaling * B @ A, rtol=0, atol=1e-5)
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)


def test_olora_matches_peft_init_bit_for_bit():
    ours = peftlab.attach(make_llama(), "lora[r=4,alpha=16,init=olora,targets=[q_proj,v_proj]]")
    theirs = _peft_model(make_llama, r=4, lora_alpha=16, init_lora_weights="olora", target_modules=["q_proj", "v_proj"])
    for i in (0, 1):
        for proj in ("q_proj", "v_proj"):
            a = ours.get_submodule(f"model.layers.{i}.self_attn.{proj}")
            t = theirs.base_model.model.get_submodule(f"model.layers.{i}.self_attn.{proj}")
            torch.testing.assert_close(a.adapters["default"].lora_A.weight, t.lora_A["default"].weight, rtol=0, atol=0)
            torch.testing.assert_close(a.adapters["default"].lora_B.weight, t.lora_B["default"].weight, rtol=0, atol=0)
            torch.testing.assert_close(a.base_layer.weight, t.base_layer.weight, rtol=0, atol=0)


@pytest.mark.parametrize("spec", ["lora[r=4,init=olora,targets=[q_proj,v_proj,gate_proj]]",
                                  "lora[r=2,alpha=4,rslora=true,init=olora,targets=[q_proj,down_proj]]"])
def test_olora_saves_plain_lora_that_peft_loads_on_the_original_base(spec, ids, tmp_path):
    model = _nudge(peftlab.attach(make_llama(), spec))
    trained = logits(model, ids)
    assert not torch.allclose(trained, logits(make_llama(), ids), atol=1e-3)
    peftlab.save(model, tmp_path)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["init_lora_weights"] is True and hf["r"] == 2 * (4 if "r=4" in spec else 2)  # plain LoRA of rank 2r
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), trained, rtol=0, atol=1e-5)


def test_peft_olora_converted_files_load_here(ids, tmp_path):
    theirs = _peft_model(make_llama, r=4, lora_alpha=8, init_lora_weights="olora", target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path / "init")  # the initial OLoRA adapter, before training
    _nudge(theirs)
    expected = logits(theirs, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    ours = peftlab.load(make_llama(), tmp_path / "trained")
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    # the unconverted file fits only OLoRA's modified base: a clear refusal
    with pytest.raises(peftlab.AdapterFormatError, match="path_initial_model_for_weight_conversion"):
        theirs.save_pretrained(tmp_path / "raw")
        peftlab.load(make_llama(), tmp_path / "raw")


def test_olora_merge_delete_and_training_step(ids):
    original = make_llama()
    model = _nudge(peftlab.attach(make_llama(), "lora[r=4,init=olora]"))
    before = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    peftlab.delete(model, "default")
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-5)


def test_olora_bad_settings():
    with pytest.raises(peftlab.ConfigError, match="olora"):
        peftlab.attach(make_llama(), "lora[r=40,init=olora,targets=q_proj]")  # q_proj is 32x32
    with pytest.raises(peftlab.ConfigError, match="olora"):
        peftlab.attach(make_llama(), "lora[init=olora,targets=embed_tokens]")
    for method in ("dora", "lora_fa", "moslora"):
        with pytest.raises(peftlab.ConfigError, match="olora"):
            peftlab.attach(make_llama(), f"{method}[r=4,init=olora,targets=q_proj]")


# ---- lora_bias --------------------------------------------------------------------------------

BIAS_SPEC = "lora[r=4,lora_bias=true,targets=[query,value,dense],modules_to_save=[classifier]]"


def test_lora_bias_trains_and_merges(ids):
    model = peftlab.attach(make_bert(), BIAS_SPEC)
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    bias = layer.adapters["default"].lora_B.bias
    assert bias.requires_grad and torch.count_nonzero(bias) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_bert(), ids), rtol=0, atol=1e-5)
    model.train()
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2]))
    out.loss.backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    model.eval()
    _nudge(model)
    unmerged = logits(model, ids)
    base_bias = layer.base_layer.bias.detach().clone()
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.bias, base_bias + layer.adapters["default"].scaling * bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.bias, base_bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_lora_bias_fused_path_matches_unfused(ids):
    model = _nudge(peftlab.attach(make_llama(), "lora[r=4,lora_bias=true,targets=[q_proj,v_proj]]"))
    fused = logits(model, ids)
    a = model.get_submodule(Q0).adapters["default"]
    x = torch.randn(5, 32)
    base = model.get_submodule(Q0).base_layer
    torch.testing.assert_close(a.fused_forward(base, x), base(x) + a(x, None), rtol=0, atol=1e-5)
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            for i in (0, 1):
                layer = model.get_submodule(f"model.layers.{i}.self_attn.{name}")
                layer.adapters["default"].fused_forward = lambda base, x: None
    torch.testing.assert_close(logits(model, ids), fused, rtol=0, atol=1e-5)


def test_lora_bias_without_base_bias_cannot_merge():
    with pytest.warns(UserWarning, match="lora_bias"):
        model = peftlab.attach(make_llama(), "lora[r=4,lora_bias=true,targets=q_proj]")
    with pytest.raises(peftlab.StateError, match="lora_bias"):
        peftlab.merge(model)


def test_lora_bias_hf_both_ways(ids, tmp_path):
    ours = _nudge(peftlab.attach(make_bert(), BIAS_SPEC))
    expected = logits(ours, ids)
    peftlab.save(ours, tmp_path / "ours")
    from safetensors.torch import load_file
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    assert any(k.endswith("query.lora_B.bias") for k in load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    torch.testing.assert_close(peft_logits(make_bert, tmp_path / "ours", ids), expected, rtol=0, atol=1e-5)
    theirs = _nudge(_peft_model(make_bert, r=4, lora_bias=True, target_modules=["query", "value", "dense"],
                                 task_type="SEQ_CLS"), seed=3)
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = peftlab.load(make_bert(), tmp_path / "theirs")
    assert loaded.get_submodule("bert.encoder.layer.0.attention.self.query").adapters["default"].lora_B.bias is not None
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,match", [
    ("lora[lora_bias=1]", "lora_bias"),
    ("lora[lora_bias=true,init=olora]", "lora_bias"),
    ("lora[lora_bias=true,targets=embed_tokens]", "lora_bias"),
    ("dora[lora_bias=true,targets=q_proj]", "lora_bias"),
])
def test_lora_bias_bad_settings(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)


# ---- LoRA+ ------------------------------------------------------------------------------------

def _canonical_ours(name):
    return name.replace(".adapters.default", "")


def _canonical_peft(name):
    return name.removeprefix("base_model.model.").replace(".default", "").replace(".modules_to_save", "")


@pytest.mark.parametrize("factory,spec,kwargs", [
    (make_llama, "lora[r=4,targets=[q_proj,v_proj,embed_tokens]]",
     dict(target_modules=["q_proj", "v_proj", "embed_tokens"])),
    (make_bert, "lora[r=4,lora_bias=true,targets=[query,value],modules_to_save=[classifier]]",
     dict(target_modules=["query", "value"], lora_bias=True, task_type="SEQ_CLS")),
])
def test_loraplus_groups_match_peft(factory, spec, kwargs):
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio, lr_emb = 1e-3, 16.0, 3e-5
    ours = peftlab.attach(factory(), spec)
    cfg = TrainConfig(lr=lr, loraplus_lr_ratio=ratio, loraplus_lr_embedding=lr_emb, warmup_steps=0)
    params = trainable_parameters(ours)
    optimizer = make_optimizer(params, cfg)
    names = {id(p): _canonical_ours(n) for n, p in params.items()}
    our_lrs = {names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"]}
    theirs = _peft_model(factory, r=4, **kwargs)
    peft_opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                         loraplus_lr_embedding=lr_emb)
    pnames = {id(p): _canonical_peft(n) for n, p in theirs.named_parameters() if p.requires_grad}
    their_lrs = {pnames[id(p)]: g["lr"] for g in peft_opt.param_groups for p in g["params"]}
    assert our_lrs == pytest.approx(their_lrs)
    assert set(our_lrs.values()) >= {lr, lr * ratio}
    for name, value in our_lrs.items():
        expected = lr_emb if "lora_embedding" in name else lr * ratio if ("lora_B" in name or params[
            next(n for n in params if _canonical_ours(n) == name)].ndim == 1) else lr
        assert value == pytest.approx(expected), name


def test_loraplus_schedule_scales_every_group():
    model = peftlab.attach(make_llama(), "lora[r=4,targets=[q_proj,embed_tokens]]")
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=8, loraplus_lr_embedding=1e-4, warmup_steps=0)
    optimizer = make_optimizer(trainable_parameters(model), cfg)
    set_learning_rate(optimizer, 5e-4)  # half-way down the schedule
    rates = sorted(g["lr"] for g in optimizer.param_groups)
    assert rates == pytest.approx(sorted([5e-4, 5e-5, 4e-3]))


def test_loraplus_trains_and_resumes(tmp_path):
    from peftlab.train import train

    def run(steps, resume):
        cfg = TrainConfig(lr=1e-2, steps=steps, batch_size=3, warmup_steps=0, loraplus_lr_ratio=16, progress=False,
                          out_dir=str(tmp_path), resume=resume, schedule="constant")
        model = peftlab.attach(make_llama(), "lora[r=4,targets=[q_proj,v_proj]]")
        return model, train(model, random_lm_rows(), cfg)

    whole, result = run(3, False)
    a = whole.get_submodule(Q0).adapters["default"]
    assert torch.count_nonzero(a.lora_B.weight) > 0 and len(result.losses) == 3
    import shutil
    shutil.rmtree(tmp_path / "checkpoint")
    run(2, False)
    resumed, again = run(3, True)
    assert again.resumed_from == 2
    for (n, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("settings,match", [
    (dict(loraplus_lr_ratio=0), "loraplus_lr_ratio"),
    (dict(loraplus_lr_ratio=-2.0), "loraplus_lr_ratio"),
    (dict(loraplus_lr_ratio="16"), "loraplus_lr_ratio"),
    (dict(loraplus_lr_ratio=16, loraplus_lr_embedding=0), "loraplus_lr_embedding"),
    (dict(loraplus_lr_ratio=16, optimizer="mezo"), "mezo"),
])
def test_loraplus_bad_settings(settings, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        TrainConfig(**settings)
    with pytest.raises(peftlab.ConfigError, match="loraplus_lr_ratio"):
        loraplus_groups({}, 1e-3, 0)


def test_cli_loraplus_option():
    from peftlab.cli import build_parser, resolve_train_options, train_config

    args = build_parser().parse_args(["train", "--loraplus-lr-ratio", "16", "--out", "x"])
    assert train_config(resolve_train_options(args)).loraplus_lr_ratio == 16.0
    args = build_parser().parse_args(["train", "--out", "x"])
    assert train_config(resolve_train_options(args)).loraplus_lr_ratio is None


# ---- layer_replication ------------------------------------------------------------------------

def _replicated(ranges=((0, 2), (1, 2)), **settings):
    from peftlab.methods.lora import LoraConfig

    config = LoraConfig(r=4, targets=["q_proj", "v_proj"], layer_replication=[list(r) for r in ranges], **settings)
    return peftlab.attach(make_llama(), config)


def test_layer_replication_shares_base_weights_with_own_adapters(ids):
    model = _replicated()
    layers = model.model.layers
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    q1, q2 = layers[1].self_attn.q_proj, layers[2].self_attn.q_proj
    assert q1.base_layer.weight is q2.base_layer.weight  # one tensor, two layers
    assert q1.adapters["default"].lora_A.weight is not q2.adapters["default"].lora_A.weight
    assert [layer.self_attn.layer_idx for layer in layers] == [0, 1, 2]
    # with the adapters off, the model is the base run through layers 0, 1, 1
    reference = make_llama()
    reference.model.layers = torch.nn.ModuleList([reference.model.layers[i] for i in (0, 1, 1)])
    reference.config.num_hidden_layers = 3  # LlamaModel runs layers[:num_hidden_layers]
    with peftlab.disabled(model):
        torch.testing.assert_close(logits(model, ids), logits(reference, ids, use_cache=False), rtol=0, atol=1e-5)
    randomize_adapters(model)
    with pytest.raises(peftlab.StateError, match="shares its weight"):
        peftlab.merge(model)


def test_layer_replication_hf_both_ways(ids, tmp_path):
    ours = randomize_adapters(_replicated())
    expected = logits(ours, ids)
    peftlab.save(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["layer_replication"] == [[0, 2], [1, 2]]
    torch.testing.assert_close(peft_logits(make_llama, tmp_path / "ours", ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path / "ours"), ids), expected, rtol=0, atol=1e-5)
    theirs = _nudge(_peft_model(make_llama, r=4, target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 2]]))
    expected = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path / "theirs"), ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranges,match", [
    ([[0, 3]], "past"), ([[1, 1]], "start < end"), ([[0]], "start < end"), ("0-2", "start < end"), ([], "start < end"),
])
def test_layer_replication_bad_settings(ranges, match):
    from peftlab.methods.lora import LoraConfig

    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), LoraConfig(targets=["q_proj"], layer_replication=ranges))
    with pytest.raises(peftlab.ConfigError, match="layer_replication"):
        peftlab.attach(make_llama(), LoraConfig(targets=["q_proj"], layer_replication=[[0, 2]], init="pissa"))


def test_loraplus_resume_needs_the_same_groups(tmp_path):
    from peftlab.train import train

    def run(ratio, resume):
        cfg = TrainConfig(lr=1e-2, steps=1 + resume, batch_size=3, warmup_steps=0, loraplus_lr_ratio=ratio,
                          progress=False, out_dir=str(tmp_path), resume=resume)
        return train(peftlab.attach(make_llama(), "lora[r=4,targets=[q_proj,v_proj]]"), random_lm_rows(), cfg)

    run(None, False)
    with pytest.raises(peftlab.TrainingError, match="loraplus_lr_ratio"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(16, True)


def test_lora_bias_is_kept_by_rank_pruning_and_refused_where_a_plain_lora_cannot_carry_it(ids, tmp_path):
    from peftlab.compose import combine
    from peftlab.prune import prune_ranks

    model = peftlab.attach(make_llama(), "lora[r=4,lora_bias=true,targets=[q_proj,v_proj]]")
    randomize_adapters(model)
    bias = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_B.bias.detach().clone()
    prune_ranks(model, target_r=2)
    kept = model.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_B.bias
    assert kept is not None and torch.equal(kept.detach(), bias)
    for space in ("update", "factor"):
        with pytest.raises(peftlab.ConfigError, match="lora_bias"):
            combine(model, ["default"], space=space)
    peftlab.save(model, tmp_path / "biased")
    from peftlab.errors import AdapterFormatError
    from peftlab.serve.lora_bank import read_lora
    shapes = {n: (m.out_features, m.in_features) for n, m in make_llama().named_modules() if isinstance(m, torch.nn.Linear)}
    with pytest.raises(AdapterFormatError, match="lora_bias"):
        read_lora("biased", tmp_path / "biased", shapes, max_rank=8)
