"""OSF: the top singular directions of each weight stay frozen while the rest trains orthogonally to
them; delta W = U S V - U_l S_l V_l; merging; and HF PEFT's OSF format checked against the real
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
from peftlab.methods import osf

Q0, K0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj"
FACTORS = ("U_low", "S_low", "V_low")


def randomize(model, seed: int = 0, std: float = 0.1):
    """Move every trained factor (peftlab's or peft's) off its start, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in FACTORS:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def effective_weight(layer) -> torch.Tensor:
    return (layer.base_layer.weight + layer.adapters["default"].delta_weight()).detach().double()


# ---- the method --------------------------------------------------------------------------------

def test_the_high_subspace_survives_training_and_the_rest_moves():
    """The defining property: under gradient descent U stays orthogonal to U_h and V to V_h, so
    U_h^T W' = S_h V_h and W' V_h^T = U_h S_h exactly as in the base, while W' itself changes."""
    model = peftlab.attach(make_llama(), "osf[effective_rank=6]")
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=50.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(3, 96, (4, 9), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    for name in (Q0, K0, DOWN0):
        layer = model.get_submodule(name)
        a = layer.adapters["default"]
        W = layer.base_layer.weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # independent SVD of the base
        Uh, Sh, Vhh = U[:, :6], S[:6], Vh[:6]
        W_new = effective_weight(layer)
        assert (W_new - W).abs().max() > 1e-3, "the update should have moved the weight"
        torch.testing.assert_close(Uh.T @ W_new, Sh[:, None] * Vhh, rtol=0, atol=1e-5)
        torch.testing.assert_close(W_new @ Vhh.T, Uh * Sh, rtol=0, atol=1e-5)
        assert a.U_low.shape == (a.out_features, min(W.shape) - 6) and a.V_low.shape == (min(W.shape) - 6, a.in_features)


def test_gradients_are_projected_off_the_high_subspace():
    model = peftlab.attach(make_llama(), "osf")
    model.train()
    layer = model.get_submodule(DOWN0)  # 32 x 64, k = 16
    a = layer.adapters["default"]
    x, w = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    (layer(x) * w).sum().backward()
    # the unprojected gradient of <w, (U S V) x> with respect to U and V
    G = torch.einsum("bto,bti->oi", w, x).double()
    U, S, V = (getattr(a, n).detach().double() for n in FACTORS)
    dU, dV = G @ (S[:, None] * V).T, (U * S).T @ G
    Uh, Vh = a.U_high.double(), a.V_high.double()
    torch.testing.assert_close(a.U_low.grad.double(), dU - Uh @ (Uh.T @ dU), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.V_low.grad.double(), dV - (dV @ Vh.T) @ Vh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.S_low.grad.double(), ((U.T @ G) * V).sum(1), rtol=1e-4, atol=1e-5)  # S: not projected


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_delta_w_x(routed):
    model = randomize(peftlab.attach(make_llama(), "osf"))
    layer = model.get_submodule(DOWN0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        delta = (a.U_low * a.S_low) @ a.V_low - (a.U_low_init * a.S_low_init) @ a.V_low_init
        expected = layer.base_layer(x) + x @ delta.T
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_starts_as_the_base_with_the_svd_split(ids):
    model = peftlab.attach(make_llama(), "osf")
    a = adapter(model)
    W = model.get_submodule(Q0).base_layer.weight
    high = (a.U_high * torch.linalg.svdvals(W)[:16]) @ a.V_high
    torch.testing.assert_close(high + (a.U_low * a.S_low) @ a.V_low, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)
    assert a.effective_rank == 16 and adapter(model, K0).effective_rank == 8  # half of min(out, in)
    random = peftlab.attach(make_llama(), "osf[init=random]")  # PEFT's init_weights=false: not the base
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


def test_ranks_resolve_as_in_peft():
    config = osf.OSFConfig(effective_rank=0.25, rank_pattern={r"mlp\.down": 3, "k_proj": 0.5, r"attn\.o": 1, "o_proj": 5})
    model = peftlab.attach(make_llama(), config)  # the first pattern that matches wins
    assert adapter(model).effective_rank == 8 and adapter(model, DOWN0).effective_rank == 3
    assert adapter(model, K0).effective_rank == 8 and adapter(model, "model.layers.0.self_attn.o_proj").effective_rank == 1


def test_merge_adds_the_update_and_unmerge_restores(ids):
    model = randomize(peftlab.attach(make_llama(), "osf"))
    layer = model.get_submodule(Q0)
    W = layer.base_layer.weight.detach().clone()
    unmerged = logits(model, ids)
    expected = effective_weight(layer).float()
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-4)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "osf[effective_rank=4,targets=[q_proj,down_proj]]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("setting,match", [("effective_rank=0", "effective_rank"), ("effective_rank=x", "effective_rank"),
                                           ("init=ones", "init"), ("rank_pattern=3", "rank_pattern"),
                                           ("effective_rank=16", "nothing to train"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"osf[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "osf")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-defaults", make_llama, "osf"),
    ("llama-fraction-pattern", make_llama, osf.OSFConfig(effective_rank=0.25, rank_pattern={"down_proj": 5},
                                                         targets=["q_proj", "v_proj", "down_proj"])),
    ("bert-head", make_bert, "osf[effective_rank=4,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_osf_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "OSF")
    assert config["init_weights"] is True


PEFTS = [
    ("llama-default", make_llama, dict(task_type="CAUSAL_LM")),
    ("llama-rank-pattern", make_llama, dict(effective_rank=5, rank_pattern={r"layers\.1\..*proj": 0.75},
                                            target_modules=["q_proj", "k_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")),
    ("bert-seq-cls", make_bert, dict(effective_rank=0.5, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_osf_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.OSFConfig, kwargs, tmp_path, ids, randomize=randomize)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_bad_files_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    peftlab.save(peftlab.attach(make_llama(), "osf[targets=[q_proj]]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"effective_rank": 4}, "do not belong together")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("S_low")}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(peftlab.AdapterFormatError, match="lacks S_low"):
        peftlab.load(make_llama(), tmp_path)
