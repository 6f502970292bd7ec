"""peftlab.combine on a model: adapters' true updates combined into one plain LoRA."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import logits, make_llama

import peftlab
from peftlab.compose import combine
from peftlab.errors import ConfigError
from peftlab.methods import METHODS
from peftlab.methods.lora import LoraConfig
from test_method_properties import perturb, spec_of

TARGETS = "targets=[q_proj,v_proj,down_proj]"


def with_adapters(*specs, seed=0):
    """A tiny Llama with adapters a0, a1, ... (random weights, so none is a no-op)."""
    model = make_llama()
    for i, spec in enumerate(specs):
        torch.manual_seed(seed + i)
        peftlab.attach(model, spec, name=f"a{i}")
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 10 + i)
            for n, p in model.named_parameters():
                if f".a{i}." in n:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g)) if "magnitude" in n or "ia3_l" in n else \
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def outputs(model, ids, *active):
    peftlab.set_active(model, list(active))
    return logits(model, ids)


@pytest.mark.parametrize("spec", [f"lora[r=4,alpha=8,{TARGETS}]", f"lora[r=4,alpha=8,rslora=true,{TARGETS}]",
                                  f"dora[r=2,alpha=6,{TARGETS}]",
                                  LoraConfig(r=4, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
                                  "ia3"],
                         ids=["lora", "rslora", "dora", "patterned", "ia3"])
def test_one_adapter_at_weight_one_gives_it_back(spec, ids):
    model = with_adapters(spec)
    alone = outputs(model, ids, "a0")
    result = combine(model, ["a0"], [1.0])
    torch.testing.assert_close(outputs(model, ids, "combined"), alone, rtol=0, atol=1e-5)
    assert result.max_energy_dropped == pytest.approx(0.0, abs=1e-9)


ADALORA = "adalora[r=4,target_r=2,alpha=6,targets=[q_proj,v_proj,down_proj]]"
KRONA = "krona[a_shape=[4,8],scale=2.0,targets=[q_proj,v_proj,down_proj]]"


def with_adalora_ranks(model):
    """AdaLoRA's scale divides by ``ranknum``, which the allocator lowers: give it a value of its own
    (3, not r = 4) and mask one triplet, as a trained AdaLoRA has."""
    from peftlab.methods.adalora import AdaLoraLinear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaLoraLinear):
                module.ranknum.fill_(3.0)
                module.lora_E[0].zero_()
    return model


@pytest.mark.parametrize("spec", [ADALORA, KRONA], ids=["adalora", "krona"])
def test_adalora_and_krona_at_weight_one_give_them_back(spec, ids):
    model = with_adalora_ranks(with_adapters(spec))
    alone = outputs(model, ids, "a0")
    result = combine(model, ["a0"], [1.0])
    torch.testing.assert_close(outputs(model, ids, "combined"), alone, rtol=0, atol=1e-5)
    assert result.max_energy_dropped == pytest.approx(0.0, abs=1e-9)
    if spec == ADALORA:  # 4 triplets, one masked: the update has rank 3
        assert set(result.ranks.values()) == {3}


def test_linear_over_adalora_krona_and_lora_equals_them_all_active(ids):
    model = with_adalora_ranks(with_adapters(ADALORA, KRONA, f"lora[r=2,alpha=3,{TARGETS}]"))
    everything = outputs(model, ids, "a0", "a1", "a2")
    combine(model, ["a0", "a1", "a2"])
    torch.testing.assert_close(outputs(model, ids, "combined"), everything, rtol=0, atol=1e-5)


def test_svd_below_full_rank_is_the_truncated_svd_of_the_dense_sum():
    from peftlab.compose.combining import updates_of

    model = with_adapters(f"lora[r=4,{TARGETS}]", f"lora[r=3,alpha=5,{TARGETS}]")
    parts = [updates_of(model, f"a{i}") for i in range(2)]
    result = combine(model, ["a0", "a1"], [0.8, -1.2], method="svd", rank=2)
    made = updates_of(model, "combined")
    for layer, update in made.items():
        dense = 0.8 * parts[0][layer].dense() - 1.2 * parts[1][layer].dense()
        U, S, Vh = torch.linalg.svd(dense.double())
        best = (U[:, :2] * S[:2]) @ Vh[:2]
        torch.testing.assert_close(update.dense().double(), best, rtol=0, atol=1e-5)
        assert result.energy_dropped[layer] == pytest.approx(float((S[2:] ** 2).sum() / (S ** 2).sum()), rel=1e-4)


def test_linear_is_the_weighted_sum_of_the_updates_and_negation_gives_the_base(ids):
    from peftlab.compose.combining import updates_of

    model = with_adapters(f"lora[r=4,{TARGETS}]", f"lora[r=2,alpha=3,rslora=true,{TARGETS}]", f"dora[r=2,{TARGETS}]")
    parts = [updates_of(model, f"a{i}") for i in range(3)]
    weights = [1.0, -1.0, 0.5]
    combine(model, ["a0", "a1", "a2"], weights, name="sum")
    made = updates_of(model, "sum")
    for layer in made:
        expected = sum(w * (p[layer].dense() if hasattr(p[layer], "dense") else p[layer]) for p, w in zip(parts, weights))
        torch.testing.assert_close(made[layer].dense(), expected, rtol=0, atol=1e-5)
    with peftlab.disabled(model):
        base = logits(model, ids)
    combine(model, ["a0", "a0"], [1.0, -1.0], name="nothing")
    torch.testing.assert_close(outputs(model, ids, "nothing"), base, rtol=0, atol=1e-5)


def test_cat_equals_both_adapters_active(ids):
    model = with_adapters(f"lora[r=4,{TARGETS}]", f"lora[r=3,alpha=5,targets=[q_proj,k_proj]]")
    both = outputs(model, ids, "a0", "a1")
    result = combine(model, ["a0", "a1"], method="cat")
    torch.testing.assert_close(outputs(model, ids, "combined"), both, rtol=0, atol=1e-5)
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 7 and result.ranks["model.layers.0.self_attn.k_proj"] == 3


def test_linear_over_different_methods_equals_them_all_active(ids):
    model = with_adapters("ia3", f"lora[r=4,{TARGETS}]", f"dora[r=2,targets=[o_proj]]")
    both = outputs(model, ids, "a0", "a1", "a2")
    combine(model, ["a0", "a1", "a2"])
    torch.testing.assert_close(outputs(model, ids, "combined"), both, rtol=0, atol=1e-5)


def test_svd_at_a_lower_rank_reports_the_energy_it_dropped():
    model = with_adapters(f"lora[r=4,{TARGETS}]", f"lora[r=4,{TARGETS}]")
    full = combine(model, ["a0", "a1"], method="svd", rank=8, name="full")
    assert full.max_energy_dropped < 1e-9 and set(full.ranks.values()) == {8}
    cut = combine(model, ["a0", "a1"], method="svd", name="cut")  # default: the largest input rank
    assert set(cut.ranks.values()) == {4} and 0 < cut.max_energy_dropped < 1


def test_pruning_methods_run_on_the_updates_and_are_deterministic(ids):
    model = with_adapters(f"lora[r=4,{TARGETS}]", f"lora[r=4,{TARGETS}]")
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        first = combine(model, ["a0", "a1"], method=method, density=0.5, seed=3, name=f"{method}1")
        again = combine(model, ["a0", "a1"], method=method, density=0.5, seed=3, name=f"{method}2")
        torch.testing.assert_close(outputs(model, ids, f"{method}1"), outputs(model, ids, f"{method}2"), rtol=0, atol=0)
        assert first.ranks == again.ranks
    # TIES at density 1 over one adapter is the adapter
    alone = outputs(model, ids, "a0")
    combine(model, ["a0"], method="ties", density=1.0, name="same")
    torch.testing.assert_close(outputs(model, ids, "same"), alone, rtol=0, atol=1e-5)


def test_the_result_is_a_plain_lora_that_peft_loads_with_the_same_logits(tmp_path, ids):
    model = with_adapters(f"dora[r=2,{TARGETS}]", f"lora[r=4,alpha=8,rslora=true,targets=[q_proj,o_proj]]")
    combine(model, ["a0", "a1"], [0.7, 0.4], method="svd", rank=3)
    ours = outputs(model, ids, "combined")
    peftlab.save(model, tmp_path / "combined", name="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path / "combined")).eval()
    torch.testing.assert_close(logits(theirs, ids), ours, rtol=0, atol=1e-5)
    reloaded = peftlab.load(make_llama(), tmp_path / "combined")
    torch.testing.assert_close(logits(reloaded, ids), ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    (dict(adapters=["a0"], method="average"), "unknown combination method 'average'"),
    (dict(adapters=["a0", "a1"], weights=[1.0]), "2 adapters but 1 weights"),
    (dict(adapters=["a0", "nope"]), "no adapter named 'nope'"),
    (dict(adapters=["a0"], method="ties"), "give density"),
    (dict(adapters=["a0"], density=0.5), "does not prune"),
    (dict(adapters=["a0"], method="cat", rank=2), "cat keeps every factor"),
    (dict(adapters=["a0"], name="a1"), "already has an adapter named 'a1'"),
    (dict(adapters=["a2"]), "has no weight update to combine"),
    (dict(adapters=["a0"], space="weights"), "unknown space 'weights'"),
    (dict(adapters=["a0"], method="ties_svd", density=0.5), "HF PEFT combination type"),
    (dict(adapters=["a0", "a1"], space="factor", rank=2), "only the svd types take a rank"),
    (dict(adapters=["a0", "a1"], space="factor", method="dare_ties"), "give density"),
    (dict(adapters=["a0", "a2"], space="factor"), "combines plain LoRA factors"),
])
def test_bad_combinations_are_clear_errors(kwargs, message):
    model = with_adapters(f"lora[r=2,{TARGETS}]", f"lora[r=2,{TARGETS}]", "houlsby")
    with pytest.raises(ConfigError, match=message):
        combine(model, **kwargs)


def test_peftlab_combine_writes_a_lora_from_adapter_folders(tmp_path, capsys, fake_models):
    import json
    import sys
    from pathlib import Path

    from peftlab import cli
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_tasks import char_tokenizer, tiny_llama

    vocab = len(char_tokenizer())
    folders = []
    for i, spec in enumerate(["lora[r=4,alpha=8]", "dora[r=2]"]):
        model = tiny_llama(vocab)
        model.config._name_or_path = "tiny"
        torch.manual_seed(i)
        peftlab.attach(model, spec)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        folders.append(str(peftlab.save(model, tmp_path / f"in{i}")))
    ids = torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(0))

    def applied(folder):
        return logits(peftlab.load(tiny_llama(vocab), folder), ids)

    assert cli.main(["combine", folders[0], folders[0], "--weights", "1,-1", "--out", str(tmp_path / "none")]) == 0
    torch.testing.assert_close(applied(tmp_path / "none"), logits(tiny_llama(vocab), ids), rtol=0, atol=1e-5)
    assert cli.main(["combine", *folders, "--method", "ties", "--density", "0.5", "--out", str(tmp_path / "ties")]) == 0
    out = capsys.readouterr().out
    assert "ties of 2 adapters" in out and "plain Hugging Face PEFT LoRA" in out
    report = json.loads((tmp_path / "ties" / "combine.json").read_text())
    assert report["method"] == "ties" and report["weights"] == [1.0, 1.0] and report["ranks"]
    assert json.loads((tmp_path / "ties" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert cli.main(["combine", folders[0], folders[0], "--weights", "1,-1", "--space", "factor", "--method", "cat",
                     "--out", str(tmp_path / "factor")]) == 0
    torch.testing.assert_close(applied(tmp_path / "factor"), logits(tiny_llama(vocab), ids), rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "factor" / "combine.json").read_text())["space"] == "factor"
    capsys.readouterr()
    assert cli.main(["combine", *folders, "--space", "factor", "--out", str(tmp_path / "bad")]) == 2
    assert "combines plain LoRA factors" in capsys.readouterr().err
    assert cli.main(["combine", *folders, "--weights", "1,x", "--out", str(tmp_path / "bad")]) == 2
    assert "--weights takes comma-separated numbers" in capsys.readouterr().err
    assert cli.main(["combine", *folders, "--method", "ties", "--out", str(tmp_path / "bad")]) == 2
    assert "give density" in capsys.readouterr().err


# ---- space="factor": HF PEFT's add_weighted_adapter, twin-tested against peft itself -------------

HF_TYPES = ["svd", "linear", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
            "magnitude_prune", "magnitude_prune_svd"]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same three random plain LoRAs (alpha != r, one rsLoRA, one on other layers) in peftlab
    and, through HF-format files, in peft."""
    folder = tmp_path_factory.mktemp("twins")
    ours = with_adapters(f"lora[r=4,alpha=8,{TARGETS}]", f"lora[r=4,alpha=6,rslora=true,{TARGETS}]",
                         "lora[r=4,alpha=2,targets=[q_proj,k_proj,up_proj]]", seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = None
        for i in range(3):
            path = str(peftlab.save(ours, folder / f"a{i}", name=f"a{i}"))
            if theirs is None:
                theirs = peft.PeftModel.from_pretrained(make_llama(), path, adapter_name="a0").eval()
            else:
                theirs.load_adapter(path, adapter_name=f"a{i}")
    return ours, theirs


@pytest.mark.parametrize("kind", HF_TYPES)
def test_factor_space_reproduces_hf_peft_add_weighted_adapter(kind, twins, ids, monkeypatch):
    from peft.tuners.lora import model as hf_lora

    ours, theirs = twins
    weights, seed = [1.0, -0.7, 0.5], 11
    density = 0.6 if kind in ("ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                              "magnitude_prune", "magnitude_prune_svd") else None
    rank = 6 if kind.endswith("svd") else None
    freeze = hf_lora._freeze_adapter
    # HF draws DARE's masks from the global RNG after initializing the new adapter: seed it there
    monkeypatch.setattr(hf_lora, "_freeze_adapter", lambda model, name: (freeze(model, name), torch.manual_seed(seed)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a0", "a1", "a2"], weights, f"hf_{kind}", combination_type=kind,
                                    density=density, svd_rank=rank)
    result = combine(ours, ["a0", "a1", "a2"], weights, method=kind, density=density, rank=rank, seed=seed,
                     name=f"f_{kind}", space="factor")
    hf_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                 if hasattr(m, "lora_A") and f"hf_{kind}" in m.lora_A}
    assert sorted(hf_layers) == sorted(result.ranks)
    for module_name, layer in hf_layers.items():
        made = ours.get_submodule(module_name).adapters[f"f_{kind}"]
        A, B = layer.lora_A[f"hf_{kind}"].weight, layer.lora_B[f"hf_{kind}"].weight
        assert layer.scaling[f"hf_{kind}"] == 1.0 and made.scaling == 1.0
        if kind in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):  # the factors themselves
            torch.testing.assert_close(made.lora_A.weight, A, rtol=0, atol=1e-5)
            torch.testing.assert_close(made.lora_B.weight, B, rtol=0, atol=1e-5)
        else:  # cat pads, svd's singular vectors have signs: compare the products
            torch.testing.assert_close(made.lora_B.weight @ made.lora_A.weight, B @ A, rtol=0, atol=1e-5)
    theirs.set_adapter(f"hf_{kind}")
    torch.testing.assert_close(outputs(ours, ids, f"f_{kind}"), logits(theirs, ids), rtol=0, atol=1e-5)
    if kind.endswith("svd"):
        assert set(result.ranks.values()) == {6} and 0 < result.max_energy_dropped < 1


MERGEABLE = [m for m, module in METHODS.items() if getattr(module, "MERGEABLE", False)]
# these merge, but their update is not a weight a plain LoRA can carry: a bias, a norm, an embedding row
NOT_A_LINEAR_UPDATE = {"trainable_tokens", "ssf", "bitfit", "beft", "ln_tuning"}


@pytest.mark.parametrize("method", MERGEABLE)
def test_every_merging_method_combines_back_to_itself_or_refuses_clearly(method, ids):
    """Each method's update is read through its own math (factors, delta_weight, or merging a copy of the
    layer): at weight 1 the combined LoRA gives the adapter's outputs back. LoKr's, HRA's and OSF's
    ``factors()`` are not LoRA factors, and BOFT's ``factors`` is a count: none is mistaken for one."""
    torch.manual_seed(0)
    model = make_llama()
    peftlab.attach(model, spec_of(method), name="a0")
    perturb(model)
    alone = outputs(model, ids, "a0")
    if method in NOT_A_LINEAR_UPDATE:
        with pytest.raises(ConfigError, match="bias|linear layers only"):
            combine(model, ["a0"], [1.0])
        return
    combine(model, ["a0"], [1.0])
    torch.testing.assert_close(outputs(model, ids, "combined"), alone, rtol=1e-4, atol=5e-5)  # dense updates: an SVD
