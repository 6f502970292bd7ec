"""SparseAdapter: a bottleneck adapter pruned once, at attach / calibration time, to a target sparsity
(SNIP: by |w * dL/dw|, or by magnitude, or at random), whose pruned weights stay exactly 0 in training."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_bert, make_llama, model_loss
from conftest import random_lm_batches as batches
from conftest import random_lm_rows as rows

import peftlab
from peftlab.core import adapters as core
from peftlab.formats.files import read_tensors
from peftlab.methods import sparse_adapter as sa
from peftlab.train import TrainConfig, train


def base(make=make_llama):
    return make(initializer_range=0.2)  # hidden states of a pretrained model's scale (bottleneck.EXAMPLE_MODEL_SETTINGS)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batches()[0]["input_ids"]).logits


def attached(spec: str, make=make_llama, seed: int = 0):
    torch.manual_seed(seed)
    return peftlab.attach(base(make), spec)


@pytest.mark.parametrize("criterion", sa.CRITERIA)
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.8])
def test_every_projection_is_pruned_to_the_target_sparsity(criterion, sparsity):
    model = attached(f"sparse_adapter[bottleneck=8,sparsity={sparsity},criterion={criterion}]")
    layers = sa.projections(model, "default")
    assert len(layers) == 2 * 4  # down and up, after the attention and the FFN output of 2 layers
    for layer in layers:
        assert layer.kept() == sa.kept_count(layer.weight.numel(), sparsity) == round((1 - sparsity) * 256)
    assert sa.sparsity(model)["sparsity"] == pytest.approx(sparsity, abs=1 / 256)


def test_large_sparse_stores_what_a_dense_adapter_of_half_the_width_does():
    wide = attached("sparse_adapter[bottleneck=16,sparsity=0.5,criterion=magnitude]")
    assert sa.sparsity(wide)["kept"] == sum(layer.weight.numel() for layer in sa.projections(wide, "default")) // 2
    assert sa.sparsity(wide)["kept"] == sum(p.numel() for n, p in attached("houlsby[bottleneck=8]").named_parameters()
                                            if n.endswith("adapters.default.down.weight") or n.endswith("up.weight"))


def test_magnitude_keeps_the_largest_initial_weights_and_random_does_not():
    dense = attached("sparse_adapter[bottleneck=8,sparsity=0,criterion=magnitude]")  # same draws, nothing pruned
    pruned = attached("sparse_adapter[bottleneck=8,sparsity=0.7,criterion=magnitude]")
    randomly = attached("sparse_adapter[bottleneck=8,sparsity=0.7,criterion=random]")
    for full, layer, drawn in zip(*(sa.projections(m, "default") for m in (dense, pruned, randomly))):
        expected = sa.top_mask(full.weight.detach().abs(), layer.kept())
        assert torch.equal(layer.mask, expected)
        assert torch.equal(layer.weight.detach(), full.weight.detach() * expected)
        assert drawn.kept() == layer.kept() and not torch.equal(drawn.mask, expected)


def test_snip_keeps_the_weights_with_the_largest_weight_times_gradient():
    model = attached("sparse_adapter[bottleneck=8,sparsity=0.75]")
    layers = sa.projections(model, "default")
    assert not any(layer.final for layer in layers), "SNIP's mask waits for data"
    # by hand: the dense adapter (every mask open), gradients of both batches accumulated by backward
    twin = copy.deepcopy(model)
    for layer in sa.projections(twin, "default"):
        layer.mask.fill_(True)
    for batch in batches():
        twin(**batch).loss.backward()
    scores = [(layer.weight * layer.weight.grad).abs() for layer in sa.projections(twin, "default")]

    core.calibrate(model, batches(), model_loss)
    for layer, score, dense in zip(layers, scores, sa.projections(twin, "default")):
        assert layer.final and layer.kept() == sa.kept_count(score.numel(), 0.75)
        assert torch.equal(layer.mask, sa.top_mask(score, layer.kept()))
        assert torch.equal(layer.weight.detach(), dense.weight.detach() * layer.mask), "kept weights keep their init"
    by_magnitude = sa.top_mask(sa.projections(twin, "default")[0].weight.detach().abs(), layers[0].kept())
    assert not torch.equal(layers[0].mask, by_magnitude)
    assert all(p.grad is None for p in model.parameters()), "calibration leaves no gradient behind"


def test_training_keeps_exactly_the_masked_weights_at_zero():
    model = attached("sparse_adapter[bottleneck=8,sparsity=0.8]")
    core.calibrate(model, batches(), model_loss)
    layers = sa.projections(model, "default")
    masks = [layer.mask.clone() for layer in layers]
    before = [layer.weight.detach().clone() for layer in layers]
    config = TrainConfig(lr=1e-2, steps=6, batch_size=3, warmup_steps=0, schedule="constant", weight_decay=0.1,
                         progress=False, device="cpu")
    result = train(model, rows(), config)  # its calibration is a no-op now: the masks are final
    assert result.losses[-1] < result.losses[0]
    for layer, mask, start in zip(layers, masks, before):
        assert torch.equal(layer.mask, mask), "the mask is fixed"
        weight = layer.weight.detach()
        assert weight[~mask].eq(0).all(), "pruned weights are exactly 0"
        assert weight[mask].ne(start[mask]).all(), "every kept weight trains"
        assert layer.kept() == sa.kept_count(weight.numel(), 0.8)
    assert sa.sparsity(model)["sparsity"] == pytest.approx(0.8, abs=1 / 256)


def test_pruned_weights_get_no_gradient_and_are_put_back_to_zero_after_each_step():
    model = attached("sparse_adapter[bottleneck=8,sparsity=0.5,criterion=magnitude]")
    model.train()
    model(**batches()[0]).loss.backward()
    for layer in sa.projections(model, "default"):
        assert layer.weight.grad[~layer.mask].eq(0).all() and layer.weight.grad[layer.mask].ne(0).any()
    with torch.no_grad():  # an optimizer that touches every entry (MeZO perturbs them all)
        for layer in sa.projections(model, "default"):
            layer.weight.add_(1.0)
    core.after_step(model, 1, 1)
    assert all(layer.weight[~layer.mask].eq(0).all() for layer in sa.projections(model, "default"))


def test_a_trained_adapter_keeps_its_mask_when_calibrated_again():
    model = attached("sparse_adapter[bottleneck=8]")
    model.train()
    model(**batches()[0]).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    core.after_step(model, 1, 1)  # a training step: the magnitude mask it trained with is the mask now
    masks = [layer.mask.clone() for layer in sa.projections(model, "default")]
    core.calibrate(model, batches(), model_loss)
    assert all(torch.equal(layer.mask, m) for layer, m in zip(sa.projections(model, "default"), masks))


def test_saving_stores_only_the_kept_weights_and_loading_restores_the_masks(tmp_path):
    model = attached("sparse_adapter[bottleneck=8,sparsity=0.8]")
    core.calibrate(model, batches(), model_loss)
    with torch.no_grad():
        for layer in sa.projections(model, "default"):
            layer.weight.mul_(1.5)
            layer.bias.normal_(0, 0.1)
    expected = logits(model)
    peftlab.save(model, tmp_path / "sparse")
    tensors, _ = read_tensors(tmp_path / "sparse" / "adapter_model.safetensors")
    values = {k: v for k, v in tensors.items() if k.endswith(".values")}
    assert len(values) == 8 and sum(v.numel() for v in values.values()) == sa.sparsity(model)["kept"]
    assert all(tensors[k.replace(".values", ".indices")].dtype == torch.int32 for k in values)
    assert not any(k.endswith("weight") or k.endswith("mask") for k in tensors)

    loaded = peftlab.load(base(), tmp_path / "sparse")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    for mine, theirs in zip(sa.projections(model, "default"), sa.projections(loaded, "default")):
        assert torch.equal(mine.mask, theirs.mask) and theirs.final
    core.calibrate(loaded, batches(), model_loss)  # a loaded adapter keeps its mask
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)

    peftlab.save(attached("houlsby[bottleneck=8]"), tmp_path / "dense")
    stored = {k: sum(t.numel() * t.element_size() for t in read_tensors(tmp_path / k / "adapter_model.safetensors")[0].values())
              for k in ("sparse", "dense")}
    assert stored["sparse"] < 0.5 * stored["dense"], stored  # 20% of the weights at 8 bytes each, and the biases


@pytest.mark.parametrize("adapter", ["houlsby", "pfeiffer", "parallel"])
@pytest.mark.parametrize("make", [make_llama, make_bert], ids=["llama", "bert"])
def test_each_adapter_keeps_its_own_placement(adapter, make):
    model = attached(f"sparse_adapter[adapter={adapter},bottleneck=8,sparsity=0.5]", make)
    dense = attached(f"{adapter}[bottleneck=8]", make)
    assert [n for n, _ in core.adapter_layers(model)] == [n for n, _ in core.adapter_layers(dense)]
    kind = sa.SparseParallelAdapter if adapter == "parallel" else sa.SparseSerialAdapter
    assert all(type(layer.adapters["default"]) is kind for _, layer in core.adapter_layers(model))
    ids = batches()[0]["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        with peftlab.disabled(model):
            assert not torch.allclose(out, model(input_ids=ids).logits, atol=1e-6)


def test_the_parallel_adapter_adds_its_pruned_bottleneck_of_the_ffn_input_to_the_ffn_output():
    model = attached("sparse_adapter[adapter=parallel,bottleneck=8,sparsity=0.5,criterion=magnitude]")
    mlp = model.model.layers[0].mlp
    seen = {}
    mlp.register_forward_pre_hook(lambda module, args: seen.setdefault("ffn_input", args[0]))
    mlp.down_proj.base_layer.register_forward_hook(lambda module, args, out: seen.setdefault("base", out))
    mlp.down_proj.register_forward_hook(lambda module, args, out: seen.setdefault("adapted", out))
    with torch.no_grad():
        model(input_ids=batches()[0]["input_ids"])
        adapter = mlp.down_proj.adapters["default"]
        down, up = adapter.down, adapter.up
        hidden = torch.relu(F.linear(seen["ffn_input"], down.weight * down.mask, down.bias))
        expected = 4.0 * F.linear(hidden, up.weight * up.mask, up.bias)  # scaled PA: s = 4
    torch.testing.assert_close(seen["adapted"] - seen["base"], expected, rtol=1e-5, atol=1e-6)


def test_bad_settings_name_the_setting():
    with pytest.raises(peftlab.ConfigError, match="adapter must be one of houlsby, pfeiffer, parallel"):
        peftlab.attach(base(), "sparse_adapter[adapter=compacter]")
    with pytest.raises(peftlab.ConfigError, match=r"sparsity .* in \[0, 1\)"):
        peftlab.attach(base(), "sparse_adapter[sparsity=1.0]")


def test_a_resumed_run_keeps_the_calibrated_masks_and_ends_where_a_straight_run_does(tmp_path):
    def config(out_dir, steps):
        return TrainConfig(lr=1e-2, steps=steps, batch_size=3, warmup_steps=0, schedule="constant", save_every=2,
                           out_dir=str(out_dir), resume=True, progress=False, device="cpu")

    spec = "sparse_adapter[bottleneck=8,sparsity=0.8]"
    straight = attached(spec)
    train(straight, rows(), config(tmp_path / "straight", 4))
    cut = attached(spec)
    train(cut, rows(), config(tmp_path / "cut", 2))
    resumed = attached(spec)  # a new process: SNIP's provisional mask until the checkpoint's is read
    with pytest.warns(UserWarning, match="different steps"):  # the cut run was told 2 steps, at a constant lr
        result = train(resumed, rows(), config(tmp_path / "cut", 4))
    assert result.resumed_from == 2
    for mine, theirs in zip(sa.projections(straight, "default"), sa.projections(resumed, "default")):
        assert torch.equal(mine.mask, theirs.mask)
        torch.testing.assert_close(theirs.weight, mine.weight, rtol=0, atol=1e-7)
