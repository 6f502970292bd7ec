"""AdaMSS: the rows of [W | b] clustered by their left singular vectors, each group trained as a
low-rank map B_k A_k inside the frozen top-R right singular basis V^T; ASA pruning of subspaces;
merging; and HF PEFT's ADAMSS format checked against the real ``peft`` package both ways."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import assert_peft_adapter_loads_and_goes_back, logits, make_bert, make_gpt2, make_llama, peft_logits
from sklearn.cluster import KMeans

import peftlab
from peftlab.core import adapters as core
from peftlab.core.layer import AdapterLayer
from peftlab.methods import adamss

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
QUERY0 = "bert.encoder.layer.0.attention.self.query"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every trained AdaMSS tensor (A_k, B_k; not the frozen basis) to random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adamss_A." in name or ".adamss_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def bert_with_biases(seed: int = 0):
    """The tiny BERT with random biases (its init zeroes them), so the bias column matters."""
    model = make_bert(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("factory,name", [(make_llama, DOWN0), (bert_with_biases, QUERY0)], ids=["llama", "bert-bias"])
def test_groups_of_rows_train_low_rank_maps_in_the_singular_basis(factory, name):
    """The defining property, rebuilt independently: seeded SVD of [W | b], K-means of U's rows,
    and delta [W | b] = B_k A_k V^T on group k's rows."""
    model = randomize(peftlab.attach(factory(), "adamss[r=12,num_subspaces=3,subspace_rank=2]"))
    layer = model.get_submodule(name)
    a = layer.adapters["default"]
    base = layer.base_layer
    W = base.weight.detach()
    if base.bias is not None:
        W = torch.cat([W, base.bias.detach()[:, None]], 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        U, _, V = torch.svd_lowrank(W.float(), q=12, niter=2)
    torch.testing.assert_close(a.adamss_newB, V.T, rtol=0, atol=1e-6)
    labels = torch.from_numpy(KMeans(3, init="random", n_init=1, max_iter=10, random_state=123456789)
                              .fit_predict(U.numpy())).long()
    expected = torch.zeros_like(W, dtype=torch.float64)
    for k in range(3):
        rows = torch.where(labels == k)[0]
        A_k, B_k = a.adamss_A[k].detach().double(), a.adamss_B[k].detach().double()
        assert A_k.shape == (min(2, len(rows)), 12) and B_k.shape == (len(rows), A_k.shape[0])
        expected[rows] = B_k @ A_k @ V.T.double()
    dW, db = a.deltas()
    got = dW if db is None else torch.cat([dW, db[:, None]], 1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # each group's update has rank r_k and lies in the span of V's columns
    for k in range(3):
        rows = torch.where(labels == k)[0]
        assert torch.linalg.matrix_rank(expected[rows]) <= a.adamss_A[k].shape[0]
    torch.testing.assert_close(got.double() @ V.double() @ V.T.double(), got.double(), rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adamss_A." in n or ".adamss_B." in n for n in trainable)


def test_a_starts_on_the_groups_principal_directions_and_b_at_zero(ids):
    model = peftlab.attach(make_llama(), "adamss[r=16,num_subspaces=2,subspace_rank=3]")
    for a in (adapter(model), adapter(model, DOWN0)):
        for A, B in zip(a.adamss_A, a.adamss_B):
            torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), rtol=0, atol=1e-5)  # orthonormal rows
            assert torch.count_nonzero(B) == 0
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    random = peftlab.attach(make_llama(), "adamss[init=random]")  # PEFT's init_weights=None
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-6)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_delta(routed):
    model = randomize(peftlab.attach(bert_with_biases(), "adamss[r=16,num_subspaces=4]"))
    layer = model.get_submodule(QUERY0)
    dW, db = layer.adapters["default"].deltas()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + x @ dW.T + db
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_rank_stops_at_the_significant_directions():
    """r_k = min(subspace_rank, the group's squared singular values of U above threshold x the largest)."""
    spec = "adamss[r=12,num_subspaces=2,subspace_rank=8{}]"
    fixed = adapter(peftlab.attach(make_llama(), spec.format("")), DOWN0)
    dynamic = adapter(peftlab.attach(make_llama(), spec.format(",use_dynamic_rank=true,svd_threshold=0.5")), DOWN0)
    assert [A.shape[0] for A in fixed.adamss_A] == [8, 8]
    W = make_llama().get_submodule(DOWN0).weight.detach()
    U, _ = adamss.seeded_svd(W, 12, 0)
    for rows, A in zip(adamss.cluster_rows(U, 2), dynamic.adamss_A):
        energy = torch.linalg.svdvals(U[rows].double()) ** 2
        assert A.shape[0] == max(1, min(8, int((energy > 0.5 * energy[0]).sum())))
    assert any(A.shape[0] < 8 for A in dynamic.adamss_A)


