"""Trainable tokens: only the chosen rows of the embedding table train and differ from the base,
k x dim trained numbers, a tied head reads the same rows; HF PEFT's TRAINABLE_TOKENS format checked
against the real ``peft`` package both ways (untied and tied embeddings, a BERT with a head)."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import (
    assert_config_edit_is_a_format_error, assert_peft_adapter_loads_and_goes_back, assert_peftlab_file_loads_in_peft,
    logits, make_bert, make_llama, peft_adapter_file, read_adapter_config,
)

import peftlab
from peftlab.core.layer import AdapterLayer

TOKENS = [3, 7, 11, 40, 41, 90]
SPEC = f"trainable_tokens[token_indices=[{','.join(map(str, TOKENS))}]]"


def tied_llama():
    return make_llama(tie_word_embeddings=True)


def randomize(model, seed: int = 0, std: float = 0.5):
    """Every trained row (peftlab's or peft's) moved off the base, so the adapter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or "modules_to_save" in name:  # peft's trained head too
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def rows(model, name="model.embed_tokens"):
    return model.get_submodule(name).adapters["default"]


def effective_table(model) -> torch.Tensor:
    """The table the model now uses: each token's embedding output, read back through the layer."""
    table = model.get_input_embeddings()
    with torch.no_grad():
        return table(torch.arange(table.weight.shape[0])[None])[0]


# ---- the method --------------------------------------------------------------------------------

def test_only_the_chosen_rows_differ_and_they_are_the_trained_values():
    """The defining property: E'[t_j] = V[j], every other row the base's; k x dim numbers train."""
    base = make_llama().model.embed_tokens.weight.detach()
    model = randomize(peftlab.attach(make_llama(), SPEC))
    a = rows(model)
    assert a.trainable_tokens_delta.shape == (len(TOKENS), 32)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(TOKENS) * 32
    table = effective_table(model)
    others = [i for i in range(96) if i not in TOKENS]
    torch.testing.assert_close(table[others], base[others], rtol=0, atol=0)
    torch.testing.assert_close(table[TOKENS], a.trainable_tokens_delta.detach(), rtol=0, atol=0)
    assert not torch.allclose(table[TOKENS], base[TOKENS])
    torch.testing.assert_close(model.model.embed_tokens.base_layer.weight, base, rtol=0, atol=0)  # never written


def test_a_training_step_moves_only_the_rows_of_the_tokens_in_the_batch():
    model = peftlab.attach(make_llama(), SPEC)
    model.train()
    ids = torch.tensor([[3, 5, 11, 90, 60, 11]])  # (the last position has no label)
    model(input_ids=ids, labels=ids).loss.backward()
    grad = rows(model).trainable_tokens_delta.grad
    seen = [TOKENS.index(t) for t in (3, 11, 90)]
    unseen = [j for j in range(len(TOKENS)) if j not in seen]
    assert grad[seen].abs().sum(-1).min() > 0 and torch.count_nonzero(grad[unseen]) == 0
    assert [n for n, p in model.named_parameters() if p.grad is not None] == \
        ["model.embed_tokens.adapters.default.trainable_tokens_delta"]


def test_tied_head_reads_the_same_rows():
    """With tied weights the logits of a chosen token are h . V[j]: one parameter, not a copy."""
    model = randomize(peftlab.attach(tied_llama(), SPEC))
    emb, head = rows(model), rows(model, "lm_head")
    assert head.tied and head.values is emb.trainable_tokens_delta
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        ["model.embed_tokens.adapters.default.trainable_tokens_delta"]
    h = torch.randn(2, 5, 32)
    V = emb.trainable_tokens_delta.detach()
    expected = h @ model.lm_head.base_layer.weight.T
    expected[..., TOKENS] = h @ V.T
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(h), expected, rtol=0, atol=1e-6)


