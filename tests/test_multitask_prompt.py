"""Multitask prompt tuning (Wang et al., 2023): a shared prompt times each task's rank-r factors.

The defining property against the plain model fed the hand-computed prompt, per-row tasks in one
batch, the task-id context, the source inits, and HF PEFT's ``MULTITASK_PROMPT_TUNING`` files both
ways (peft's forward takes ``task_ids``; its causal-LM logits include the virtual positions).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, make_bert, make_llama
from safetensors.torch import load_file, save_file

import peftlab
from peftlab.core import model_adapters
from peftlab.core.state import get_state

peft = pytest.importorskip("peft")

SCALE = dict(initializer_range=0.2)  # weights at a pretrained scale, so virtual tokens visibly matter
SPEC = "multitask_prompt[length=4,tasks=3,r=2]"


def llama():
    return make_llama(**SCALE)


def bert():
    return make_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **SCALE)


def the_module(model):
    (module,) = [m for _, _, m in model_adapters.model_adapters(model)]
    return module


def trained(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(rows=3, length=6):
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(2))


def run(model, ids, task_ids=None, **inputs):
    with torch.no_grad():
        if task_ids is None:
            return model(input_ids=ids, **inputs).logits
        with peftlab.task_ids(model, task_ids):
            return model(input_ids=ids, **inputs).logits


# ---- the defining property ---------------------------------------------------------------------

def test_each_row_reads_the_shared_prompt_times_its_tasks_low_rank_matrix():
    """P_t = P* ⊙ (u_t v_t^T), by hand; rows of different tasks in one batch get their own prompts."""
    model = trained(peftlab.attach(llama(), SPEC))
    module = the_module(model)
    shared, cols, rows = module.prompt_embeddings, module.prefix_task_cols, module.prefix_task_rows
    assert (shared.shape, cols.shape, rows.shape) == ((4, 32), (3, 4, 2), (3, 2, 32))
    ids, task_ids = batch(), [2, 0, 2]
    with torch.no_grad():
        expected = []
        for row, t in enumerate(task_ids):
            prompt = torch.empty(4, 32)
            for i in range(4):
                for j in range(32):
                    prompt[i, j] = shared[i, j] * sum(cols[t, i, k] * rows[t, k, j] for k in range(2))
            embeds = torch.cat([prompt, model.get_input_embeddings()(ids[row])])[None]
            with peftlab.disabled(model):
                expected.append(model(inputs_embeds=embeds).logits[0, 4:])
    torch.testing.assert_close(run(model, ids, task_ids), torch.stack(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(model, ids, 0), run(model, ids, 1))  # tasks differ
    assert peftlab.summary(model)["trainable"] == 4 * 32 + 3 * (4 * 2 + 2 * 32)


def test_a_mixed_batch_equals_each_row_run_alone():
    model = trained(peftlab.attach(llama(), SPEC))
    ids, task_ids = batch(), torch.tensor([1, 0, 2])
    mixed = run(model, ids, task_ids)
    for row in range(3):
        torch.testing.assert_close(mixed[row], run(model, ids[row:row + 1], int(task_ids[row]))[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_shared_prompt_and_only_the_tasks_in_the_batch():
    model = trained(peftlab.attach(llama(), SPEC))
    with peftlab.task_ids(model, [0, 2, 0]):
        model(input_ids=batch()).logits.square().mean().backward()
    module = the_module(model)
    assert module.prompt_embeddings.grad.abs().sum() > 0
    for grad in (module.prefix_task_cols.grad, module.prefix_task_rows.grad):
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert all(p.grad is None for n, p in model.named_parameters() if "peftlab" not in n)


def test_generate_keeps_each_rows_task():
    model = trained(peftlab.attach(llama(), SPEC))
    ids = batch()
    with torch.no_grad(), peftlab.task_ids(model, [1, 2, 0]):
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
        greedy = ids
        for _ in range(3):
            greedy = torch.cat([greedy, model(input_ids=greedy).logits[:, -1].argmax(-1, keepdim=True)], 1)
    torch.testing.assert_close(generated, greedy, rtol=0, atol=0)


# ---- task ids -------------------------------------------------------------------------------------

def test_one_task_needs_no_ids_and_many_tasks_do():
    single = trained(peftlab.attach(llama(), "multitask_prompt[length=4]"))
    torch.testing.assert_close(run(single, batch()), run(single, batch(), 0), rtol=0, atol=0)
    model = peftlab.attach(llama(), SPEC)
    with pytest.raises(peftlab.StateError, match="give each batch row its task"):
        run(model, batch())
    with pytest.raises(peftlab.StateError, match="2 task ids but the batch has 3 rows"):
        run(model, batch(), [0, 1])
    with pytest.raises(peftlab.ConfigError, match=r"task ids must be in 0\.\.2"):
        run(model, batch(), [0, 1, 3])
    with pytest.raises(peftlab.ConfigError, match="integer task ids"):
        run(model, batch(), [0.5, 1, 2])
    with pytest.raises(peftlab.StateError, match="no peftlab adapters"):
        with peftlab.task_ids(llama(), [0]):
            pass
    with peftlab.task_ids(model, 1):
        with peftlab.task_ids(model, [0, 1, 2]):
            pass
        assert int(get_state(model).task_ids) == 1  # the outer block's ids are back
    assert get_state(model).task_ids is None


def test_routing_refuses_it_clearly():
    model = peftlab.attach(llama(), SPEC)
    with pytest.raises(peftlab.StateError, match="cannot differ row by row"):
        with peftlab.routing(model, ["default", None, "default"]):
            run(model, batch(), [0, 1, 2])


# ---- initialisation ---------------------------------------------------------------------------------

def test_factors_start_small_as_in_peft():
    module = the_module(peftlab.attach(llama(), "multitask_prompt[length=16,tasks=4,r=4]"))
    for factor in (module.prefix_task_cols, module.prefix_task_rows):
        assert 0.015 < float(factor.detach().std()) < 0.025


def source_file(folder, tasks_=3):
    source = trained(peftlab.attach(llama(), f"multitask_prompt[length=4,tasks={tasks_},r=2]"), seed=5)
    peftlab.save(source, folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_source_inits(tmp_path):
    saved = source_file(tmp_path)
    average = the_module(peftlab.attach(llama(), f"multitask_prompt[length=4,tasks=2,r=2,init=average_source_tasks,"
                                                 f"source='{tmp_path}']"))
    torch.testing.assert_close(average.prompt_embeddings.data, saved["prompt_embeddings"])
    for t in range(2):
        torch.testing.assert_close(average.prefix_task_cols[t].data, saved["prefix_task_cols"].mean(0))
        torch.testing.assert_close(average.prefix_task_rows[t].data, saved["prefix_task_rows"].mean(0))
    file = tmp_path / "adapter_model.safetensors"
    exact = the_module(peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init=exact_source_task,source_task=2,"
                                               f"source='{file}']"))
    torch.testing.assert_close(exact.prefix_task_cols[0].data, saved["prefix_task_cols"][2])
    torch.testing.assert_close(exact.prefix_task_rows[0].data, saved["prefix_task_rows"][2])
    shared = the_module(peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init=only_source_shared,source='{file}']"))
    torch.testing.assert_close(shared.prompt_embeddings.data, saved["prompt_embeddings"])
    assert not torch.allclose(shared.prefix_task_cols[0], saved["prefix_task_cols"][0])


def test_source_inits_match_peft(tmp_path):
    """PEFT's AVERAGE_SOURCE_TASKS / EXACT_SOURCE_TASK from the same source file give the same prompt."""
    saved = source_file(tmp_path)
    file = str(tmp_path / "adapter_model.safetensors")
    for init, spec in (("AVERAGE_SOURCE_TASKS", "average_source_tasks"), ("EXACT_SOURCE_TASK", "exact_source_task")):
        config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_ranks=2, num_tasks=1,
                                                  prompt_tuning_init=init, prompt_tuning_init_task=1,
                                                  prompt_tuning_init_state_dict_path=file)
        theirs = peft.get_peft_model(llama(), config).eval()
        ours = peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init={spec},source_task=1,source='{file}']")
        torch.testing.assert_close(_peft_logits(theirs, batch(), [0, 0, 0]), run(ours, batch()), rtol=1e-5, atol=1e-5)
    assert saved["prefix_task_cols"].shape[0] == 3


