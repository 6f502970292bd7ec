"""LoRA inits chosen from data (``methods/lora_data.py``): EVA, CorDA, LoRA-GA, each checked against a
hand computation, through the trainer, save/load, and HF PEFT both ways."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import peftlab
from peftlab.core.adapters import adapter_layers
from peftlab.methods import lora_data
from peftlab.train import TrainConfig, train

from conftest import logits, make_bert, make_gpt2, make_llama, model_loss, peft_logits, random_lm_batches, random_lm_rows

peft = pytest.importorskip("peft")

EVA_TARGETS = ["q_proj", "o_proj", "gate_proj", "down_proj"]  # layers with distinct inputs (no ties between them)
EVA = f"lora[init=eva,targets=[{','.join(EVA_TARGETS)}]]"


def adapters(model, name="default") -> dict:
    return {n: layer.adapters[name] for n, layer in adapter_layers(model, name)}


def layer_inputs(factory, batches) -> dict:
    """Every linear layer's input rows over the batches' tokens, from a plain model (no peftlab)."""
    model, rows = factory(), {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: rows.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v).double() for n, v in rows.items()}


def _nudge(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def _fit(model, steps=3, lr=1e-2):
    config = TrainConfig(lr=lr, steps=steps, batch_size=3, warmup_steps=0, schedule="constant", progress=False, device="cpu")
    return train(model, random_lm_rows(), config)


# ---- EVA --------------------------------------------------------------------------------------

def test_eva_a_is_the_inputs_principal_directions_and_ranks_follow_explained_variance(ids):
    batches = random_lm_batches()
    model = peftlab.attach(make_llama(), EVA)
    assert logits(model, ids).sub(logits(make_llama(), ids)).abs().max() == 0
    lora_data.initialize(model, batches)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=0)  # B = 0
    inputs = layer_inputs(make_llama, batches)
    targets = [n for n in inputs if n.rsplit(".", 1)[-1] in EVA_TARGETS]
    # by hand: SVD of the centred inputs; each layer offers its first 2r ratios S^2 / sum S^2; the 8 * r largest win
    svd = {n: torch.linalg.svd(inputs[n] - inputs[n].mean(0), full_matrices=False) for n in targets}
    offers = sorted(((float(s) ** 2 / float((S ** 2).sum()), n) for n, (_, S, _) in svd.items() for s in S[:16]),
                    reverse=True)
    expected = {n: sum(1 for _, m in offers[:8 * len(targets)] if m == n) for n in targets}
    ours = adapters(model)
    assert {n: a.r for n, a in ours.items()} == {n: k for n, k in expected.items() if k}
    assert len(set(expected.values())) > 1  # the ranks really moved
    for n, adapter in ours.items():
        Vh = svd[n][2][:adapter.r]
        # the same directions, one by one, up to sign
        torch.testing.assert_close(adapter.lora_A.weight.double().mul(Vh).sum(1).abs(), torch.ones(adapter.r, dtype=torch.float64),
                                   rtol=0, atol=1e-4)
        assert adapter.lora_B.weight.abs().max() == 0


def test_eva_padding_and_prompt_tokens_do_not_count():
    batches = random_lm_batches()
    masked = [dict(b) for b in batches]
    for b in masked:
        b["attention_mask"] = b["attention_mask"].clone()
        b["attention_mask"][:, -2:] = 0  # padding
        b["labels"] = b["labels"].clone()
        b["labels"][:, :2] = -100  # prompt
    model = peftlab.attach(make_llama(), EVA)
    lora_data.initialize(model, masked)
    # by hand for one layer: only rows with mask 1 and label != -100
    x = layer_inputs(make_llama, masked)["model.layers.0.self_attn.q_proj"].view(2, 3, 8, 32)
    keep = torch.stack([(b["attention_mask"].bool() & (b["labels"] != -100)) for b in masked])
    rows = x[keep]
    Vh = torch.linalg.svd(rows - rows.mean(0), full_matrices=False)[2]
    A = adapters(model)["model.layers.0.self_attn.q_proj"].lora_A.weight.double()
    torch.testing.assert_close(A.mul(Vh[:len(A)]).sum(1).abs(), torch.ones(len(A), dtype=torch.float64), rtol=0, atol=1e-4)


def test_eva_rho_one_keeps_every_rank_and_a_layer_can_lose_its_adapter():
    model = peftlab.attach(make_llama(), EVA.replace("init=eva", "init=eva,eva_rho=1"))
    lora_data.initialize(model, random_lm_batches())
    assert {a.r for a in adapters(model).values()} == {8} and len(adapters(model)) == 8
    ranks = lora_data.eva_ranks({"a": torch.tensor([0.9, 0.1]), "b": torch.tensor([0.5, 0.4])}, {"a": 1, "b": 1}, 2)
    assert ranks == {"a": 1, "b": 1}
    assert lora_data.eva_ranks({"a": torch.tensor([0.9, 0.8]), "b": torch.tensor([0.5, 0.4])}, {"a": 1, "b": 1}, 2) == \
        {"a": 2, "b": 0}


def test_eva_matches_peft_initialize_lora_eva_weights():
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    ours = peftlab.attach(make_llama(), EVA)
    lora_data.initialize(ours, random_lm_batches())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=EVA_TARGETS,
                                                                    init_lora_weights="eva", eva_config=peft.EvaConfig()))
        initialize_lora_eva_weights(theirs, random_lm_batches(), show_progress_bar=False)
    their_A = {n.removeprefix("base_model.model."): m.lora_A["default"].weight for n, m in theirs.named_modules()
               if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n: a.r for n, a in adapters(ours).items()} == {n: len(A) for n, A in their_A.items()}  # same ranks
    for n, adapter in adapters(ours).items():  # same subspaces (peft's incremental PCA is randomized)
        cosines = torch.linalg.svdvals(adapter.lora_A.weight @ their_A[n].t())
        assert cosines.min() > 0.98, n


def test_eva_file_is_plain_lora_with_the_new_ranks_and_peft_loads_it_both_ways(ids, tmp_path):
    model = _nudge(peftlab.attach(make_llama(), EVA))
    with pytest.raises(peftlab.StateError, match="not seen any data"):
        peftlab.save(model, tmp_path / "early")  # not yet what EVA starts from
    lora_data.initialize(model, random_lm_batches())
    _nudge(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["init_lora_weights"] == "eva" and hf["eva_config"]["rho"] == 2.0 and hf["r"] == 8
    ranks = {n: a.r for n, a in adapters(model).items()}
    assert {k.replace("\\", ""): v for k, v in hf["rank_pattern"].items()} == {n: r for n, r in ranks.items() if r != 8}
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)
    loaded = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)
    lora_data.initialize(loaded, random_lm_batches()[:1])  # a loaded adapter is never re-initialised
    torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=1e-5)


def test_peft_eva_file_loads_here(ids, tmp_path):
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(make_llama(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=EVA_TARGETS,
                                                                    init_lora_weights="eva"))
        initialize_lora_eva_weights(theirs, random_lm_batches(), show_progress_bar=False)
        _nudge(theirs)
        expected = logits(theirs, ids)
        theirs.save_pretrained(tmp_path)
    ours = peftlab.load(make_llama(), tmp_path)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=1e-5)
    assert peftlab.core.state.require_state(ours).configs["default"][0].init == "eva"


def test_the_trainer_initialises_eva_from_its_first_batches_then_trains(ids):
    model = peftlab.attach(make_llama(), EVA)
    _fit(model)
    assert all(not a.awaiting_data for a in adapters(model).values())
    assert {a.r for a in adapters(model).values()} != {8}
    assert not torch.allclose(logits(model, ids), logits(make_llama(), ids))
    assert all(a.lora_B.weight.grad is None or a.lora_B.weight.requires_grad for a in adapters(model).values())


# ---- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_no_batches_is_a_clear_error(init):
    model = peftlab.attach(make_llama(), f"lora[init={init},targets=q_proj]")
    with pytest.raises(peftlab.StateError, match="no batches"):
        lora_data.initialize(model, [])
    with pytest.raises(peftlab.StateError, match="no batches"):
        peftlab.core.adapters.calibrate(model, [], model_loss)


@pytest.mark.parametrize("spec,match", [("lora[init=eva,eva_rho=0.5]", "eva_rho"),
                                        ("lora[init=corda,corda_method=mid]", "corda_method"),
                                        ("dora[init=eva]", "lora only"),
                                        ("lora[init=corda,layer_replication=[[0,2]]]", "layer_replication"),
                                        ("lora[init=eva,targets=embed_tokens]", "linear layers only")])
def test_bad_settings_are_clear_errors(spec, match):
    with pytest.raises(peftlab.ConfigError, match=match):
        peftlab.attach(make_llama(), spec)


# ---- CorDA ------------------------------------------------------------------------------------

def corda_by_hand(weight, x_rows_per_example, r, scale, mode):
    """C = mean over examples of X^T X / max(X)^2, damped (PEFT's rule); W C = U S V^T; the adapter's
    s B A is U_r S_r V_r^T C^-1 for the kept components."""
    C = sum((X / X.max().abs()).t() @ (X / X.max().abs()) for X in x_rows_per_example) / len(x_rows_per_example)
    eye, damp = torch.eye(len(C), dtype=C.dtype), 0.01
    while True:
        Cd = C + eye * C.diagonal().mean() * damp
        if torch.dist(Cd @ torch.linalg.inv(Cd), eye) < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(weight.double() @ Cd)
    keep = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    return U[:, keep] @ torch.diag(S[keep]) @ Vh[keep] @ torch.linalg.inv(Cd)


@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_takes_the_largest_or_smallest_components_of_w_c_and_the_base_keeps_the_rest(mode, ids):
    batches = random_lm_batches()
    model = peftlab.attach(make_llama(), f"lora[r=4,init=corda,corda_method={mode},targets=[q_proj,down_proj]]")
    lora_data.initialize(model, batches)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)  # W - sBA + sBA
    inputs = layer_inputs(make_llama, batches)
    original = dict(make_llama().named_modules())
    for n, adapter in adapters(model).items():
        X = inputs[n].view(6, 8, -1)  # six examples of eight tokens
        expected = corda_by_hand(original[n].weight, list(X), 4, adapter.scaling, mode)
        torch.testing.assert_close(adapter.delta_weight().double(), expected, rtol=0, atol=1e-4)
        residual = model.get_submodule(n).base_layer.weight
        torch.testing.assert_close(residual.double(), original[n].weight.double() - expected, rtol=0, atol=1e-4)


def test_corda_matches_peft_preprocess_corda():
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    batches = random_lm_batches()
    ours = peftlab.attach(make_llama(), "lora[r=4,init=corda,targets=[q_proj,v_proj]]")
    lora_data.initialize(ours, batches)
    base = make_llama()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method="ipm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def run_model():  # peft's covariance hook takes one example per call
            for batch in batches:
                for row in batch["input_ids"]:
                    base(input_ids=row[None])

        preprocess_corda(base, config, run_model=run_model)
        theirs = peft.get_peft_model(base, config)
    for n, m in theirs.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            delta = m.get_delta_weight("default")
            torch.testing.assert_close(adapters(ours)[n.removeprefix("base_model.model.")].delta_weight(), delta,
                                       rtol=0, atol=1e-4)


def test_corda_saves_plain_lora_that_peft_loads_on_the_original_base(ids, tmp_path):
    model = peftlab.attach(make_llama(), "lora[r=4,init=corda,corda_method=kpm,targets=[q_proj,v_proj,down_proj]]")
    lora_data.initialize(model, random_lm_batches())
    _nudge(model)
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["init_lora_weights"] is True and hf["r"] == 8  # plain LoRA of rank 2r, as PEFT converts CorDA
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=1e-5)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=1e-5)
    peftlab.unmerge(model)
    peftlab.delete(model, "default")
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["corda", "lora_ga", "eva"])
def test_resume_rebuilds_the_data_init_and_is_exact(init, tmp_path):
    from conftest import Killed, dies_at_forward

    spec = f"lora[r=2,init={init},targets=[q_proj,v_proj]]"

    def config(out_dir, **more):
        return TrainConfig(lr=1e-2, steps=4, batch_size=3, warmup_steps=0, save_every=2, seed=3, out_dir=str(out_dir),
                           device="cpu", progress=False, **more)

    straight = train(peftlab.attach(make_llama(), spec), random_lm_rows(), config(tmp_path / "straight"))
    killed = peftlab.attach(make_llama(), spec)
    dies_at_forward(killed, 2 + 3)  # two calibration batches, then step 3; the last checkpoint is step 2's
    with pytest.raises(Killed):
        train(killed, random_lm_rows(), config(tmp_path / "cut"))
    resumed = train(peftlab.attach(make_llama(), spec), random_lm_rows(), config(tmp_path / "cut", resume=True))
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)


# ---- LoRA-GA ----------------------------------------------------------------------------------

def test_lora_ga_factors_come_from_the_svd_of_the_averaged_gradient(ids):
    batches = random_lm_batches()
    model = peftlab.attach(make_llama(), "lora[r=2,alpha=4,init=lora_ga,targets=[q_proj,up_proj]]")
    lora_data.initialize(model, batches, loss_fn=model_loss)
    torch.testing.assert_close(logits(model, ids), logits(make_llama(), ids), rtol=0, atol=1e-5)
    # by hand: the full model's weight gradient, averaged over the batches; A = V^T[:r], B = U[:, r:2r] S[r:2r] out^(1/4) / 4
    plain = make_llama()
    for batch in batches:
        model_loss(plain, batch).backward()
    for n, adapter in adapters(model).items():
        weight = plain.get_submodule(n).weight
        U, S, Vh = torch.linalg.svd((weight.grad / len(batches)).double())
        A, B = adapter.lora_A.weight.double(), adapter.lora_B.weight.double()
        torch.testing.assert_close(A.mul(Vh[:2]).sum(1).abs(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-4)
        B_expected = U[:, 2:4] * S[2:4] * weight.shape[0] ** 0.25 / 4
        torch.testing.assert_close(B.abs(), B_expected.abs(), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.get_submodule(n).base_layer.weight, weight - adapter.delta_weight(), rtol=0, atol=1e-6)


def test_lora_ga_first_step_moves_the_weights_along_the_gradients_top_directions():
    batches = random_lm_batches()
    model = peftlab.attach(make_llama(), "lora[r=2,init=lora_ga,targets=[q_proj]]")
    lora_data.initialize(model, batches, loss_fn=model_loss)
    plain = make_llama()
    sum(model_loss(plain, b) for b in batches).backward()
    sum(model_loss(model, b) for b in batches).backward()
    for n, adapter in adapters(model).items():
        # the first step's change of s B A (gradient descent on A and B) versus full fine-tuning's gradient
        s = adapter.scaling
        A, B = adapter.lora_A.weight, adapter.lora_B.weight
        step = s * (B.grad @ A + B @ A.grad).detach()
        grad = plain.get_submodule(n).weight.grad
        cos = torch.nn.functional.cosine_similarity(step.reshape(-1), grad.reshape(-1), dim=0)
        assert cos > 0.5, (n, float(cos))


def test_lora_ga_saves_plain_lora_that_peft_loads_and_gpt2_conv1d_works(ids, tmp_path):
    model = peftlab.attach(make_llama(), "lora[r=2,init=lora_ga,targets=[q_proj,o_proj]]")
    _fit(model)  # the trainer initialises it from its first batches
    expected = logits(model, ids)
    peftlab.save(model, tmp_path)
    hf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert hf["init_lora_weights"] is True and hf["r"] == 4
    torch.testing.assert_close(peft_logits(make_llama, tmp_path, ids), expected, rtol=0, atol=1e-5)
    gpt2 = peftlab.attach(make_gpt2(), "lora[r=2,init=lora_ga]")
    before = logits(make_gpt2(), ids)
    lora_data.initialize(gpt2, random_lm_batches(), loss_fn=model_loss)
    torch.testing.assert_close(logits(gpt2, ids), before, rtol=0, atol=1e-5)


def test_peft_lora_ga_and_corda_raw_files_are_refused_with_the_conversion_hint(tmp_path):
    hf = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": "lora_ga"}
    from peftlab.formats.hf_lora import config_from_hf

    for init in ("lora_ga", "corda"):
        with pytest.raises(peftlab.AdapterFormatError, match="path_initial_model_for_weight_conversion"):
            config_from_hf({**hf, "init_lora_weights": init}, ["model.layers.0.self_attn.q_proj"])


def test_eva_on_a_quantized_base_and_corda_lora_ga_refuse_one(ids):
    model = make_llama()
    peftlab.quantize(model, "int4", group_size=16)
    before = logits(model, ids)
    peftlab.attach(model, EVA)
    lora_data.initialize(model, random_lm_batches())
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert {a.r for a in adapters(model).values()} != {8}
    for init in ("corda", "lora_ga"):
        quantized = make_llama()
        peftlab.quantize(quantized, "int4", group_size=16)
        with pytest.raises(peftlab.ConfigError, match="quantized"):
            peftlab.attach(quantized, f"lora[init={init},targets=q_proj]")


@pytest.mark.parametrize("init", ["corda", "lora_ga", "eva"])
def test_routing_rows_without_the_adapter_see_the_original_base(init, ids):
    model = peftlab.attach(make_llama(), f"lora[r=2,init={init},targets=[q_proj,down_proj]]")
    lora_data.initialize(model, random_lm_batches(), loss_fn=model_loss)
    _nudge(model)
    adapted, base = logits(model, ids), logits(make_llama(), ids)
    with peftlab.routing(model, ["default", None, "default"]):
        routed = logits(model, ids)
    torch.testing.assert_close(routed[[0, 2]], adapted[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(routed[1], base[1], rtol=0, atol=1e-5)


def test_lora_ga_matches_peft_preprocess_loraga(ids):
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    batches = random_lm_batches()
    ours = peftlab.attach(make_llama(), "lora[r=2,alpha=4,init=lora_ga,targets=[q_proj,v_proj]]")
    lora_data.initialize(ours, batches, loss_fn=model_loss)
    base = make_llama()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                             lora_ga_config=LoraGAConfig())

    def train_step():
        for batch in batches:
            model_loss(base, batch).backward()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_loraga(base, config, train_step)
        theirs = peft.get_peft_model(base, config).eval()
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=0, atol=1e-5)
    for n, m in theirs.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            mine = adapters(ours)[n.removeprefix("base_model.model.")]
            # singular vectors agree up to sign (peft's SVD is randomized, torch.svd_lowrank)
            torch.testing.assert_close(mine.lora_A.weight.abs(), m.lora_A["default"].weight.abs(), rtol=0, atol=1e-3)
            torch.testing.assert_close(mine.lora_B.weight.abs(), m.lora_B["default"].weight.abs(), rtol=0, atol=1e-3)


def _bert_batches():
    return [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"], "labels": b["input_ids"][:, 0] % 3}
            for b in random_lm_batches()]


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_bert_with_a_head_and_gpt2_conv1d_keep_the_base_and_peft_loads_the_file(init, ids, tmp_path):
    for factory, targets in ((make_bert, "[query,value,output.dense],modules_to_save=[classifier]"),
                             (make_gpt2, "[c_attn,c_fc,c_proj]")):
        model = peftlab.attach(factory(), f"lora[r=2,init={init},targets={targets}]")
        before = logits(factory(), ids)
        batches = _bert_batches() if factory is make_bert else random_lm_batches()
        lora_data.initialize(model, batches, loss_fn=model_loss)
        torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
        _nudge(model)
        expected = logits(model, ids)
        peftlab.save(model, tmp_path / factory.__name__)
        torch.testing.assert_close(peft_logits(factory, tmp_path / factory.__name__, ids), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("init", ["eva", "corda", "lora_ga"])
def test_peftlab_native_files_with_another_method_restore_the_adapter_exactly(init, ids, tmp_path):
    model = peftlab.attach(make_llama(), f"lora[r=2,init={init},targets=[q_proj,v_proj]]|ia3[targets=down_proj]")
    lora_data.initialize(model, random_lm_batches(), loss_fn=model_loss)
    expected = logits(_nudge(model), ids)
    peftlab.save(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PEFTLAB"
    torch.testing.assert_close(logits(peftlab.load(make_llama(), tmp_path), ids), expected, rtol=0, atol=1e-6)