def test_an_untied_head_named_as_a_target_gets_rows_of_its_own():
    model = randomize(peftlab.attach(make_llama(), "trainable_tokens[token_indices=[3,4],targets=[embed_tokens,lm_head]]"))
    emb, head = rows(model), rows(model, "lm_head")
    assert not head.tied and head.trainable_tokens_delta is not emb.trainable_tokens_delta
    h = torch.randn(2, 32)
    expected = h @ model.lm_head.base_layer.weight.T
    expected[:, [3, 4]] = h @ head.trainable_tokens_delta.detach().T
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(h), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_row_difference(routed, ids):
    model = randomize(peftlab.attach(make_llama(), SPEC))
    layer = model.model.embed_tokens
    ids = ids.clone()
    ids[:, 0] = 3
    with torch.no_grad():
        expected = layer.base_layer(ids)
        chosen = torch.isin(ids, torch.tensor(TOKENS))
        lookup = {t: j for j, t in enumerate(TOKENS)}
        for r, c in chosen.nonzero().tolist():
            expected[r, c] = rows(model).trainable_tokens_delta[lookup[int(ids[r, c])]]
        if routed:
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(ids)
            expected[1] = layer.base_layer(ids[1])
        else:
            out = layer(ids)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_starts_as_the_base(ids):
    for factory in (make_llama, tied_llama):
        model = peftlab.attach(factory(), SPEC)
        torch.testing.assert_close(logits(model, ids), logits(factory(), ids), rtol=0, atol=1e-6)
    random = peftlab.attach(make_llama(), SPEC.replace("]]", "],init=random]"))
    assert not torch.allclose(rows(random).trainable_tokens_delta, make_llama().model.embed_tokens.weight[TOKENS])


def test_merge_writes_the_rows_and_unmerge_restores_them(ids):
    model = randomize(peftlab.attach(make_llama(), SPEC))
    W = model.model.embed_tokens.base_layer.weight
    before = W.detach().clone()
    unmerged = logits(model, ids)
    peftlab.merge(model)
    torch.testing.assert_close(W[TOKENS], rows(model).trainable_tokens_delta, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=0, atol=1e-6)
    peftlab.unmerge(model)
    torch.testing.assert_close(W, before, rtol=0, atol=0)


def test_a_tied_table_is_not_merged():
    model = randomize(peftlab.attach(tied_llama(), SPEC))
    with pytest.raises(peftlab.StateError, match="tied"):
        peftlab.merge(model)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    for factory in (make_llama, tied_llama):
        model = randomize(peftlab.attach(factory(), SPEC))
        expected = logits(model, ids)
        peftlab.save(model, tmp_path / factory.__name__)
        loaded = peftlab.load(factory(), tmp_path / factory.__name__)
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_the_input_embeddings_are_found_on_each_architecture():
    bert = peftlab.attach(make_bert(), SPEC)
    assert [n for n, m in bert.named_modules() if isinstance(m, AdapterLayer)] == ["bert.embeddings.word_embeddings"]
    llama = peftlab.attach(tied_llama(), SPEC)
    assert [n for n, m in llama.named_modules() if isinstance(m, AdapterLayer)] == ["model.embed_tokens", "lm_head"]


@pytest.mark.parametrize("setting,match", [("token_indices=[]", "token_indices"), ("token_indices=[-1]", "non-negative"),
                                           ("token_indices=[5,5]", "more than once"), ("token_indices=[96]", "past the vocabulary"),
                                           ("token_indices=[3],init=zeros", "init"),
                                           ("token_indices=[3],targets=q_proj", "rows are not tokens")])
def test_bad_settings_are_clear_errors(setting, match):
    with pytest.raises((peftlab.ConfigError, peftlab.TargetError), match=match):
        peftlab.attach(make_llama(), f"trainable_tokens[{setting}]")


def test_no_token_ids_is_a_clear_error():
    with pytest.raises(peftlab.ConfigError, match="token_indices must list"):
        peftlab.attach(make_llama(), "trainable_tokens")


# ---- HF PEFT interop ----------------------------------------------------------------------------

OURS = [("llama", make_llama, SPEC), ("llama-tied", tied_llama, SPEC),
        ("bert-head", make_bert, SPEC.replace("]]", "],modules_to_save=[classifier]]"))]