@pytest.mark.parametrize("factory,name", [(make_llama, Q0), (bert_with_biases, QUERY0)], ids=["llama", "bert-bias"])
def test_merge_equals_unmerged_and_unmerge_restores(factory, name, ids):
    model = randomize(peftlab.attach(factory(), "adamss[r=20,num_subspaces=3,subspace_rank=2]"))
    base = model.get_submodule(name).base_layer
    W, b = base.weight.detach().clone(), None if base.bias is None else base.bias.detach().clone()
    dW, db = model.get_submodule(name).adapters["default"].deltas()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(base.weight, W + dW, rtol=0, atol=1e-6)
    if b is not None:
        torch.testing.assert_close(base.bias, b + db, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(base.weight, W, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(bert_with_biases(), "adamss[r=10,num_subspaces=4,subspace_rank=2]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(bert_with_biases(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_defaults_attach_to_tiny_widths():
    """r=100 is capped at each layer's min(out, in): 16 for k_proj, 32 for q_proj."""
    model = peftlab.attach(make_llama(), "adamss")
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert adapter(model).adamss_newB.shape == (32, 32) and adapter(model).num_subspaces == 5
    assert adapter(model, "model.layers.0.self_attn.k_proj").adamss_newB.shape == (16, 32)
    assert sum(adapter(model).sizes) == 32


def test_asa_freezes_all_but_the_budgets_best_subspaces(ids):
    spec = ("adamss[r=16,num_subspaces=3,use_asa=true,asa_target_subspaces=4,init_warmup=1,final_warmup=6,"
            "mask_interval=2,asa_schedule_exponent=1,init=random]")
    model = peftlab.attach(make_llama(), spec)
    model.train()
    config = peftlab.core.state.require_state(model).configs["default"][0]
    total = sum(len(m.adamss_A) for _, m in core.method_adapters(model, "default", "adamss"))
    assert adamss.budget_at(2, total, config) == int(4 + (total - 4) * 0.8) and adamss.budget_at(6, total, config) == 4
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, 8):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        core.after_step(model, step, 7)
        opt.zero_grad(set_to_none=True)
        if step == 6:
            frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "adamss_" in n and not p.requires_grad}
    assert sum(adamss.active_subspaces(model).values()) == 4
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("num_subspaces=0", "num_subspaces"),
                                           ("subspace_rank=0", "subspace_rank"), ("init=ones", "init"),
                                           ("use_asa=true,init_warmup=10,final_warmup=5", "init_warmup"),
                                           ("svd_threshold=2", "svd_threshold"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"adamss[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "adamss")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "adamss"),
    ("llama-ranks", make_llama, "adamss[r=12,num_subspaces=3,subspace_rank=2,random_seed=4,targets=[q_proj,down_proj]]"),
    ("bert-head-bias", bert_with_biases, "adamss[r=20,num_subspaces=3,subspace_rank=2,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_adamss_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    expected = logits(model, ids)
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAMSS" and config["init_weights"] == "orthogonal"
    torch.testing.assert_close(peft_logits(factory, tmp_path, ids), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-defaults", make_llama, dict(task_type="CAUSAL_LM")),
    ("llama-all-linear", make_llama, dict(r=8, num_subspaces=4, subspace_rank=2, random_seed=3,
                                          target_modules="all-linear", task_type="CAUSAL_LM")),
    ("bert-seq-cls", bert_with_biases, dict(r=20, num_subspaces=3, subspace_rank=2, target_modules=["query", "value"],
                                            task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_adamss_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize(peft.get_peft_model(factory(), peft.AdamssConfig(**kwargs)).eval(), seed=3)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=1e-3), "the adapter should matter"
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_format_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save(peftlab.attach(make_llama(), "adamss[r=8]"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
    fresh = make_llama()
    with pytest.raises(peftlab.AdapterFormatError, match="do not belong together"):
        peftlab.load(fresh, tmp_path)
    assert not [m for m in fresh.modules() if isinstance(m, AdapterLayer)]
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_subspaces": 0}))
    with pytest.raises(peftlab.AdapterFormatError, match="num_subspaces"):
        peftlab.load(make_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({**tensors, f"base_model.model.{Q0}.adamss_C.0": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="unexpected tensor"):
        peftlab.load(make_llama(), tmp_path)


def test_peftlab_info_reads_the_file(tmp_path):
    """The frozen basis adamss_newB is in the file but is not a trained parameter."""
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "adamss[r=8,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "ADAMSS" and info["method"] == "adamss" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"]
