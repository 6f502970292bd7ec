"""Poly: an inventory of LoRA skills per layer mixed by a learned task-skill matrix Z (sigmoid,
normalised; a relaxed-Bernoulli sample in training), with Multi-Head Routing splits; task ids per
row through ``peftlab.task_ids``; HF PEFT's POLY format checked against the real ``peft`` package
both ways (peft's forward given the same ``task_ids``)."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch
from conftest import assert_config_edit_is_a_format_error, logits, make_bert, make_llama, read_adapter_config

import peftlab
from peftlab.core.layer import AdapterLayer

Q0, DOWN0 = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"


def randomize(model, seed: int = 0, std: float = 0.3):
    """Every Poly tensor (peftlab's or peft's) to random values, so skills and routing matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def adapter(model, name=Q0):
    return model.get_submodule(name).adapters["default"]


def hand_delta(a, x, task: int) -> torch.Tensor:
    """x A_t B_t / r written out: per split q, w = sigmoid(Z[t, q]) / sum, A_t's block q = sum_s w_s A[q, s]
    (its rows of the input), B_t's block q = sum_s w_s B[q, s] (its columns of the output)."""
    A, B = a.poly_lora_A.detach().double(), a.poly_lora_B.detach().double()
    n_splits, n_skills, _, r = A.shape
    Z = a.poly_router.module_logits.detach().double()[task].view(n_splits, n_skills)
    A_rows, B_cols = [], []
    for q in range(n_splits):
        w = torch.sigmoid(Z[q]) / (torch.sigmoid(Z[q]).sum() + 1e-12)
        A_rows.append(sum(w[s] * A[q, s] for s in range(n_skills)))
        B_cols.append(sum(w[s] * B[q, s] for s in range(n_skills)))
    return x.double() @ torch.cat(A_rows, 0) @ torch.cat(B_cols, 1) / r


# ---- the method --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_splits", [1, 2], ids=["poly", "mhr"])
def test_each_row_gets_its_tasks_mixture_of_skills(n_splits):
    """The defining property, against the weighted average of the skills' parameters by hand."""
    model = randomize(peftlab.attach(make_llama(), f"poly[n_tasks=3,n_skills=3,n_splits={n_splits},r=4]"))
    x = torch.randn(3, 5, 64)
    tasks = [2, 0, 2]
    a = adapter(model, DOWN0)
    with torch.no_grad(), peftlab.task_ids(model, tasks):
        out = a(x, None)
    for row, task in enumerate(tasks):
        torch.testing.assert_close(out[row].double(), hand_delta(a, x[row], task), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-4), "different tasks, different adapters"