@pytest.mark.parametrize("label,factory,spec", OURS, ids=[c[0] for c in OURS])
def test_peftlab_trainable_tokens_load_in_peft(label, factory, spec, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    if label == "bert-head":
        with torch.no_grad():
            model.classifier.weight.add_(0.5)
    config = assert_peftlab_file_loads_in_peft(model, factory, ids, tmp_path, "TRAINABLE_TOKENS")
    assert config["token_indices"] == TOKENS
    assert config["init_weights"] is True and config["target_modules"] in ("model.embed_tokens", "bert.embeddings.word_embeddings")


PEFTS = [("llama", make_llama, dict(token_indices=[4, 9, 33, 50])),
         ("llama-tied", tied_llama, dict(token_indices=[4, 9, 33, 50])),
         ("bert", make_bert, dict(token_indices=[5, 6, 70]))]  # PEFT's config has no modules_to_save


@pytest.mark.parametrize("label,factory,kwargs", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_trainable_tokens_load_in_peftlab(label, factory, kwargs, ids, tmp_path):
    ids = ids.clone()
    ids[:, 1] = kwargs["token_indices"][0]
    expected = peft_adapter_file(factory, peft.TrainableTokensConfig, kwargs, tmp_path, ids, randomize=randomize,
                                 matters_atol=1e-5)
    assert_peft_adapter_loads_and_goes_back(factory, tmp_path, ids, expected)


def test_rows_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), SPEC), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"token_indices": [3, 4]}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"token_indices": []}, "token_indices")


@pytest.mark.parametrize("factory", [make_llama, tied_llama], ids=["untied", "tied"])
def test_peft_lora_with_trainable_token_indices_loads_in_peftlab(factory, ids, tmp_path):
    """LoraConfig(trainable_token_indices=...) files read as lora|trainable_tokens (saved back in peftlab's format)."""
    ids = ids.clone()
    ids[:, 1] = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.LoraConfig(target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 5], init_lora_weights=False)
        theirs = randomize(peft.get_peft_model(factory(), config).eval(), seed=2)
        expected = logits(theirs, ids)
        theirs.save_pretrained(str(tmp_path))
    ours = peftlab.load(factory(), tmp_path)
    assert [c.method for c in peftlab.core.state.get_state(ours).configs["default"]] == ["lora", "trainable_tokens"]
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(logits(peftlab.load(factory(), tmp_path / "again"), ids), expected, rtol=0, atol=1e-5)


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    for factory in (make_llama, tied_llama):  # a tied head's rows are written twice and count once
        model = peftlab.attach(factory(), SPEC)
        peftlab.save(model, tmp_path / factory.__name__)
        info = adapter_info(tmp_path / factory.__name__)
        assert info["method"] == "trainable_tokens" and info["peft_type"] == "TRAINABLE_TOKENS"
        assert info["adapter_parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_quantized_embeddings_are_refused_clearly():
    model = make_llama()
    peftlab.quantize(model, "nf4", embeddings=True)
    with pytest.raises(peftlab.ConfigError, match="full-precision nn.Embedding"):
        peftlab.attach(model, SPEC)


def test_the_benchmark_runs_it_beside_its_twin_on_the_tasks_frequent_tokens():
    """(The token ids come from the task: tests/test_bench.py checks bench.cell.task_spec.)"""
    from peftlab.bench import grid
    from peftlab.bench.tasks import TASKS

    assert grid.skip_reason(grid.Cell(TASKS["sst2"], "trainable_tokens", 0)) is None
    assert "trainable_tokens" in grid.TWINS


def test_the_padding_row_gets_no_gradient_as_in_an_embedding():
    """Token 0 is the tiny Llama's padding id: trained here like in PEFT (its value is used, its gradient is zero)."""
    model = randomize(peftlab.attach(make_llama(), "trainable_tokens[token_indices=[0,3]]"))
    model.train()
    batch = torch.tensor([[0, 3, 0, 3, 5]])
    model(input_ids=batch, labels=batch).loss.backward()
    grad = rows(model).trainable_tokens_delta.grad
    assert torch.count_nonzero(grad[0]) == 0 and torch.count_nonzero(grad[1]) > 0
    table = effective_table(model)
    torch.testing.assert_close(table[0], rows(model).trainable_tokens_delta[0].detach(), rtol=0, atol=0)