def test_bad_sources_fail_clearly(tmp_path):
    saved = source_file(tmp_path)
    with pytest.raises(peftlab.ConfigError, match="needs .*source=|give source="):
        peftlab.attach(llama(), "multitask_prompt[init=only_source_shared]")
    with pytest.raises(peftlab.ConfigError, match="no pickled"):
        peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init=only_source_shared,source='{tmp_path / 'x.bin'}']")
    with pytest.raises(peftlab.IncompatibleBaseError, match="set length and r as in the source"):
        peftlab.attach(llama(), f"multitask_prompt[length=5,r=2,init=only_source_shared,source='{tmp_path}']")
    with pytest.raises(peftlab.ConfigError, match="the source has 3 tasks"):
        peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init=exact_source_task,source_task=3,source='{tmp_path}']")
    save_file({"prompt_embeddings": saved["prompt_embeddings"]}, str(tmp_path / "shared.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="missing"):
        peftlab.attach(llama(), f"multitask_prompt[length=4,r=2,init=only_source_shared,"
                                f"source='{tmp_path / 'shared.safetensors'}']")
    with pytest.raises(peftlab.ConfigError, match="source only applies"):
        peftlab.attach(llama(), f"multitask_prompt[source='{tmp_path}']")


# ---- HF PEFT, both ways ---------------------------------------------------------------------------

def _peft_logits(model, ids, task_ids, virtual=4):
    with torch.no_grad():
        return model(input_ids=ids, task_ids=torch.tensor(task_ids)).logits[:, virtual:]


def test_peftlab_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    ours = trained(peftlab.attach(llama(), SPEC))
    peftlab.save(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(llama(), tmp_path).eval()
    ids = batch()
    torch.testing.assert_close(_peft_logits(theirs, ids, [2, 1, 0]), run(ours, ids, [2, 1, 0]), rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_in_peftlab_with_the_same_outputs(tmp_path):
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    theirs = trained(peft.get_peft_model(llama(), config)).eval()
    ids = batch()
    expected = _peft_logits(theirs, ids, [0, 2, 1])
    theirs.save_pretrained(tmp_path)
    ours = peftlab.load(llama(), tmp_path)
    torch.testing.assert_close(run(ours, ids, [0, 2, 1]), expected, rtol=1e-5, atol=1e-5)
    assert peftlab.core.state.get_state(ours).configs["default"][0].method == "multitask_prompt"
    peftlab.save(ours, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(llama(), tmp_path / "again").eval()
    torch.testing.assert_close(_peft_logits(again, ids, [0, 2, 1]), expected, rtol=1e-5, atol=1e-5)


def test_the_files_are_pefts_own(tmp_path):
    config = peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=3, num_ranks=2,
                                              prompt_tuning_init="RANDOM")
    peft.get_peft_model(llama(), config).save_pretrained(tmp_path / "peft")
    peftlab.save(peftlab.attach(llama(), SPEC), tmp_path / "ours")
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "ours")]
    shapes = [{k: v.shape for k, v in load_file(str(tmp_path / d / "adapter_model.safetensors")).items()}
              for d in ("peft", "ours")]
    assert shapes[0] == shapes[1]
    for c in configs:
        c.pop("peft_version")
    assert configs[0] == configs[1]


def test_a_source_initialized_adapter_keeps_its_init_in_the_file(tmp_path):
    source_file(tmp_path / "source")
    spec = f"multitask_prompt[length=4,r=2,init=exact_source_task,source_task=1,source='{tmp_path / 'source'}']"
    ours = trained(peftlab.attach(llama(), spec))
    peftlab.save(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (written["prompt_tuning_init"], written["prompt_tuning_init_task"]) == ("EXACT_SOURCE_TASK", 1)
    loaded = peftlab.load(llama(), tmp_path / "ours")  # the saved prompt replaces the init: no source read
    torch.testing.assert_close(run(loaded, batch()), run(ours, batch()), rtol=0, atol=0)
    loaded_config = peftlab.core.state.get_state(loaded).configs["default"][0]
    assert (loaded_config.init, loaded_config.source_task) == ("exact_source_task", 1)


def test_classifier_with_its_head_both_ways(tmp_path):
    ids = batch()
    ours = trained(peftlab.attach(bert(), SPEC.replace("]", ",modules_to_save=[classifier]]")))
    peftlab.save(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(bert(), tmp_path / "ours").eval()
    torch.testing.assert_close(_peft_logits(theirs, ids, [1, 2, 0], virtual=0), run(ours, ids, [1, 2, 0]),
                               rtol=1e-5, atol=1e-5)
    config = peft.MultitaskPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4, num_tasks=3, num_ranks=2)
    theirs = trained(peft.get_peft_model(bert(), config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftlab.load(bert(), tmp_path / "peft")
    assert peftlab.core.state.get_state(loaded).configs["default"][0].modules_to_save == ["classifier"]
    torch.testing.assert_close(run(loaded, ids, [0, 0, 2]), _peft_logits(theirs, ids, [0, 0, 2], virtual=0),
                               rtol=1e-5, atol=1e-5)


def test_bad_files_fail_clearly(tmp_path):
    peftlab.save(peftlab.attach(llama(), SPEC), tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    del tensors["prefix_task_rows"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(peftlab.AdapterFormatError, match="missing"):
        peftlab.load(llama(), tmp_path)
    peftlab.save(peftlab.attach(llama(), SPEC), tmp_path)
    with pytest.raises(peftlab.IncompatibleBaseError):
        peftlab.load(make_llama(hidden_size=64, **SCALE), tmp_path, check_base=False)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["num_ranks"] = 0
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(peftlab.AdapterFormatError, match="r must be a positive integer"):
        peftlab.load(llama(), tmp_path)