def test_a_one_hot_z_is_that_one_skills_lora():
    model = randomize(peftlab.attach(make_llama(), "poly[n_tasks=2,n_skills=4,r=4]"))
    a = adapter(model)
    with torch.no_grad():
        a.poly_router.module_logits.fill_(-40.0)
        a.poly_router.module_logits[0, 2] = 40.0  # task 0 = skill 2 alone
        a.poly_router.module_logits[1, 3] = 40.0  # task 1 = skill 3 alone
    x = torch.randn(2, 5, 32)
    with torch.no_grad(), peftlab.task_ids(model, [0, 1]):
        out = a(x, None)
    for row, skill in enumerate((2, 3)):
        lora = x[row] @ a.poly_lora_A[0, skill] @ a.poly_lora_B[0, skill] / 4
        torch.testing.assert_close(out[row], lora.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("routed", [False, True], ids=["alone", "routed"])
def test_layer_adds_the_delta(routed):
    model = randomize(peftlab.attach(make_llama(), "poly[n_tasks=3,n_splits=2]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    x = torch.randn(3, 5, 32)
    tasks = [1, 2, 0]
    with torch.no_grad(), peftlab.task_ids(model, tasks):
        expected = layer.base_layer(x) + torch.stack([hand_delta(a, x[i], t).float() for i, t in enumerate(tasks)])
        if routed:  # row 1 runs the base; rows 0 and 2 keep their own task ids
            with peftlab.routing(model, ["default", None, "default"]):
                out = layer(x)
            expected[1] = layer.base_layer(x[1])
        else:
            out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_training_samples_the_routing_and_gradients_reach_everything():
    model = randomize(peftlab.attach(make_llama(), "poly[n_tasks=2]"))
    layer = model.get_submodule(Q0)
    x = torch.randn(2, 5, 32)
    with peftlab.task_ids(model, [0, 1]):
        with torch.no_grad():
            assert torch.equal(layer(x), layer(x))  # eval: sigmoid, deterministic
        model.train()
        torch.manual_seed(0)
        first = layer(x)
        assert not torch.allclose(first, layer(x)), "training draws relaxed-Bernoulli weights"
        first.square().sum().backward()
    a = layer.adapters["default"]
    for p in (a.poly_lora_A, a.poly_lora_B, a.poly_router.module_logits):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_starts_as_the_base_and_counts_its_parameters(ids):
    model = peftlab.attach(make_llama(), "poly")
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)
    assert len([m for m in model.modules() if isinstance(m, AdapterLayer)]) == 14
    a = adapter(model)  # defaults r=8, n_skills=4, n_splits=1, n_tasks=1 on a 32 x 32 layer
    assert sum(p.numel() for p in a.parameters()) == 4 * (32 * 8 + 8 * 32) + 1 * 4
    kaiming = peftlab.attach(make_llama(), "poly[init=kaiming]")  # PEFT's init_weights=False: not the base
    assert not torch.allclose(logits(kaiming, ids), logits(make_llama(), ids), atol=1e-4)


def test_task_ids_are_needed_with_several_tasks_and_checked(ids):
    model = peftlab.attach(make_llama(), "poly[n_tasks=3]")
    with pytest.raises(peftlab.StateError, match="task_ids"):
        logits(model, ids)
    with pytest.raises(peftlab.StateError, match="3 rows"):
        with peftlab.task_ids(model, [0, 1]):
            logits(model, ids)
    with pytest.raises(peftlab.ConfigError, match="0..2"):
        with peftlab.task_ids(model, [0, 1, 3]):
            logits(model, ids)
    with pytest.raises(peftlab.ConfigError, match="integer task ids"):
        with peftlab.task_ids(model, [[0, 1]]):
            pass
    with pytest.raises(peftlab.StateError, match="no peftlab adapters"):
        with peftlab.task_ids(make_llama(), [0]):
            pass


def test_generate_keeps_the_rows_tasks_at_every_step(ids):
    model = randomize(peftlab.attach(make_llama(), "poly[n_tasks=2]"))
    with peftlab.task_ids(model, [1, 0, 1]):
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 10)


def test_save_load_round_trip_is_exact(ids, tmp_path):
    model = randomize(peftlab.attach(make_llama(), "poly[n_tasks=3,n_skills=2,n_splits=2,r=4]"))
    with peftlab.task_ids(model, [2, 1, 0]):
        expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    loaded = peftlab.load(make_llama(), tmp_path)
    with peftlab.task_ids(loaded, [2, 1, 0]):
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


@pytest.mark.parametrize("setting,match", [("r=0", "r must"), ("n_tasks=0", "n_tasks"), ("n_skills=-1", "n_skills"),
                                           ("n_splits=3", "must divide"), ("init=ones", "init"),
                                           ("poly_type=mhr", "poly_type"), ("colour=3", "unknown setting")])
def test_bad_settings_are_config_errors(setting, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), f"poly[{setting}]")


# ---- HF PEFT interop ----------------------------------------------------------------------------

