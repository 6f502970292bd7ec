"""LoRAHub (peftlab.compose.lorahub): weights for a hub of LoRAs found without gradients."""
from __future__ import annotations

import json

import pytest
import torch

import peftlab
from conftest import logits, make_llama, randomize_adapters
from peftlab.compose import lorahub
from peftlab.compose.lorahub import hub_updates, set_combination
from peftlab.train.data import pad_collate

pytest.importorskip("nevergrad")

HUB = ["d0", "d1", "d2", "right", "d3", "d4", "d5", "d6"]  # the right adapter fourth, not first


def task_rows(count: int, seed: int) -> list[dict]:
    """A prompt of 6 random tokens, then always the same 6 target tokens (the new 'task')."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        prompt, target = torch.randint(3, 96, (6,), generator=g).tolist(), list(range(10, 16))
        rows.append({"input_ids": prompt + target, "labels": [-100] * 6 + target})
    return rows


def make_hub():
    """A tiny Llama (weights of a pretrained scale, so a LoRA can learn in a few steps) with one LoRA
    trained on the task ('right') and seven random LoRAs that have nothing to do with it."""
    model = make_llama(initializer_range=0.2)
    peftlab.attach(model, "lora[r=4,alpha=8]", name="right")
    batch = pad_collate(task_rows(32, seed=0))
    torch.manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(80):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    g = torch.Generator().manual_seed(10)
    for i in range(7):
        peftlab.attach(model, "lora[r=4,alpha=8]", name=f"d{i}")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f".d{i}." in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def hub_model():
    return make_hub()


def test_the_right_adapter_gets_most_weight(tmp_path):
    model = make_hub()
    result = lorahub(model, HUB, task_rows(8, seed=1), budget=40, out=tmp_path / "hub")
    weights = dict(zip(result.adapters, result.weights))
    others = max(abs(w) for n, w in weights.items() if n != "right")
    assert weights["right"] > 0.4 and weights["right"] > 4 * others, weights
    assert result.loss < result.base_loss / 2
    assert len(result.history) == 40 and result.objective <= max(result.history)
    # the result is active, frozen, and is exactly Σ w_i ΔW_i at every layer
    assert peftlab.summary(model)["active"] == ["lorahub"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lorahub." in n)
    for module_name, layer in model.named_modules():
        if hasattr(layer, "adapters") and "lorahub" in layer.adapters:
            expected = sum(w * layer.adapters[n].delta_weight() for n, w in weights.items())
            torch.testing.assert_close(layer.adapters["lorahub"].delta_weight(), expected, rtol=0, atol=1e-6)
    # saved as a plain LoRA with the weights beside it; it loads back with the same outputs
    report = json.loads((tmp_path / "hub" / "lorahub.json").read_text())
    assert report["adapters"] == HUB and report["weights"] == result.weights and report["budget"] == 40
    ids = torch.tensor([row["input_ids"] for row in task_rows(2, seed=5)])
    again = peftlab.load(make_llama(initializer_range=0.2), tmp_path / "hub")
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_update_space_one_hot_is_the_adapter_and_factor_space_squares_the_weight(hub_model):
    model = hub_model
    ids = torch.tensor([row["input_ids"] for row in task_rows(3, seed=2)])
    peftlab.set_active(model, "right")
    alone = logits(model, ids)
    one_hot = [1.0 if n == "right" else 0.0 for n in HUB]
    minus = [-w for w in one_hot]
    for space, name in (("update", "u"), ("factor", "f")):
        layers = hub_updates(model, HUB, space)
        rank = 4 if space == "factor" else 32
        peftlab.attach(model, f"lora[r={rank},alpha={rank}]", name=name)
        set_combination(model, name, layers, one_hot, space)
        torch.testing.assert_close(logits(model, ids), alone, rtol=0, atol=1e-5)
        set_combination(model, name, layers, minus, space)
        if space == "factor":  # (-B)(-A) = BA: the paper's element-wise sum cannot negate an adapter
            torch.testing.assert_close(logits(model, ids), alone, rtol=0, atol=1e-5)
        else:  # Σ w_i ΔW_i at w = -1: the adapter's update negated
            for module_name, layer in model.named_modules():
                if hasattr(layer, "adapters") and "right" in layer.adapters:
                    torch.testing.assert_close(layer.adapters[name].delta_weight(),
                                               -layer.adapters["right"].delta_weight(), rtol=0, atol=1e-6)
        peftlab.delete(model, name)


def test_text_pairs_and_adapter_folders(tmp_path):
    from test_tasks import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    model = tiny_llama(len(tokenizer))
    folders = []
    for i in range(3):
        peftlab.attach(model, "lora[r=2,targets=[q_proj,v_proj]]", name=f"a{i}")
        for name, p in model.named_parameters():
            if f".a{i}." in name and "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        folders.append(peftlab.save(model, tmp_path / f"task-{i}", name=f"a{i}"))
    fresh = tiny_llama(len(tokenizer))
    pairs = [("2+2=", "4"), ("3+3=", "6"), ("1+4=", "5")]
    result = lorahub(fresh, folders, pairs, budget=6, tokenizer=tokenizer, name="mix")
    assert result.adapters == ["task-0", "task-1", "task-2"] and len(result.weights) == 3
    assert all(-1.5 <= w <= 1.5 for w in result.weights) and len(result.history) == 6
    assert peftlab.summary(fresh)["active"] == ["mix"]


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": 0}, "budget"),
    ({"l1": -1}, "l1"),
    ({"space": "both"}, "space must be"),
    ({"bound": 0}, "bound"),
    ({"hub": ["right", "nope"]}, "neither an adapter"),
    ({"hub": ["right", "right"]}, "twice"),
    ({"hub": "right"}, "list of adapter names"),
    ({"examples": []}, "few examples"),
    ({"examples": [("a", "b")]}, "tokenizer="),
    ({"examples": [1, 2]}, "string pairs"),
    ({"name": "d0"}, "already has an adapter"),
])
def test_bad_arguments_fail_clearly(hub_model, kwargs, message):
    arguments = {"hub": HUB, "examples": task_rows(2, seed=1), "budget": 2} | kwargs
    with pytest.raises(peftlab.ConfigError, match=message):
        lorahub(hub_model, **arguments)
    assert "lorahub" not in peftlab.summary(hub_model)["adapters"]


def test_factor_space_needs_equal_ranks(hub_model):
    peftlab.attach(hub_model, "lora[r=2]", name="small")
    try:
        with pytest.raises(peftlab.ConfigError, match="same rank"):
            lorahub(hub_model, ["right", "small"], task_rows(2, seed=1), budget=2, space="factor")
    finally:
        peftlab.delete(hub_model, "small")


def test_missing_nevergrad_says_how_to_install(hub_model, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nevergrad", None)
    with pytest.raises(peftlab.ConfigError, match=r"peftlab\[compose\]"):
        lorahub(hub_model, HUB, task_rows(2, seed=1), budget=2)


def test_cli_saves_the_combination_and_its_weights(tmp_path, fake_models, capsys):
    from test_tasks import char_tokenizer, tiny_llama

    from peftlab.cli import main

    model = tiny_llama(len(char_tokenizer()))
    model.config._name_or_path = "tiny"
    folders = []
    for i in range(2):
        peftlab.attach(model, "lora[r=2,targets=[q_proj,v_proj]]", name=f"a{i}")
        folders.append(str(peftlab.save(model, tmp_path / f"hub-{i}", name=f"a{i}")))
    examples = tmp_path / "few.jsonl"
    examples.write_text("".join(json.dumps({"input": f"{i}+{i}=", "output": str(2 * i)}) + "\n" for i in range(3)))
    code = main(["lorahub", *folders, "--examples", str(examples), "--budget", "4", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "out" / "lorahub.json").read_text())
    assert report["adapters"] == ["hub-0", "hub-1"] and len(report["weights"]) == 2 and report["budget"] == 4
    assert fake_models[0]["name"] == "tiny"
    assert "examples' loss" in capsys.readouterr().out
    assert main(["lorahub", *folders, "--examples", str(examples), "--out", folders[0]]) == 2


def test_update_space_takes_any_weight_update_adapter(ids):
    """DoRA (a dense update), rsLoRA and a different rank in one hub: each weight acts on its adapter's true update."""
    from peftlab.compose.lorahub import attach_plain_lora

    model = make_llama()
    specs = {"dora": "dora[r=4]", "rs": "lora[r=2,rslora=true]", "wide": "lora[r=6,targets=[q_proj]]"}
    for name, spec in specs.items():
        peftlab.attach(model, spec, name=name)
    randomize_adapters(model, seed=2, std=0.2)
    names = list(specs)
    alone = {}
    for name in names:
        peftlab.set_active(model, name)
        alone[name] = logits(model, ids)
    layers = hub_updates(model, names, "update")
    attach_plain_lora(model, "hub", {m: sum(u.rank for u in us if u is not None) for m, us in layers.items()})
    for k, name in enumerate(names):
        set_combination(model, "hub", layers, [1.0 if i == k else 0.0 for i in range(3)], "update")
        torch.testing.assert_close(logits(model, ids), alone[name], rtol=0, atol=1e-5)
    with pytest.raises(peftlab.ConfigError, match="dense update"):
        hub_updates(model, names, "factor")
