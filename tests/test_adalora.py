"""AdaLoRA: SVD-form update, orthogonality regularizer, importance scores, the cubic budget
schedule down to the target rank, and HF PEFT's ADALORA format both ways."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, logits, make_gpt2, make_llama, randomize_adapters
from safetensors.torch import load_file

import peftlab
from peftlab.core import adapters as core
from peftlab.methods import adalora
from peftlab.train import TrainConfig, train

Q0 = "model.layers.0.self_attn.q_proj"


def toy_rows(rows=4, length=12):
    ids = torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]


def trained(spec, steps, factory=make_llama):
    model = peftlab.attach(factory(), spec)
    train(model, toy_rows(), TrainConfig(lr=2e-2, steps=steps, batch_size=4, warmup_steps=0, schedule="constant",
                                         progress=False, device="cpu"))
    model.eval()
    return model


# ---- the update ------------------------------------------------------------------------------

def test_update_is_p_lambda_q_scaled_by_alpha_over_r():
    model = randomize_adapters(peftlab.attach(make_llama(), "adalora[r=4,target_r=2,alpha=8,targets=q_proj]"))
    layer = model.get_submodule(Q0)
    a = layer.adapters["default"]
    P, lam, Q = a.lora_B, a.lora_E[:, 0], a.lora_A
    expected = (8 / (4 + 1e-5)) * P @ torch.diag(lam) @ Q
    torch.testing.assert_close(a.delta_weight(), expected, rtol=0, atol=1e-6)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + expected).T, rtol=0, atol=1e-5)


def test_singular_values_start_at_zero():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2]")
    for _, a in core.method_adapters(model, "default", "adalora"):
        assert torch.count_nonzero(a.lora_E) == 0 and torch.count_nonzero(a.lora_A) == a.lora_A.numel()


# ---- orthogonality -----------------------------------------------------------------------------

def test_regularizer_is_the_papers_formula():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2,orth_reg_weight=0.3,targets=[q_proj,v_proj]]")
    modules = [m for _, m in core.method_adapters(model, "default", "adalora")]
    eye = torch.eye(4)
    terms = [((m.lora_B.T @ m.lora_B - eye) ** 2).sum() + ((m.lora_A @ m.lora_A.T - eye) ** 2).sum() for m in modules]
    torch.testing.assert_close(core.regularization(model), 0.3 * torch.stack(terms).mean())
    Q, _ = torch.linalg.qr(torch.randn(32, 4))
    assert adalora.orthogonality(Q.T, Q).item() < 1e-10  # orthonormal factors cost nothing


def test_regularizer_decreases_when_optimized():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2]")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    values = []
    for _ in range(30):
        penalty = core.regularization(model)
        penalty.backward()
        optimizer.step()
        optimizer.zero_grad()
        values.append(penalty.item())
    assert values[-1] < 0.5 * values[0], values
    assert all(b <= a for a, b in zip(values, values[1:]))


def test_trainer_adds_the_regularizer_but_reports_the_plain_loss():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2,orth_reg_weight=100]")
    result = train(model, toy_rows(), TrainConfig(lr=1e-3, steps=1, batch_size=4, warmup_steps=0, progress=False,
                                                  device="cpu"))
    assert result.losses[0] < 10  # the penalty (about 100 x 8) is not in the reported loss


# ---- importance --------------------------------------------------------------------------------

def test_importance_is_smoothed_sensitivity_times_uncertainty(ids):
    model = randomize_adapters(peftlab.attach(make_llama(), "adalora[r=4,target_r=2,beta1=0.8,beta2=0.6,targets=q_proj]"))
    a = model.get_submodule(Q0).adapters["default"]
    smoothed = {k: torch.zeros_like(getattr(a, k)) for k in adalora.FACTORS}
    uncertainty = {k: torch.zeros_like(getattr(a, k)) for k in adalora.FACTORS}
    for seed in (0, 1):
        model.zero_grad()
        batch = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
        model(input_ids=batch, labels=batch).loss.backward()
        with torch.no_grad():
            a.update_importance(0.8, 0.6)
            for k in adalora.FACTORS:
                sensitivity = (getattr(a, k) * getattr(a, k).grad).abs()
                smoothed[k] = 0.8 * smoothed[k] + 0.2 * sensitivity
                uncertainty[k] = 0.6 * uncertainty[k] + 0.4 * (sensitivity - smoothed[k]).abs()
    score = {k: smoothed[k] * uncertainty[k] for k in adalora.FACTORS}
    expected = score["lora_E"][:, 0] + score["lora_A"].mean(1) + score["lora_B"].mean(0)
    torch.testing.assert_close(a.triplet_scores(), expected, rtol=1e-5, atol=1e-12)


def test_keep_top_keeps_exactly_the_budget():
    scores = [torch.tensor([0.5, 0.1, 0.9]), torch.tensor([0.0, 0.0]), torch.tensor([0.7])]
    keep = adalora.keep_top(scores, 3)
    assert [k.tolist() for k in keep] == [[True, False, True], [False, False], [True]]
    assert sum(int(k.sum()) for k in adalora.keep_top(scores, 10)) == 6


# ---- the budget schedule -----------------------------------------------------------------------

def test_cubic_budget_schedule():
    def budget(step):
        return adalora.budget_at(step, total_steps=100, initial=120, target=40, init_warmup=10, final_warmup=20)

    assert [budget(s) for s in (1, 10)] == [120, 120]
    assert [budget(s) for s in (80, 90, 100)] == [40, 40, 40]
    assert budget(45) == int(40 + 80 * (1 - 35 / 70) ** 3) == 50
    values = [budget(s) for s in range(1, 101)]
    assert all(b <= a for a, b in zip(values, values[1:]))  # never grows


def test_training_ends_at_the_target_total_rank():
    spec = "adalora[r=4,target_r=2,init_warmup=2,final_warmup=4,targets=[q_proj,v_proj,down_proj]]"
    model = peftlab.attach(make_llama(), spec)
    data = toy_rows()
    seen = []
    model.train()  # a hand-written loop: the schedule runs in the after_step hook
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = {k: torch.stack([row[k] for row in data]) for k in data[0]}
    for step in range(1, 15):
        loss = model(**batch).loss + core.regularization(model)
        loss.backward()
        optimizer.step()
        core.after_step(model, step, 14)
        optimizer.zero_grad()
        seen.append(sum(adalora.ranks(model).values()))
    modules = len(adalora.ranks(model))
    assert seen[:2] == [4 * modules] * 2  # initial warmup: full budget
    assert seen[9] == 2 * modules  # step 10 = 14 - final_warmup: the target
    assert seen[9:] == [2 * modules] * 5  # then fixed
    assert all(b <= a for a, b in zip(seen, seen[1:]))
    for _, a in core.method_adapters(model, "default", "adalora"):
        assert torch.count_nonzero(a.lora_E[~a.rank_mask]) == 0  # pruned triplets have lambda = 0


def test_warmups_longer_than_the_run_fail_clearly():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2,init_warmup=5,final_warmup=5]")
    with pytest.raises(peftlab.ConfigError, match="init_warmup=5 and final_warmup=5"):
        train(model, toy_rows(), TrainConfig(lr=1e-3, steps=8, batch_size=4, warmup_steps=0, progress=False, device="cpu"))


def test_ranks_name_unknown_adapters():
    model = peftlab.attach(make_llama(), "adalora[r=4,target_r=2]")
    with pytest.raises(peftlab.ConfigError, match="no adapter named 'x'"):
        adalora.ranks(model, "x")


# ---- HF PEFT's ADALORA format --------------------------------------------------------------------

PRUNING = "r=4,target_r=2,alpha=8,final_warmup=2,orth_reg_weight=0.5"


@pytest.mark.parametrize("factory,targets", [(make_llama, "[q_proj,v_proj]"), (make_gpt2, "[c_attn,c_fc]")])
def test_saved_file_is_peft_format_and_loads_in_peft(factory, targets, ids, tmp_path):
    from peft import PeftModel

    model = trained(f"adalora[{PRUNING},targets={targets}]", steps=8, factory=factory)
    ranks = adalora.ranks(model)
    assert sum(ranks.values()) == 2 * len(ranks) and set(ranks.values()) != {2}  # uneven: the budget moved
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["peft_type"] == "ADALORA" and (hf["init_r"], hf["target_r"], hf["lora_alpha"]) == (4, 2, 8)
    assert {k[: -len(".lora_E")]: sum(v) for k, v in hf["rank_pattern"].items()} == ranks
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for module_name, kept in ranks.items():
        A, E, B = (tensors[f"base_model.model.{module_name}.{k}"] for k in ("lora_A", "lora_E", "lora_B"))
        assert A.shape[0] == E.shape[0] == B.shape[1] == kept and E.shape[1] == 1
    assert not any(k.endswith("ranknum") for k in tensors)  # PEFT does not save it
    theirs = PeftModel.from_pretrained(factory(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("factory,targets", [(make_llama, ["q_proj", "v_proj"]), (make_gpt2, ["c_attn"])])
def test_peft_saved_adalora_loads_here(factory, targets, ids, tmp_path):
    from peft import AdaLoraConfig, get_peft_model

    peft_model = get_peft_model(factory(), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=targets,
                                                        total_step=10))
    g = torch.Generator().manual_seed(0)
    pattern = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if "lora_E" in name:
                module = name.removeprefix("base_model.model.").replace(".lora_E.default", "")
                pattern[f"{module}.lora_E"] = torch.randperm(4, generator=g).lt(1 + len(pattern) % 3).tolist()
    peft_model.base_model.rankallocator.mask_using_rank_pattern(peft_model.base_model.model, pattern)
    peft_model.peft_config["default"].rank_pattern = pattern
    peft_model.eval()
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    ours = peftlab.load(factory(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    assert adalora.ranks(ours) == {k[: -len(".lora_E")]: sum(v) for k, v in pattern.items()}


def test_unpruned_adapter_round_trips_without_rank_pattern(ids, tmp_path):
    model = randomize_adapters(peftlab.attach(make_llama(), "adalora[r=4,target_r=2,targets=q_proj]"))
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] is None
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=1e-6)


def test_mismatched_rank_pattern_is_a_format_error(tmp_path):
    model = randomize_adapters(peftlab.attach(make_llama(), "adalora[r=4,target_r=2,targets=q_proj]"))
    peftlab.save(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    hf = json.loads(path.read_text())
    hf["rank_pattern"] = {f"{Q0}.lora_E": [True, False, True, False]}  # 2 kept, but the file holds 4
    path.write_text(json.dumps(hf))
    with pytest.raises(peftlab.AdapterFormatError, match="keeps 2 triplets"):
        peftlab.load(make_llama(), tmp_path)