def peft_poly_logits(factory, folder, ids, tasks):
    """Logits of ``factory()`` with HF PEFT's Poly from ``folder``, the rows' tasks given to its forward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(factory(), str(folder)).eval()
    return logits(model, ids, task_ids=torch.tensor(tasks))


def ours_logits(model, ids, tasks):
    with peftlab.task_ids(model, tasks):
        return logits(model, ids)


OURS = [
    ("llama-defaults", make_llama, "poly", [0, 0, 0]),
    ("llama-mhr", make_llama, "poly[n_tasks=3,n_skills=3,n_splits=2,r=4,targets=[q_proj,v_proj,down_proj]]", [2, 0, 1]),
    ("bert-head", make_bert, "poly[n_tasks=2,targets=[query,value],modules_to_save=[classifier]]", [1, 0, 1]),
]


@pytest.mark.parametrize("label,factory,spec,tasks", OURS, ids=[c[0] for c in OURS])
def test_peftlab_poly_loads_in_peft(label, factory, spec, tasks, ids, tmp_path):
    model = randomize(peftlab.attach(factory(), spec))
    expected = ours_logits(model, ids, tasks)
    assert not torch.allclose(expected, logits(factory(), ids), atol=2e-5), "the adapter should matter"
    peftlab.save(model, tmp_path)
    config = read_adapter_config(tmp_path)
    assert config["peft_type"] == "POLY" and config["poly_type"] == "poly" and config["init_weights"] is True
    torch.testing.assert_close(peft_poly_logits(factory, tmp_path, ids, tasks), expected, rtol=0, atol=1e-5)


PEFTS = [
    ("llama-q-v", make_llama, dict(target_modules=["q_proj", "v_proj"], n_tasks=2, task_type="CAUSAL_LM"), [1, 0, 1]),
    ("llama-mhr", make_llama, dict(target_modules=["k_proj", "up_proj", "o_proj"], r=4, n_tasks=4, n_skills=3, n_splits=2,
                                   task_type="CAUSAL_LM"), [3, 0, 2]),
    ("bert-seq-cls", make_bert, dict(target_modules=["query", "value"], n_tasks=3, task_type="SEQ_CLS"), [2, 1, 0]),
]


@pytest.mark.parametrize("label,factory,kwargs,tasks", PEFTS, ids=[c[0] for c in PEFTS])
def test_peft_poly_loads_in_peftlab(label, factory, kwargs, tasks, ids, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize(peft.get_peft_model(factory(), peft.PolyConfig(**kwargs)).eval(), seed=3)
        expected = logits(theirs, ids, task_ids=torch.tensor(tasks))
        theirs.save_pretrained(str(tmp_path))
    assert not torch.allclose(expected, logits(factory(), ids), atol=2e-5), "the adapter should matter"
    ours = peftlab.load(factory(), tmp_path)
    torch.testing.assert_close(ours_logits(ours, ids, tasks), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(peft_poly_logits(factory, tmp_path / "again", ids, tasks), expected, rtol=0, atol=1e-5)


def test_tensors_that_contradict_the_config_are_a_format_error(tmp_path):
    peftlab.save(peftlab.attach(make_llama(), "poly[n_tasks=2]"), tmp_path)
    config = read_adapter_config(tmp_path)
    assert_config_edit_is_a_format_error(tmp_path, config, {"n_tasks": 5}, "do not belong together")
    assert_config_edit_is_a_format_error(tmp_path, config, {"poly_type": "mhr"}, "poly_type")


def test_peftlab_info_reads_the_file(tmp_path):
    from peftlab.cli import adapter_info

    peftlab.save(peftlab.attach(make_llama(), "poly[targets=[q_proj]]"), tmp_path)
    info = adapter_info(tmp_path)
    assert info["method"] == "poly" and info["peft_type"] == "POLY" and info["r"] == 8


def test_the_benchmark_twin_runs_peft_poly_without_task_ids(ids):
    """hf:poly at peftlab's defaults (n_tasks=1): PEFT's layers are given task 0 for every row, and
    BERT's pooler (2-D inputs, which PEFT's Poly cannot take) is left out of its targets."""
    from types import SimpleNamespace

    from peftlab.bench.cell import hf_twin

    bert = hf_twin(make_bert(), "poly", SimpleNamespace(kind="classification", total_steps=10))
    torch.testing.assert_close(logits(bert, ids), logits(make_bert(), ids), rtol=0, atol=1e-6)
    llama = hf_twin(make_llama(), "poly", SimpleNamespace(kind="causal-lm", total_steps=10))
    assert llama.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (3, 9)
    assert sum(p.numel() for p in llama.parameters() if p.requires_grad) == \
        peftlab.summary(peftlab.attach(make_llama(), "poly"))["trainable"]


def test_the_trainer_gives_a_task_ids_column_to_the_routing():
    """A batch's ``task_ids`` column reaches the router: rows of task 1 only move Z's row 1."""
    from peftlab.train import TrainConfig, train

    model = peftlab.attach(make_llama(initializer_range=0.2), "poly[n_tasks=3]")
    router = next(m for n, m in model.named_modules() if n.endswith("poly_router"))
    before = [p.detach().clone() for p in router.parameters()][0]
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 90, (8,), generator=g).tolist()), "labels": ids, "task_ids": 1}
            for _ in range(8)]
    train(model, rows, TrainConfig(steps=2, batch_size=4, lr=1e-2, progress=False, device="cpu"))
    after = [p.detach() for p in router.parameters()][0]
    assert not torch.equal(after[1], before[1])
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=0, atol=0)
