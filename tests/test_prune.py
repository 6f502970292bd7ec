"""Structured LoRA rank pruning: the least important rank-one terms of each module are removed
(A and B physically shrink), the update's scale is kept, and the smaller adapter saves as a valid
Hugging Face LoRA that ``peft`` loads."""
from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from conftest import VOCAB, logits, make_bert, make_llama, randomize_adapters

import peftlab
from peftlab.core import adapters as core
from peftlab.methods.lora import LoraConfig, LoraEmbedding, LoraLinear
from peftlab.prune import factors, prune_ranks, rank_norms


def rows_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def model_loss(model, batch):
    return model(**batch).loss


def trained_like(spec, make=make_llama, seed: int = 0):
    """An adapter whose rank-one terms differ in size (a decaying spectrum, in shuffled order), as after training."""
    model = randomize_adapters(peftlab.attach(make(), spec), seed=seed, std=0.1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_modules(model).values():
            B = factors(adapter)[1]
            B.mul_(0.6 ** torch.randperm(B.shape[1], generator=g).float())
    return model


def lora_modules(model, name: str = "default") -> dict:
    return {m: layer.adapters[name] for m, layer in core.adapter_layers(model, name)
            if isinstance(layer.adapters[name], (LoraLinear, LoraEmbedding))}


def test_the_highest_importance_ranks_stay_in_order_and_the_scale_is_kept(ids):
    model = trained_like("lora[r=8,alpha=16]")
    before = {m: [t.detach().clone() for t in factors(a)] for m, a in lora_modules(model).items()}
    deltas = {m: a.delta_weight() for m, a in lora_modules(model).items()}
    report = prune_ranks(model, keep=0.5)
    for module_name, adapter in lora_modules(model).items():
        A, B = before[module_name]
        kept = rank_norms(A, B).topk(4).indices.sort().values
        assert torch.equal(adapter.lora_A.weight, A[kept]) and torch.equal(adapter.lora_B.weight, B[:, kept])
        assert adapter.r == 4 and adapter.alpha == 8 and adapter.scaling == 2.0
        torch.testing.assert_close(adapter.delta_weight(), 2.0 * B[:, kept] @ A[kept])
        dropped = [i for i in range(8) if i not in kept.tolist()]
        assert rank_norms(A, B)[dropped].max() <= rank_norms(A, B)[kept].min()
        assert not torch.equal(adapter.delta_weight(), deltas[module_name])
        assert report["ranks"][module_name] == [8, 4]
    assert report["parameters_after"] * 2 == report["parameters_before"] == peftlab.summary(model)["trainable"] * 2
    assert peftlab.summary(model)["trainable"] == report["parameters_after"]


def test_keep_1_is_exact_and_the_output_error_grows_as_keep_shrinks(ids):
    reference = logits(trained_like("lora[r=8]"), ids)
    errors = []
    for keep in (1.0, 0.75, 0.5, 0.25, 0.125):
        model = trained_like("lora[r=8]")
        prune_ranks(model, keep=keep)
        errors.append(float((logits(model, ids) - reference).abs().mean()))
    assert errors[0] == 0.0
    assert all(a < b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("spec", ["lora[r=8,alpha=4,rslora=true]", "dora[r=8,alpha=8]",
                                  "lora[r=4,targets=[embed_tokens,q_proj]]"])
def test_rslora_dora_and_embeddings_compute_with_the_kept_terms_at_the_same_scale(spec, ids):
    model = trained_like(spec)
    adapters = lora_modules(model)
    scales = {m: a.scaling for m, a in adapters.items()}
    kept = {m: rank_norms(*factors(a)).topk(a.r // 2).indices.sort().values for m, a in adapters.items()}
    expected = {m: [t.detach()[i] if n == 0 else t.detach()[:, i] for n, t in enumerate(factors(a))]
                for (m, a), i in zip(adapters.items(), kept.values())}
    prune_ranks(model, keep=0.5)
    for module_name, adapter in lora_modules(model).items():
        A, B = expected[module_name]
        assert adapter.scaling == scales[module_name]
        assert torch.equal(factors(adapter)[0], A) and torch.equal(factors(adapter)[1], B)
        torch.testing.assert_close(adapter.delta_weight(), (B @ A).t() * scales[module_name] if "embed" in module_name
                                   else B @ A * scales[module_name])
    model(input_ids=ids)  # still runs


def test_target_r_sets_every_modules_rank_and_never_raises_one():
    model = trained_like(LoraConfig(r=8, rank_pattern={"v_proj": 2}))
    prune_ranks(model, target_r=3)
    ranks = {m.split(".")[-1]: a.r for m, a in lora_modules(model).items()}
    assert ranks["q_proj"] == 3 and ranks["v_proj"] == 2


def test_taylor_keeps_the_ranks_whose_removal_changes_the_loss_most():
    model = trained_like("lora[r=6,targets=[q_proj,down_proj]]")
    batches = [rows_batch(0), rows_batch(1)]
    # by hand: |sum_j A_ij dL/dA_ij| per batch, summed over the batches
    scores = {m: torch.zeros(6) for m in lora_modules(model)}
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()
        for m, adapter in lora_modules(model).items():
            scores[m] += (adapter.lora_A.weight * adapter.lora_A.weight.grad).sum(1).abs()
    model.zero_grad(set_to_none=True)
    before = {m: [t.detach().clone() for t in factors(a)] for m, a in lora_modules(model).items()}
    prune_ranks(model, keep=0.5, criterion="taylor", batches=batches, loss_fn=model_loss)
    differs = False
    for m, adapter in lora_modules(model).items():
        kept = scores[m].topk(3).indices.sort().values
        assert torch.equal(adapter.lora_A.weight, before[m][0][kept]), m
        differs |= not torch.equal(kept, rank_norms(*before[m]).topk(3).indices.sort().values)
    assert differs, "the gradient criterion should pick differently from the norms somewhere"
    assert all(p.grad is None for p in model.parameters())


SPECS = [
    ("lora", make_llama, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 4})),
    ("rslora-dora", make_llama, "dora[r=8,alpha=4,rslora=true,targets=[q_proj,up_proj]]"),
    ("bert", make_bert, "lora[r=6,targets=[query,value],modules_to_save=classifier]"),
]


@pytest.mark.parametrize("label,make,spec", SPECS, ids=[s[0] for s in SPECS])
def test_a_pruned_adapter_saves_as_a_smaller_hf_lora_that_peft_and_peftlab_load(label, make, spec, ids, tmp_path):
    model = trained_like(spec, make)
    prune_ranks(model, keep=0.5)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ranks = {m: a.r for m, a in lora_modules(model).items()}
    assert config["r"] == max(set(ranks.values()), key=list(ranks.values()).count)
    assert {k.replace("\\", "") for k in config["rank_pattern"]} == {m for m, r in ranks.items() if r != config["r"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)
    ours = peftlab.load(make(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=0)
    assert {m: a.r for m, a in lora_modules(ours).items()} == ranks


def test_an_adapter_trained_in_peft_is_pruned_here_and_loads_back_in_peft(ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj"],
                                                                   init_lora_weights=False))
        theirs.save_pretrained(str(tmp_path / "peft"))
    model = peftlab.load(make_llama(), tmp_path / "peft")
    prune_ranks(model, target_r=2)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path / "pruned")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(make_llama(), str(tmp_path / "pruned")).eval()
    torch.testing.assert_close(logits(again, ids), expected, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "pruned" / "adapter_config.json").read_text())["r"] == 2


def test_a_union_records_the_new_ranks_in_peftlabs_format(ids, tmp_path):
    model = trained_like("lora[r=4,targets=q_proj]|houlsby[bottleneck=4]")
    prune_ranks(model, keep=0.5)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_what_cannot_be_pruned_is_refused_clearly():
    with pytest.raises(peftlab.ConfigError, match="either keep .* or target_r"):
        prune_ranks(trained_like("lora"), keep=0.5, target_r=2)
    with pytest.raises(peftlab.ConfigError, match="keep must be a fraction"):
        prune_ranks(trained_like("lora"), keep=0)
    with pytest.raises(peftlab.ConfigError, match="pass batches and loss_fn"):
        prune_ranks(trained_like("lora"), keep=0.5, criterion="taylor")
    with pytest.raises(peftlab.ConfigError, match="criterion must be one of norm, taylor"):
        prune_ranks(trained_like("lora"), keep=0.5, criterion="svd")
    with pytest.raises(peftlab.StateError, match="adalora"):
        prune_ranks(peftlab.attach(make_llama(), "adalora[r=4,target_r=2]"), keep=0.5)
    with pytest.raises(peftlab.StateError, match="init=pissa"):
        prune_ranks(peftlab.attach(make_llama(), "lora[init=pissa,targets=q_proj]"), keep=0.5)
    merged = trained_like("lora")
    peftlab.merge(merged)
    with pytest.raises(peftlab.StateError, match="unmerge"):
        prune_ranks(merged, keep=0.5)
