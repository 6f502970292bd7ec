"""Gated mixtures of frozen LoRA experts (peftlab.compose.mixture): X-LoRA's gate and per-layer gates."""
from __future__ import annotations

import warnings

import pytest
import torch

import peftlab
from conftest import logits, make_llama, randomize_adapters
from peftlab.compose import load_mixture, mixture

LOW, HIGH = range(30, 38), range(60, 68)  # prompt tokens for which the 'low' / 'high' expert is right


def task_batch(rows: int, which: str, seed: int) -> dict:
    """Rows of (prompt token, answer) pairs: after a LOW token the answer is 10, after a HIGH one 20;
    ``which`` is 'low', 'high' or 'both' (each pair drawn from either)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(rows):
        sequence, targets = [], []
        for _ in range(6):
            low = which == "low" or (which == "both" and bool(torch.rand((), generator=g) < 0.5))
            tokens = LOW if low else HIGH
            prompt = tokens[int(torch.randint(len(tokens), (), generator=g))]
            answer = 10 if low else 20
            sequence += [prompt, answer]
            targets += [-100, answer]
        ids.append(sequence)
        labels.append(targets)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    """Two LoRA experts trained on a tiny Llama, each on its half of the task, saved to folders."""
    folder = tmp_path_factory.mktemp("experts")
    model = make_llama(initializer_range=0.2)
    torch.manual_seed(0)
    for name, seed in (("low", 0), ("high", 1)):
        peftlab.attach(model, "lora[r=4,alpha=8]", name=name)
        batch = task_batch(32, name, seed)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(60):
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peftlab.save(model, folder / name, name=name)
    return folder


def expert_model(folder):
    model = make_llama(initializer_range=0.2)
    for name in ("low", "high"):
        peftlab.load(model, folder / name, name=name)
    return model


def loss_of(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def force(mix, k: int) -> None:
    """Make the gate put all weight on expert ``k`` for every token."""
    with torch.no_grad():
        for p in mix.parameters():
            p.zero_()
        last = [m for m in mix.modules() if isinstance(m, torch.nn.Linear)]
        for linear in (last[-1:] if mix.kind == "xlora" else last):
            linear.bias[k] = 1e4


@pytest.mark.parametrize("gate", ["xlora", "layer"])
def test_a_one_hot_gate_is_that_expert_alone(experts, gate, ids):
    model = expert_model(experts)
    peftlab.attach(model, "lora[r=2,targets=[q_proj,o_proj]]", name="third")  # experts on different modules
    randomize_adapters(model, seed=4, std=0.2)
    alone = {}
    for name in ("low", "high", "third"):
        peftlab.set_active(model, name)
        alone[name] = logits(model, ids)
    mix = mixture(model, ["low", "high", "third"], gate=gate)
    for k, name in enumerate(("low", "high", "third")):
        force(mix, k)
        torch.testing.assert_close(logits(model, ids), alone[name], rtol=0, atol=1e-5)
    mix.remove()
    assert peftlab.summary(model)["active"] == ["third"]
    torch.testing.assert_close(logits(model, ids), alone["third"], rtol=0, atol=0)


@pytest.mark.parametrize("gate", ["xlora", "layer"])
def test_only_the_gate_trains_and_it_learns_to_route(experts, gate):
    model = expert_model(experts)
    test = task_batch(16, "both", seed=7)
    single = {}
    for name in ("low", "high"):
        peftlab.set_active(model, name)
        single[name] = loss_of(model, test)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    mix = mixture(model, ["low", "high"], gate=gate)
    uniform = loss_of(model, test)
    assert not any(p.requires_grad for p in model.parameters())
    losses = mix.fit([task_batch(32, "both", seed=3)], steps=40, lr={"xlora": 2e-2, "layer": 5e-2}[gate])
    assert losses[-1] < 0.6 * losses[0]
    trained = loss_of(model, test)  # held-out rows
    assert trained < 0.85 * uniform and trained < min(single.values()), (trained, uniform, single)
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]), name  # experts and base untouched
    # after a low prompt token the 'low' expert weighs more than after a high one
    weights = mix.latest_weights()
    weights = weights if gate == "xlora" else weights[0]  # the first adapted layer's gate
    prompts = test["input_ids"][:, ::2]
    low_weight = weights[:, ::2, 0]
    is_low = (prompts >= LOW.start) & (prompts < LOW.stop)
    assert low_weight[is_low].mean() > low_weight[~is_low].mean() + 0.1


def test_xlora_gate_twins_hf_peft(experts, tmp_path, ids):
    """HF PEFT's XLoraModel with its defaults (depth 1, softmax, scaling pass value 0) and the same
    classifier weights gives the same logits."""
    peft = pytest.importorskip("peft")
    model = expert_model(experts)
    mix = mixture(model, ["low", "high"], gate="xlora")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in mix.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    ours = logits(model, ids)
    base = make_llama(initializer_range=0.2)
    base.config.use_cache = False
    # PEFT loads the experts as adapters "0", "1", ... (other names trip its set_adapter)
    config = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                              adapters={"0": str(experts / "low"), "1": str(experts / "high")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = peft.get_peft_model(base, config).eval()
    last = twin.base_model.internal_xlora_classifier.layers[-1]
    with torch.no_grad():
        last.weight.copy_(mix.classifier[0].weight)
        last.bias.copy_(mix.classifier[0].bias)
    torch.testing.assert_close(logits(twin, ids), ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(twin.base_model.get_latest_scalings()[:, :, 0], mix.latest_weights(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("gate, hidden", [("xlora", 16), ("layer", None)])
def test_save_and_load_give_the_same_outputs(experts, tmp_path, ids, gate, hidden):
    model = expert_model(experts)
    mix = mixture(model, ["low", "high"], gate=gate, hidden=hidden, temperature=0.5)
    mix.fit([task_batch(4, "both", seed=1)], steps=2, lr=0.1)
    expected = logits(model, ids)
    mix.save(tmp_path / "mix")
    again = load_mixture(expert_model(experts), tmp_path / "mix")
    assert again.kind == gate and again.temperature == 0.5
    torch.testing.assert_close(logits(again.model, ids), expected, rtol=0, atol=0)


def test_generation_needs_no_cache_for_an_xlora_gate(experts, ids):
    model = expert_model(experts)
    mixture(model, ["low", "high"], gate="xlora")
    with pytest.raises(peftlab.StateError, match="use_cache=False"):
        model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=True)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (ids.shape[0], ids.shape[1] + 3)


def test_routing_and_a_mixture_do_not_combine(experts, ids):
    model = expert_model(experts)
    mixture(model, ["low", "high"], gate="layer")
    with peftlab.routing(model, ["low", "high", None]), pytest.raises(peftlab.StateError, match="routing"):
        logits(model, ids)


@pytest.mark.parametrize("kwargs, message", [
    ({"experts": ["low"]}, "at least two"),
    ({"experts": "low"}, "at least two"),
    ({"experts": ["low", "low"]}, "twice"),
    ({"experts": ["low", "nope"]}, "no adapter named 'nope'"),
    ({"gate": "moe"}, "gate must be"),
    ({"gate": "layer", "hidden": 8}, "leave hidden unset"),
    ({"hidden": 0}, "hidden"),
    ({"temperature": 0}, "temperature"),
])
def test_bad_arguments_fail_clearly(experts, kwargs, message):
    model = expert_model(experts)
    arguments = {"experts": ["low", "high"]} | kwargs
    with pytest.raises(peftlab.ConfigError, match=message):
        mixture(model, **arguments)


def test_prompt_and_pissa_experts_are_refused(experts):
    model = expert_model(experts)
    peftlab.attach(model, "prompt[length=2]", name="prompt")
    with pytest.raises(peftlab.ConfigError, match="soft prompt"):
        mixture(model, ["low", "prompt"])
    peftlab.attach(model, "lora[r=2,init=pissa,targets=[q_proj]]", name="pissa")
    with pytest.raises(peftlab.ConfigError, match="PiSSA"):
        mixture(model, ["low", "pissa"], gate="layer")
