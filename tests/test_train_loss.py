"""The blockwise causal-LM loss equals the model's own loss and gradients, without full logits."""
import pytest
import torch

import peftlab
from peftlab.train import loss as loss_module
from peftlab.train.data import IGNORE_INDEX
from peftlab.train.loss import linear_cross_entropy, plain_head, training_loss

from conftest import VOCAB, make_bert, make_gpt2, make_llama, randomize_adapters


def _batch(rows=3, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, -3:] = IGNORE_INDEX  # padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch, chunked):
    model.zero_grad(set_to_none=True)
    loss = training_loss(model, batch, chunked)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
@pytest.mark.parametrize("spec", ["lora[r=4]", "lora[r=4,targets=all-linear,modules_to_save=[lm_head]]"])
def test_blockwise_loss_and_gradients_equal_the_models_own(make, spec, monkeypatch):
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 5 * VOCAB)  # 5 rows per block: several blocks, a ragged last one
    if make is make_gpt2 and "lm_head" in spec:
        pytest.skip("GPT-2 ties lm_head to the input embedding")
    model = make()  # in eval mode: no dropout, so both paths see the same network
    peftlab.attach(model, spec)
    randomize_adapters(model)
    batch = _batch()
    assert plain_head(model) is not None
    ours, our_grads = _loss_and_grads(model, batch, chunked=True)
    theirs, their_grads = _loss_and_grads(model, batch, chunked=False)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_the_head_never_runs_on_the_full_batch(monkeypatch):
    """The defining property: no (tokens x vocab) logits tensor exists; the head's own forward
    never runs, and each block's logits are at most BLOCK_ELEMENTS."""
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 4 * VOCAB)
    model = make_llama()
    peftlab.attach(model, "lora[r=4]")
    head = model.get_output_embeddings()
    called = []
    largest = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_mm(a, b)
        if out.dim() == 2 and out.shape[-1] == VOCAB:
            largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    batch = _batch(rows=4, length=12)
    assert plain_head(model) is head
    hook = head.register_forward_hook(lambda *a: called.append(1))
    try:
        assert plain_head(model) is None  # a hooked head falls back to the model's forward
    finally:
        hook.remove()
    training_loss(model, batch).backward()
    assert largest and max(largest) <= 4 * VOCAB
    assert not called


def test_models_without_a_plain_head_use_their_own_loss():
    bert = make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    peftlab.attach(bert, "lora[r=4,targets=[query,value],modules_to_save=[classifier]]")
    assert plain_head(bert) is None
    batch = {"input_ids": torch.randint(3, VOCAB, (2, 5)), "labels": torch.tensor([0, 2])}
    torch.testing.assert_close(training_loss(bert, batch), bert(**batch).loss)
    llama = make_llama()
    peftlab.attach(llama, "lora[r=4,targets=[lm_head,q_proj]]")  # an adapter on the head itself
    assert plain_head(llama) is None
    torch.testing.assert_close(training_loss(llama, _batch()), llama(**_batch()).loss)


def test_no_target_rows_gives_nan_like_cross_entropy():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(VOCAB, 8)
    loss = linear_cross_entropy(hidden, weight, None, torch.full((4,), IGNORE_INDEX))
    assert torch.isnan(loss)
    reference = torch.nn.functional.cross_entropy(hidden @ weight.t(), torch.full((4,), IGNORE_INDEX))
    assert torch.isnan(reference)


def test_bias_and_weight_gradients_match_autograd():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)
    weight = torch.randn(VOCAB, 8, generator=g, requires_grad=True)
    bias = torch.randn(VOCAB, generator=g, requires_grad=True)
    targets = torch.randint(0, VOCAB, (11,), generator=g)
    targets[2] = IGNORE_INDEX
    ours = linear_cross_entropy(hidden, weight, bias, targets) * 3.0  # a scaled upstream gradient
    grads = torch.autograd.grad(ours, (hidden, weight, bias))
    theirs = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets) * 3.0
    expected = torch.autograd.grad(theirs, (hidden, weight, bias))
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_a_wrapped_model_uses_its_own_loss():
    import warnings

    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert plain_head(wrapped) is None  # its base_model returns logits, not hidden states
    torch.testing.assert_close(training_loss(wrapped, _batch()), wrapped(**_batch()).loss)
