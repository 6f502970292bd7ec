"""LoRA on raw parameters (HF PEFT's ``target_parameters``): a mixture-of-experts layer's 3D expert stacks
get a rank-r pair per expert; golden-tested against peft 0.21.2 on a tiny MoE module and transformers' Qwen3-MoE."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.layer import AdapterLayer
from peftlab.errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError, TargetError

from conftest import randomize_adapters

PARAMS = "target_parameters=[experts.gate_up_proj,experts.down_proj]"


class Experts(nn.Module):
    """Experts as transformers stores them: (E, 2I, H) and (E, H, I), or (E, H, 2I) and (E, I, H) with is_transposed."""

    def __init__(self, experts=3, hidden=8, inner=5, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        up, down = ((hidden, 2 * inner), (inner, hidden)) if transposed else ((2 * inner, hidden), (hidden, inner))
        self.gate_up_proj = nn.Parameter(torch.randn(experts, *up) * 0.3)
        self.down_proj = nn.Parameter(torch.randn(experts, *down) * 0.3)
        self.mix = nn.Parameter(torch.randn(hidden, hidden) * 0.3)  # a 2D parameter (out x in) used as a weight

    def forward(self, x, index):
        up, down = self.gate_up_proj[index], self.down_proj[index]
        if not self.is_transposed:
            up, down = up.transpose(1, 2), down.transpose(1, 2)
        gate, value = torch.einsum("nh,nhk->nk", x, up).chunk(2, -1)
        return torch.einsum("ni,nih->nh", F.silu(gate) * value, down) + F.linear(x, self.mix)


class TinyMoe(nn.Module):
    def __init__(self, transposed=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.router = nn.Linear(8, 3)
        self.experts = Experts(transposed=transposed)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.experts(x, self.router(x).argmax(-1)))


@pytest.fixture
def tokens():
    return torch.randn(12, 8, generator=torch.Generator().manual_seed(1))


def run(model, x):
    with torch.no_grad():
        return model(x)


def _peft(model, **kwargs):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(**kwargs)).eval()


def _peft_load(model, folder):
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, str(folder)).eval()


# ---- the defining property -------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
def test_each_expert_gets_its_own_rank_r_update(transposed, tokens):
    spec = "lora[r=2,alpha=6,targets=[],target_parameters=[gate_up_proj,down_proj,mix]]"
    model = randomize_adapters(peftlab.attach(TinyMoe(transposed), spec))
    adapter = model.experts.adapters["default"]
    base = model.experts.base_layer
    for name in ("gate_up_proj", "down_proj"):
        A, B, W = adapter.lora_A[name].weight, adapter.lora_B[name].weight, getattr(base, name)
        for e in range(3):  # by hand: expert e's rows of A are e*r..e*r+r-1, its columns of B are e, E+e, 2E+e...
            update = 3.0 * B[:, e::3] @ A[2 * e:2 * e + 2]
            torch.testing.assert_close(adapter.delta(name)[e], update.T if transposed else update, rtol=0, atol=1e-6)
            assert adapter.delta(name)[e].shape == W[e].shape
    A, B = adapter.lora_A["mix"].weight, adapter.lora_B["mix"].weight
    torch.testing.assert_close(adapter.delta("mix"), 3.0 * B @ A, rtol=0, atol=1e-6)
    # the layer runs as the base module with W + delta, parameter by parameter
    updated = TinyMoe(transposed)
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj", "mix"):
            getattr(updated.experts, name).add_(adapter.delta(name))
    torch.testing.assert_close(run(model, tokens), run(updated, tokens), rtol=0, atol=1e-5)


def test_identity_at_init_gradients_and_only_the_parameters(tokens):
    model = peftlab.attach(TinyMoe(), f"lora[r=2,targets=[],{PARAMS}]")
    assert isinstance(model.experts, AdapterLayer) and not isinstance(model.proj, AdapterLayer)
    torch.testing.assert_close(run(model, tokens), run(TinyMoe(), tokens), rtol=0, atol=0)
    randomize_adapters(model)
    model(tokens).square().sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        f"experts.adapters.default.lora_{ab}.{p}.weight" for ab in "AB" for p in ("down_proj", "gate_up_proj")]
    both = peftlab.attach(TinyMoe(), f"lora[r=2,{PARAMS}]")  # targets stays all-linear: the linears too
    assert isinstance(both.proj, AdapterLayer) and isinstance(both.experts, AdapterLayer)


def test_merge_unmerge_save_load(tokens, tmp_path):
    model = randomize_adapters(peftlab.attach(TinyMoe(), f"lora[r=2,rslora=true,targets=[proj],{PARAMS}]"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = run(model, tokens)
    assert not torch.allclose(unmerged, run(TinyMoe(), tokens), atol=1e-3)
    peftlab.save(model, tmp_path)
    torch.testing.assert_close(run(peftlab.load(TinyMoe(), tmp_path), tokens), unmerged, rtol=0, atol=0)
    peftlab.merge(model)
    torch.testing.assert_close(run(model, tokens), unmerged, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    with peftlab.disabled(model):  # the base after a merge and an unmerge: equal up to rounding
        torch.testing.assert_close(run(model, tokens), run(TinyMoe(), tokens), rtol=0, atol=1e-5)


# ---- HF PEFT both ways -------------------------------------------------------------------------

@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kwargs", [
    dict(r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
    dict(r=4, lora_alpha=4, use_rslora=True, target_modules=["proj"], target_parameters=["down_proj", "mix"],
         rank_pattern={"down_proj": 2}),
])
def test_peft_parameter_adapter_loads_here_and_goes_back(transposed, kwargs, tokens, tmp_path):
    theirs = randomize_adapters(_peft(TinyMoe(transposed), **kwargs))
    expected = run(theirs, tokens)
    assert not torch.allclose(expected, run(TinyMoe(transposed), tokens), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(TinyMoe(transposed), tmp_path)
    torch.testing.assert_close(run(ours, tokens), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert len(saved["target_parameters"]) == len(kwargs["target_parameters"])
    torch.testing.assert_close(run(_peft_load(TinyMoe(transposed), tmp_path / "again"), tokens), expected, rtol=0, atol=1e-5)


def test_our_parameter_adapter_loads_in_peft(tokens, tmp_path):
    model = randomize_adapters(peftlab.attach(TinyMoe(), "lora[r=2,alpha=8,targets=[router],"
                                                          "target_parameters=[gate_up_proj,down_proj,mix]]"))
    expected = run(model, tokens)
    peftlab.save(model, tmp_path)
    theirs = _peft_load(TinyMoe(), tmp_path)
    torch.testing.assert_close(run(theirs, tokens), expected, rtol=0, atol=1e-5)


def _qwen3_moe(seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=24, intermediate_size=32, moe_intermediate_size=8,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.Qwen3MoeForCausalLM(config).eval()


def test_qwen3_moe_expert_stacks_both_ways(tmp_path):
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = lambda m: m(input_ids=ids).logits.detach()  # noqa: E731
    theirs = randomize_adapters(_peft(_qwen3_moe(), r=2, target_modules=["q_proj"],
                                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    expected = logits(theirs)
    assert not torch.allclose(expected, logits(_qwen3_moe()), atol=1e-3)
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(_qwen3_moe(), tmp_path)
    torch.testing.assert_close(logits(ours), expected, rtol=0, atol=1e-5)
    peftlab.save(ours, tmp_path / "again")
    torch.testing.assert_close(logits(_peft_load(_qwen3_moe(), tmp_path / "again")), expected, rtol=0, atol=1e-5)
    spec = "lora[r=2,targets=[],target_parameters=[mlp.experts.gate_up_proj,mlp.experts.down_proj],layers=[1]]"
    model = randomize_adapters(peftlab.attach(_qwen3_moe(), spec))
    assert not isinstance(model.model.layers[0].mlp.experts, AdapterLayer)
    peftlab.save(model, tmp_path / "ours")
    torch.testing.assert_close(logits(_peft_load(_qwen3_moe(), tmp_path / "ours")), logits(model), rtol=0, atol=1e-5)


# ---- clear errors --------------------------------------------------------------------------------

def test_clear_errors(tokens, tmp_path):
    with pytest.raises(TargetError, match=r"'experts\.gate_proj' matched no parameter.*experts\.gate_up_proj"):
        peftlab.attach(TinyMoe(), "lora[targets=[],target_parameters=[experts.gate_proj]]")
    with pytest.raises(ConfigError, match="dropout=0.1"):
        peftlab.attach(TinyMoe(), f"lora[dropout=0.1,{PARAMS}]")
    with pytest.raises(ConfigError, match="supported by lora only"):
        peftlab.attach(TinyMoe(), f"dora[targets=[proj],{PARAMS}]")
    with pytest.raises(ConfigError, match="2D .* or 3D"):
        peftlab.attach(TinyMoe(), "lora[targets=[],target_parameters=[router.bias]]")
    with pytest.raises(ConfigError, match="both by targets and"):
        peftlab.attach(TinyMoe(), "lora[targets=[router],target_parameters=[router.weight]]")
    with pytest.raises(ConfigError, match="target_parameters must be a list"):
        peftlab.attach(TinyMoe(), "lora[target_parameters=[]]")
    model = peftlab.attach(TinyMoe(), f"lora[targets=[],{PARAMS}]", name="a")
    with pytest.raises(StateError, match="cannot be routed per row"):
        with peftlab.routing(model, ["a"] * tokens.shape[0]):
            model(tokens)
    peftlab.save(randomize_adapters(model), tmp_path, name="a")
    with pytest.raises(IncompatibleBaseError, match="another base model"):
        peftlab.load(nn.Sequential(nn.Linear(8, 8)), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="do not belong together"):
        peftlab.load(TinyMoe(), tmp_path)
