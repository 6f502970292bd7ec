"""peftlab extract-lora: a LoRA from a fully fine-tuned model by truncated SVD of the difference."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import peft
import pytest
import torch
from conftest import logits, make_llama

import peftlab
from peftlab.compose.extract import extract_lora
from peftlab.errors import ConfigError

CHANGED = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def fine_tuned(base, rank=3, seed=0):
    """A copy of ``base`` whose CHANGED layers moved by a known rank-``rank`` update."""
    tuned = type(base)(base.config).eval()
    tuned.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(seed)
    updates = {}
    with torch.no_grad():
        for name in CHANGED:
            layer = tuned.get_submodule(name)
            out, inp = layer.weight.shape
            updates[name] = (torch.randn(out, rank, generator=g) * 0.3) @ (torch.randn(rank, inp, generator=g) * 0.3)
            layer.weight += updates[name]
    return tuned, updates


def test_at_max_rank_at_least_the_true_rank_the_lora_is_the_fine_tuned_model(ids):
    base = make_llama()
    tuned, _ = fine_tuned(base)
    result = extract_lora(tuned, base, max_rank=8)
    assert result.ranks == {name: 3 for name in CHANGED}  # the update's true rank, not max_rank
    assert all(kept == pytest.approx(1.0, abs=1e-6) for kept in result.energy_kept.values())
    assert result.not_carried == []
    torch.testing.assert_close(logits(base, ids), logits(tuned, ids), rtol=0, atol=1e-5)


def test_at_rank_one_it_is_the_best_rank_one_approximation_and_reports_the_energy_kept():
    from peftlab.compose.combining import updates_of

    base = make_llama()
    tuned, updates = fine_tuned(base)
    result = extract_lora(tuned, base, max_rank=1)
    made = updates_of(base, "extracted")
    for name, update in updates.items():
        U, S, Vh = torch.linalg.svd(update.double())
        torch.testing.assert_close(made[name].dense().double(), S[0] * torch.outer(U[:, 0], Vh[0]), rtol=0, atol=1e-5)
        assert result.energy_kept[name] == pytest.approx(float(S[0] ** 2 / (S ** 2).sum()), rel=1e-4)
        assert result.energy_kept[name] < 1


def test_min_energy_keeps_the_fewest_directions_reaching_it_and_targets_select_layers():
    base = make_llama()
    tuned, updates = fine_tuned(base)
    S = torch.linalg.svdvals(updates[CHANGED[0]].double())
    shares = (S ** 2).cumsum(0) / (S ** 2).sum()
    goal = float((shares[0] + shares[1]) / 2)  # between one and two directions' share: two are needed
    result = extract_lora(tuned, base, max_rank=8, targets=["q_proj"], energy=goal)
    assert result.ranks == {CHANGED[0]: 2} and result.energy_kept[CHANGED[0]] >= goal
    assert result.not_carried == [f"{CHANGED[1]}.weight"]  # changed, but left out by the targets


def test_changes_a_lora_cannot_carry_are_reported():
    base = make_llama()
    tuned, _ = fine_tuned(base)
    with torch.no_grad():
        tuned.model.norm.weight += 0.1
    assert extract_lora(tuned, base, max_rank=4).not_carried == ["model.norm.weight"]


@pytest.mark.parametrize("case,message", [
    ("rank0", "max-rank must be a positive integer"),
    ("energy", "min-energy must be in"),
    ("same", "no linear layer differs"),
    ("shape", "has shapes"),
    ("modules", "different modules"),
    ("targets", "match no linear layer"),
])
def test_bad_extractions_are_clear_errors(case, message):
    base = make_llama()
    tuned = {"same": make_llama(), "shape": make_llama(intermediate_size=48),
             "modules": make_llama(num_hidden_layers=3)}.get(case) or fine_tuned(base)[0]
    kwargs = {"rank0": dict(max_rank=0), "energy": dict(energy=1.5), "targets": dict(targets=["nothing_proj"])}.get(case, {})
    with pytest.raises(ConfigError, match=message):
        extract_lora(tuned, base, **kwargs)


def test_peftlab_extract_lora_round_trip_loads_in_peftlab_and_peft(tmp_path, capsys):
    from peftlab import cli
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_tasks import char_tokenizer, tiny_llama

    tokenizer = char_tokenizer()
    base = tiny_llama(len(tokenizer))
    tuned, _ = fine_tuned(base, rank=2)
    for folder, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    ids = torch.randint(3, len(tokenizer), (2, 6), generator=torch.Generator().manual_seed(0))
    want = logits(tuned, ids)
    out = tmp_path / "lora"
    assert cli.main(["extract-lora", "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                     "--max-rank", "4", "--out", str(out)]) == 0
    assert "2 layers, rank 2" in capsys.readouterr().out
    report = json.loads((out / "extract.json").read_text())
    assert set(report["ranks"]) == set(CHANGED) and min(report["energy_kept"].values()) > 0.999999
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(logits(peftlab.load(tiny_llama(len(tokenizer)), out), ids), want, rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tiny_llama(len(tokenizer)), str(out)).eval()
    torch.testing.assert_close(logits(theirs, ids), want, rtol=0, atol=1e-5)
    assert cli.main(["extract-lora", "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                     "--max-rank", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "max-rank must be a positive integer" in capsys.readouterr().err
    assert cli.main(["extract-lora", "--model", str(tmp_path / "tuned"), "--base", str(tmp_path / "base"),
                     "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err
