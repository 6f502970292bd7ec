"""RoAd: the base output turned by 2 x 2 scaled rotations on pairs of features (road_1/2/4),
merging as R W, routing per row, and HF PEFT's ROAD format checked against the real ``peft``
package both ways (mixed-adapter batches included)."""
from __future__ import annotations

import warnings

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
from peftlab.methods import road

Q0, K0, UP0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"
VARIANTS = ("road_1", "road_2", "road_4")


def randomize(model, seed: int = 0, std: float = 0.5):
    """Angles and scales (peftlab's or peft's) off the identity, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "road_theta" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "road_alpha" in name:
                p.copy_(1 + torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def dense_r(a) -> torch.Tensor:
    """R (out x out) written out pair by pair from the paper's description: feature i of each block
    of ``group_size`` is paired with i + group_size / 2; road_1 one (angle, scale) per pair, road_2 one
    per feature (its row of the 2 x 2), road_4 per feature one for the cosine and one for the sine entry."""
    out, g = a.out_features, a.group_size
    theta, alpha = a.road_theta.detach().double(), a.road_alpha.detach().double()
    R = torch.zeros(out, out, dtype=torch.float64)
    for k in range(out // g):
        for i in range(g // 2):
            p, q = k * g + i, k * g + i + g // 2
            if a.variant == "road_1":
                t, s = theta[k * g // 2 + i], alpha[k * g // 2 + i]
                R[p, p], R[p, q], R[q, p], R[q, q] = s * t.cos(), -s * t.sin(), s * t.sin(), s * t.cos()
            elif a.variant == "road_2":
                R[p, p], R[p, q] = alpha[p] * theta[p].cos(), -alpha[p] * theta[p].sin()
                R[q, p], R[q, q] = alpha[q] * theta[q].sin(), alpha[q] * theta[q].cos()
            else:  # road_4: block k holds g cosine entries, then g sine entries
                cos_at = lambda r: k * 2 * g + (r - k * g)  # noqa: E731
                sin_at = lambda r: k * 2 * g + g + (r - k * g)  # noqa: E731
                R[p, p] = alpha[cos_at(p)] * theta[cos_at(p)].cos()
                R[p, q] = -alpha[sin_at(p)] * theta[sin_at(p)].sin()
                R[q, p] = alpha[sin_at(q)] * theta[sin_at(q)].sin()
                R[q, q] = alpha[cos_at(q)] * theta[cos_at(q)].cos()
    return R


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_output_is_turned_by_two_by_two_blocks(variant):
    """The defining property: y = R (W x + b), R made of 2 x 2 blocks on paired features, against R built by hand."""
    model = randomize(peftlab.attach(make_llama(), f"road[variant={variant},group_size=8]"))
    for name in (Q0, K0, UP0):
        layer = model.get_submodule(name)
        a = layer.adapters["default"]
        assert a.road_theta.shape == a.road_alpha.shape == (int(a.out_features * {"road_1": .5, "road_2": 1, "road_4": 2}[variant]),)
        x = torch.randn(2, 5, a.in_features)
        with torch.no_grad():
            h = layer.base_layer(x)
            torch.testing.assert_close(layer(x).double(), h.double() @ dense_r(a).T, rtol=1e-5, atol=1e-5)
        R = dense_r(a)
        assert torch.count_nonzero(R) == 2 * a.out_features  # exactly the diagonal and each feature's partner
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("road_theta", "road_alpha")) for n in trainable)


def test_road_1_blocks_are_scaled_rotations():
    """road_1: each pair's block is alpha times a rotation (M M^T = alpha^2 I, det alpha^2), so angles
    between a pair's vectors are kept and lengths scale by alpha."""
    a = adapter(randomize(peftlab.attach(make_llama(), "road[group_size=16]")))
    R, g = dense_r(a), 16
    alpha = a.road_alpha.detach().double()
    for k in range(a.out_features // g):
        for i in range(g // 2):
            p, q = k * g + i, k * g + i + g // 2
            M = R[[p, q]][:, [p, q]]
            s = alpha[k * g // 2 + i]
            torch.testing.assert_close(M @ M.T, s ** 2 * torch.eye(2, dtype=torch.float64))
            torch.testing.assert_close(torch.linalg.det(M), s ** 2)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_r_h_minus_h(routed):
    model = randomize(peftlab.attach(make_llama(), "road[variant=road_2]"))
    layer = model.get_submodule(UP0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        h = layer.base_layer(x)
        expected = (h.double() @ dense_r(a).T).float()
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = h[1]
        else:
            out = layer(x)
        torch.testing.assert_close(a(x, h), (h.double() @ dense_r(a).T - h.double()).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_two_adapters_routed_per_row_match_each_alone(ids):
    model = randomize(peftlab.attach(make_llama(), "road[group_size=8]", name="a"), seed=1)
    randomize(peftlab.attach(model, "road[variant=road_4,group_size=16]", name="b"), seed=2)
    alone = {}
    for name in ("a", "b"):
        peftlab.set_active(model, name)
        alone[name] = logits(model, ids)
    with peftlab.disabled(model):
        alone[None] = logits(model, ids)
    rows = ["b", None, "a"]
    with peftlab.routing(model, rows):
        mixed = logits(model, ids)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)


def test_gradients_match_the_hand_written_rotation():
    model = randomize(peftlab.attach(make_llama(), "road[variant=road_4,group_size=8]"))
    model.train()
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x, weights = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    (layer(x) * weights).sum().backward()
    theta = a.road_theta.detach().double().requires_grad_()
    alpha = a.road_alpha.detach().double().requires_grad_()
    c, s = road.columns("road_4", 8, theta, alpha)
    h = layer.base_layer(x).detach().double()
    (road.apply_road(h, c, s, 8) * weights.double()).sum().backward()
    torch.testing.assert_close(a.road_theta.grad.double(), theta.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.road_alpha.grad.double(), alpha.grad, rtol=1e-4, atol=1e-5)


def test_starts_as_the_base(ids):
    for variant in VARIANTS:
        model = peftlab.attach(make_llama(), f"road[variant={variant}]")
        assert torch.count_nonzero(adapter(model).road_theta) == 0 and bool((adapter(model).road_alpha == 1).all())
        torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    random = peftlab.attach(make_llama(), "road[init=random]")  # PEFT's init_weights=False: not the base
    assert not torch.allclose(logits(random, ids), logits(make_llama(), ids), atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_is_r_w_and_r_b_and_unmerge_restores(variant, ids):
    model = randomize(peftlab.attach(make_bert(), f"road[variant={variant},group_size=16]"), std=0.3)
    layer = model.get_submodule("bert.encoder.layer.0.attention.self.query")
    W, b = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    R = dense_r(layer.adapters["default"])
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(layer.base_layer.weight.double(), R @ W.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias.double(), R @ b.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.bias, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-5)


def test_a_singular_pair_is_not_merged():
    model = peftlab.attach(make_llama(), "road")
    with torch.no_grad():
        adapter(model).road_alpha[3] = 0
    W = model.get_submodule(Q0).base_layer.weight.detach().clone()
    with pytest.raises(peftlab.StateError, match="singular"):
        peftlab.merge(model)
    torch.testing.assert_close(model.get_submodule(Q0).base_layer.weight, W, rtol=0, atol=0)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "road[variant=road_2,group_size=16]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    assert read_adapter_config(tmp_path)["peft_type"] == "ROAD"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


def test_defaults_attach_with_automatic_group_sizes_and_save_natively(ids, tmp_path):
    """group_size unset: 64 where it divides the width (gate/up), the largest even divisor below
    elsewhere (32 for q_proj, 16 for k_proj); mixed sizes do not fit PEFT's file: peftlab's own, with a warning."""
    model = randomize(peftlab.attach(make_llama(), "road"))
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    assert (adapter(model).group_size, adapter(model, K0).group_size, adapter(model, UP0).group_size) == (32, 16, 64)
    assert road.RoadConfig().group_size_for(576) == 64 and road.RoadConfig().group_size_for(96) == 48
    expected = logits(model, ids)
    with pytest.warns(UserWarning, match="group_size=16"):
        peftlab.save(model, tmp_path)
    assert read_adapter_config(tmp_path)["peft_type"] == "PEFTLAB"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("setting,match", [("variant=road_3", "variant"), ("group_size=3", "group_size"),
                                           ("group_size=-2", "group_size"), ("init=zeros", "init"),
                                           ("group_size=64", "does not divide"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"road[{setting}]")


def test_gpt2_conv1d_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="Conv1D.*nn.Linear layers only"):
        peftlab.attach(make_gpt2(), "road")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [
    ("llama-road_1", make_llama, "road[group_size=16]"),
    ("llama-road_2-some", make_llama, "road[variant=road_2,group_size=8,targets=[q_proj,v_proj,down_proj]]"),
    ("llama-road_4", make_llama, "road[variant=road_4,group_size=4]"),
    ("bert-head", make_bert, "road[variant=road_4,group_size=32,modules_to_save=[classifier]]"),
]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_road_loads_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec), std=0.3)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "ROAD")
    assert config["init_weights"] is True


PEFTS = [
    ("llama-road_1", make_llama, dict(group_size=16, target_modules="all-linear", task_type="CAUSAL_LM")),
    ("llama-road_4-q-v", make_llama, dict(variant="road_4", group_size=8, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM")),
    ("bert-road_2-seq-cls", make_bert, dict(variant="road_2", group_size=32, target_modules=["query", "value", "dense"],
                                            task_type="SEQ_CLS")),
]


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_road_loads_in_peftlab(label, factory, kwargs, ids, tmp_path):
    expected = peft_adapter_file(factory, peft.RoadConfig, kwargs, tmp_path, ids, randomize=randomize, std=0.3)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_mixed_batch_matches_peft_adapter_names(ids, tmp_path):
    """RoAd's selling point: one batch, a different adapter per row; peftlab's routing gives PEFT's
    ``adapter_names`` mixed-batch logits."""
    for name, (variant, seed) in {"one": ("road_1", 1), "two": ("road_4", 2)}.items():
        model = randomize(peftlab.attach(make_llama(), f"road[variant={variant},group_size=8]"), seed=seed, std=0.3)
        peftlab.save(model, tmp_path / name)
    ours = peftlab.load(make_llama(), tmp_path / "one", name="one")
    peftlab.load(ours, tmp_path / "two", name="two")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path / "one"), adapter_name="one").eval()
        theirs.load_adapter(str(tmp_path / "two"), adapter_name="two")
    rows = ["two", None, "one"]
    with peftlab.routing(ours, rows):
        mixed = logits(ours, ids)
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=[r or "__base__" for r in rows]).logits
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)


def test_bad_files_are_format_errors(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "road[group_size=16]"), tmp_path)
    config = read_adapter_config(tmp_path)
    for bad, match in (({"variant": "road_2"}, "do not belong together"), ({"group_size": 5}, "group_size"),
                       ({"group_size": 64}, "does not divide")):
        assert_config_edit_is_a_format_error(tmp_path, config, bad, match)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    model = peftlab.attach(make_llama(), "road[variant=road_2,group_size=16,targets=[k_proj,v_proj,down_proj]]")
    peftlab.save(model, tmp_path)
    info = adapter_info(tmp_path)
    assert info["peft_type"] == "ROAD" and info["method"] == "road" and info["adapted_modules"] == 6
    assert info["parameters"] == peftlab.summary(model)["adapters"]["default"] == 2 * 2 * (16 + 16 + 32)
