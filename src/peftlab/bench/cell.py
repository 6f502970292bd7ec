"""One benchmark cell: train one method on one task with one seed, and measure it.

Run in a process of its own (``python -m peftlab.bench.cell`` reads the cell as JSON on stdin and
prints the result as one JSON line), so its peak memory is its own. The result holds the task
metric, trainable parameters (count and percentage), adapter file size, peak resident memory,
training time and tokens/s, the loss curve, whether training diverged, and the inference latency
of the base model, the adapted model and (where the method merges) the merged model.
"""
from __future__ import annotations

import json
import math
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

from ..errors import TrainingError
from .grid import FULL, HF, learning_rate
from .tasks import Task, classification_metric, final_number, majority_share

LATENCY_ROWS = 32
LATENCY_REPEATS = 3


def run_cell(cell: dict) -> dict:
    import peftlab
    from ..core.adapters import build_configs, train_new_head
    from ..models import load_model
    from ..train import TrainConfig, train

    task, method, seed = Task(**cell["task"]), cell["method"], cell["seed"]
    classify = task.kind == "classification"
    started = time.perf_counter()
    train_rows, eval_rows = task.rows(seed)
    label2id = None
    if classify:
        from ..train.data import infer_label2id
        label2id = infer_label2id(row[task.label_key] for row in train_rows + eval_rows)
    torch.manual_seed(seed)
    model, tokenizer = load_model(task.model, task="sequence-classification" if classify else "causal-lm",
                                  num_labels=len(label2id or {0: 0, 1: 1}), device="cpu")
    data, held_out = datasets(task, tokenizer, train_rows, eval_rows, label2id)
    total = sum(p.numel() for p in model.parameters())

    torch.manual_seed(seed)  # the adapter's random init
    spec = task_spec(method.removeprefix(HF), (example["input_ids"] for example in data.examples))
    if method == FULL:
        for p in model.parameters():
            p.requires_grad_(True)
    elif method.startswith(HF):
        model = hf_twin(model, method.removeprefix(HF), task, spec)
    else:
        peftlab.attach(model, train_new_head(build_configs(spec or method), model) if classify else spec or method)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    steps = task.total_steps
    config = TrainConfig(lr=learning_rate(method, task), steps=steps, batch_size=task.batch_size,
                         warmup_steps=max(1, steps // 10), schedule="linear", seed=seed, progress=False, device="cpu",
                         group_by_length=task.group_by_length)
    result = {"key": cell["key"], "task": task.name, "method": method, "seed": seed, "lr": config.lr, "steps": steps,
              "trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / total}
    try:
        run = train(model, data, config, on_step=twin_step(model, method))
        result.update(diverged=False, losses=[round(x, 5) for x in run.losses], train_seconds=round(run.train_seconds, 2),
                      tokens_per_second=round(run.tokens_per_second, 1))
    except TrainingError as error:  # a NaN or infinite loss: the run diverged
        result.update(diverged=True, error=str(error), metric=None)
        result["peak_rss_mb"] = peak_rss_mb()
        return result
    if classify:  # the majority-class baseline the report compares against
        result["majority"] = majority_share([row[task.label_key] for row in eval_rows])
    result["metric_name"] = task.metric
    result["metric"] = evaluate(model, tokenizer, task, held_out, eval_rows)
    result["adapter_bytes"] = adapter_bytes(model, method)  # before latency, which may leave a twin merged
    result["latency"] = latency(model, method, held_out, task)
    result["peak_rss_mb"] = peak_rss_mb()
    result["cell_seconds"] = round(time.perf_counter() - started, 2)
    return result


FREQUENT_TOKENS = 32


def task_spec(method: str, token_rows) -> str | None:
    """The spec of a method whose settings come from the task's training tokens (``token_rows``, one
    list of ids a row), else None (its defaults): trainable tokens trains the rows of the task's
    ``FREQUENT_TOKENS`` most frequent token ids, as a run that adapts a vocabulary to a domain would."""
    if method != "trainable_tokens":
        return None
    counts = Counter(t for ids in token_rows for t in ids)
    ids = sorted(t for t, _ in counts.most_common(FREQUENT_TOKENS))
    return f"trainable_tokens[token_indices=[{','.join(map(str, ids))}]]"


def datasets(task: Task, tokenizer, train_rows, eval_rows, label2id):
    from ..train import CausalLMData, ClassificationData

    if task.kind == "classification":
        def build(rows):
            return ClassificationData(tokenizer, rows, text_key=task.text_key, label_key=task.label_key,
                                      max_length=task.max_length, label2id=label2id)
    else:
        def build(rows):
            return CausalLMData(tokenizer, rows, prompt_key=task.prompt_key, response_key=task.response_key,
                                system=task.system, max_length=task.max_length)
    return build(train_rows), build(eval_rows)


# ---- HF PEFT twins ---------------------------------------------------------------------------

def hf_twin(model, method: str, task: Task, spec: str | None = None):
    """HF PEFT's version of ``method`` with peftlab's default settings (or those of ``spec``, a spec
    string of that method) and the same target modules."""
    import peft

    from ..core.adapters import build_configs
    from ..core.targets import find_targets
    from ..methods import get_method

    config = build_configs(spec or method)[0]
    kind = get_method(method)
    task_type = "SEQ_CLS" if task.kind == "classification" else "CAUSAL_LM"
    choose = getattr(kind, "find_targets", None)  # a method's own target rule, as attach uses it
    modules = choose(model, config) if choose else find_targets(model, config, kind.can_wrap) if hasattr(kind, "can_wrap") \
        else None
    if method in ("lora", "dora"):
        twin = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=modules,
                               use_dora=method == "dora", use_rslora=config.rslora, task_type=task_type)
    elif method == "ia3":
        feedforward = [m for m in modules if config.is_feedforward(m, model.get_submodule(m))]
        twin = peft.IA3Config(target_modules=modules, feedforward_modules=feedforward, task_type=task_type)
    elif method == "adalora":
        twin = peft.AdaLoraConfig(init_r=config.r, target_r=config.target_r, lora_alpha=config.alpha,
                                  lora_dropout=config.dropout, tinit=config.init_warmup, tfinal=config.final_warmup,
                                  deltaT=config.delta_t, beta1=config.beta1, beta2=config.beta2,
                                  orth_reg_weight=config.orth_reg_weight, total_step=task.total_steps,
                                  target_modules=modules, task_type=task_type)
    elif method in ("loha", "lokr"):
        shared = dict(r=config.r, alpha=config.alpha, rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                      rank_pattern=config.rank_pattern, alpha_pattern=config.alpha_pattern, target_modules=modules,
                      task_type=task_type)
        twin = peft.LoHaConfig(**shared) if method == "loha" else peft.LoKrConfig(
            **shared, decompose_both=config.decompose_both, decompose_factor=config.decompose_factor,
            rank_dropout_scale=config.rank_dropout_scale, init_weights="lycoris" if config.init == "lycoris" else True)
    elif method == "vera":
        twin = peft.VeraConfig(r=config.r, d_initial=config.d_initial, vera_dropout=config.dropout,
                               projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                               target_modules=modules, task_type=task_type)
    elif method == "fourierft":  # peftlab caps a layer's count at its out * in, which PEFT takes as a per-module pattern
        counts = {m: config.n_for(m, *model.get_submodule(m).weight.shape) for m in modules}
        twin = peft.FourierFTConfig(n_frequency=config.n_frequency, scaling=config.scaling,
                                    random_loc_seed=config.random_loc_seed, init_weights=config.init == "zeros",
                                    n_frequency_pattern={m: n for m, n in counts.items() if n != config.n_frequency},
                                    target_modules=modules, task_type=task_type)
    elif method == "oft":  # unset r and block_size: PEFT's default 32 with its own nearest-divisor fallback
        twin = peft.OFTConfig(r=config.r, oft_block_size=0 if config.r else (config.block_size or 32),
                              module_dropout=config.module_dropout, coft=config.coft, eps=config.eps,
                              block_share=config.block_share, use_cayley_neumann=config.use_cayley_neumann,
                              num_cayley_neumann_terms=config.num_cayley_neumann_terms, target_modules=modules,
                              task_type=task_type)
    elif method == "boft":  # PEFT builds one butterfly factor on CPU whatever it is told (no CUDA extension)
        twin = peft.BOFTConfig(boft_block_size=0 if config.block_num else (config.block_size or 4),
                               boft_block_num=config.block_num, boft_n_butterfly_factor=config.n_butterfly_factor,
                               boft_dropout=config.dropout, target_modules=modules, task_type=task_type)
    elif method == "road":  # peftlab's automatic group size, which must be one for all layers in PEFT
        sizes = {config.group_size_for(model.get_submodule(m).out_features, m) for m in modules}
        if len(sizes) != 1:
            raise ValueError(f"road: the layers' automatic group sizes differ ({sorted(sizes)}); PEFT takes one")
        twin = peft.RoadConfig(variant=config.variant, group_size=sizes.pop(), init_weights=config.init == "identity",
                               target_modules=modules, task_type=task_type)
    elif method == "delora":
        twin = peft.DeloraConfig(r=config.r, delora_lambda=config.lambda_init, module_dropout=config.dropout,
                                 rank_pattern=config.rank_pattern, lambda_pattern=config.lambda_pattern,
                                 init_weights=config.init == "default", target_modules=modules, task_type=task_type)
    elif method == "gralora":
        twin = peft.GraloraConfig(r=config.r, alpha=config.alpha, gralora_k=config.gralora_k, hybrid_r=config.hybrid_r,
                                  gralora_dropout=config.dropout, target_modules=modules, task_type=task_type)
    elif method == "waveft":  # as FourierFT: a layer's capped count goes to PEFT as a per-module pattern
        counts = {m: config.n_for(m, *model.get_submodule(m).weight.shape) for m in modules}
        twin = peft.WaveFTConfig(n_frequency=config.n_frequency, scaling=config.scaling,
                                 wavelet_family=config.wavelet_family, use_idwt=config.use_idwt,
                                 random_loc_seed=config.random_loc_seed, init_weights=config.init == "zeros",
                                 n_frequency_pattern={m: n for m, n in counts.items() if n != config.n_frequency},
                                 target_modules=modules, task_type=task_type)
    elif method == "shira":
        twin = peft.ShiraConfig(r=config.r, random_seed=config.random_seed, init_weights=config.init == "zeros",
                                target_modules=modules, task_type=task_type)
    elif method == "c3a":  # peftlab rounds each layer's block size down to a common divisor: PEFT takes it as a pattern
        sizes = {m: config.block_for(m, *model.get_submodule(m).weight.shape) for m in modules}
        common = max(set(sizes.values()), key=list(sizes.values()).count)
        twin = peft.C3AConfig(block_size=common, block_size_pattern={m: b for m, b in sizes.items() if b != common},
                              init_weights=True if config.init == "zeros" else config.init,
                              target_modules=modules, task_type=task_type)
    elif method == "hra":
        twin = peft.HRAConfig(r=config.r, apply_GS=config.gram_schmidt, init_weights=config.init == "symmetric",
                              target_modules=modules, task_type=task_type)
    elif method == "miss":  # PEFT refuses r above a layer's width (peftlab narrows that layer): at most the narrowest
        narrowest = min(model.get_submodule(m).in_features for m in modules)
        twin = peft.MissConfig(r=min(config.r, narrowest), miss_dropout=config.dropout, mini_r=config.mini_r,
                               init_weights={"balance": True, "random": False}.get(config.init, config.init),
                               target_modules=modules, task_type=task_type)
    elif method == "vblora":  # peftlab's unset vector_length: the length it would choose from these modules' widths
        from ..methods.vblora import auto_vector_length
        widths = [w for m in modules for w in model.get_submodule(m).weight.shape]
        twin = peft.VBLoRAConfig(r=config.r, num_vectors=config.num_vectors, topk=config.topk,
                                 vector_length=config.vector_length or auto_vector_length(widths),
                                 vblora_dropout=config.dropout, init_vector_bank_bound=config.init_vector_bank_bound,
                                 init_logits_std=config.init_logits_std, target_modules=modules, task_type=task_type)
    elif method == "randlora":
        twin = peft.RandLoraConfig(r=config.r, randlora_alpha=config.alpha, randlora_dropout=config.dropout,
                                   projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                                   sparse=config.sparse, very_sparse=config.very_sparse,
                                   init_weights=config.init == "default", target_modules=modules, task_type=task_type)
    elif method == "poly":  # PEFT's layers want task_ids in every call (at n_tasks=1 every row is task 0) and 3-D
        modules = [m for m in modules if not m.endswith("pooler.dense")]  # inputs (bmm): BERT's pooler gets 2-D ones
        twin = peft.get_peft_model(model, peft.PolyConfig(r=config.r, n_tasks=config.n_tasks, n_skills=config.n_skills,
                                                          n_splits=config.n_splits, init_weights=config.init == "zeros",
                                                          target_modules=modules, task_type=task_type))

        def first_task(layer, args, kwargs):
            if kwargs.get("task_ids") is None:
                kwargs["task_ids"] = torch.zeros(args[0].shape[0], dtype=torch.long, device=args[0].device)
            return args, kwargs

        for layer in twin.modules():
            if isinstance(layer, peft.tuners.poly.layer.Linear):
                layer.register_forward_pre_hook(first_task, with_kwargs=True)
        return twin
    elif method == "trainable_tokens":  # PEFT wraps a head tied to the table by itself
        table = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        twin = peft.TrainableTokensConfig(token_indices=list(config.token_indices), target_modules=[table],
                                          init_weights=config.init == "copy", task_type=task_type)
    elif method == "multitask_prompt":  # peft needs task_ids in every call; the bench's one task is task 0
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}.get(config.init, "RANDOM")
        twin = peft.MultitaskPromptTuningConfig(num_virtual_tokens=config.length, num_tasks=config.tasks,
                                                num_ranks=config.r, prompt_tuning_init=init, task_type=task_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = peft.get_peft_model(model, twin)
        first = lambda kw: kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]  # noqa: E731
        task_zero = lambda kw: {"task_ids": first(kw).new_zeros(len(first(kw)), dtype=torch.long), **kw}  # noqa: E731
        twin.register_forward_pre_hook(lambda m, args, kw: (args, task_zero(kw)), with_kwargs=True)
        generate = twin.generate
        twin.generate = lambda **kw: generate(**task_zero(kw))
        return twin
    elif method == "cpt":  # causal LMs only; peft pools the context's and the input's labels in one mean
        twin = peft.CPTConfig(cpt_token_ids=config.token_ids, cpt_mask=config.mask, cpt_tokens_type_mask=config.types,
                              opt_projection_epsilon=config.epsilon, opt_projection_format_epsilon=config.format_epsilon,
                              opt_weighted_loss_type=config.weighted_loss, opt_loss_decay_factor=config.loss_decay,
                              task_type=task_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            twin = peft.get_peft_model(model, twin)
        # peft counts a labelled token only where the collator's input_type_mask, shifted by the context's largest
        # type, is a label type (a multiple of 4); the bench has no such collator, so every input token gets that type
        label_type = 4 - max(config.types) % 4
        twin.register_forward_pre_hook(lambda m, args, kw: (args, {"input_type_mask": torch.full_like(
            kw["input_ids"], label_type), **kw}) if kw.get("labels") is not None else None, with_kwargs=True)
        return twin
    elif method == "deft":
        twin = peft.DeftConfig(r=config.r, decomposition_method=config.decomposition, alpha=config.alpha, para=config.para,
                               deft_dropout=config.dropout, init_weights=config.init == "identity",
                               init_scale=config.init_scale, target_modules=modules, task_type=task_type)
    elif method == "beft":
        twin = peft.BeftConfig(target_modules=modules, init_weights=config.init == "zeros", task_type=task_type)
    elif method == "osf":
        twin = peft.OSFConfig(effective_rank=config.effective_rank, rank_pattern=config.rank_pattern or None,
                              init_weights=config.init == "svd", target_modules=modules, task_type=task_type)
    elif method == "pvera":
        twin = peft.PveraConfig(r=config.r, d_initial=config.d_initial, pvera_dropout=config.dropout,
                                projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                                sample_at_inference=config.sample_at_inference, generator_seed=config.generator_seed,
                                target_modules=modules, task_type=task_type)
    elif method == "unilora":
        twin = peft.UniLoraConfig(r=config.r, theta_d_length=config.theta_d_length, proj_seed=config.proj_seed,
                                  unilora_dropout=config.dropout, init_theta_d_bound=config.init_theta_d_bound,
                                  save_indices=config.save_indices, target_modules=modules, task_type=task_type)
    elif method == "glora":
        twin = peft.GloraConfig(r=config.r, config_A_B=config.ab, config_C=config.c, config_D_E=config.de,
                                init_weights=config.init == "zeros", target_modules=modules, task_type=task_type)
    elif method == "lily":  # target_modules in the form from which PEFT derives peftlab's sharing groups
        from ..formats.hf_lily import peft_targets
        targets, exclude = peft_targets(modules, dict(model.named_modules()), config.share_by)
        twin = peft.LilyConfig(r=config.r, stride_A=config.stride_A, num_B=config.num_B, scaling=config.scaling,
                               init_weights=config.init == "zeros", target_modules=targets, exclude_modules=exclude,
                               task_type=task_type)
    elif method == "peanut":
        twin = peft.PeanutConfig(r=config.r, depth=config.depth, act_fn=config.act_fn, scaling=config.scaling,
                                 init_weights=config.init == "zeros", target_modules=modules, task_type=task_type)
    elif method == "tinylora":
        twin = peft.TinyLoraConfig(r=config.r, u=config.u, weight_tying=config.weight_tying,
                                   projection_seed=config.projection_seed, save_projection=config.save_projection,
                                   init_v_bound=config.init_v_bound, tinylora_dropout=config.dropout,
                                   init_weights=True if config.init == "zeros" else "uniform",
                                   target_modules=modules, task_type=task_type)
    elif method == "supertuning":
        twin = peft.SupertuningConfig(sparsity=config.sparsity, select_top=config.select_top, r=config.r,
                                      lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                                      init_weights=config.init == "zeros", save_precomputed_indices=config.save_indices,
                                      target_modules=modules, task_type=task_type)
    elif method == "adamss":
        twin = peft.AdamssConfig(r=config.r, num_subspaces=config.num_subspaces, subspace_rank=config.subspace_rank,
                                 random_seed=config.random_seed, use_dynamic_rank=config.use_dynamic_rank,
                                 svd_threshold=config.svd_threshold,
                                 init_weights="orthogonal" if config.init == "orthogonal" else None,
                                 **{k: getattr(config, k) for k in ("use_asa", "asa_target_subspaces", "init_warmup",
                                                                     "final_warmup", "mask_interval", "asa_importance_beta",
                                                                     "asa_uncertainty_beta", "asa_schedule_exponent")},
                                 target_modules=modules, task_type=task_type)
    elif method == "hira":
        twin = peft.HiraConfig(r=config.r, hira_dropout=config.dropout, rank_pattern=config.rank_pattern,
                               init_weights={"default": True, "random": False}.get(config.init, config.init),
                               target_modules=modules, task_type=task_type)
    elif method == "cartridge":  # peft initialises it at random (peftlab's default); text init is a later step there
        twin = peft.CartridgeConfig(num_virtual_tokens=config.length, num_frozen_tokens=config.frozen, task_type=task_type)
    elif method == "frod":
        twin = peft.FrodConfig(sparse_rate=config.sparse_rate, regularization_alpha=config.regularization_alpha,
                               projection_prng_key=config.projection_prng_key, save_projection=config.save_projection,
                               frod_dropout=config.dropout, progressbar=False, target_modules=modules, task_type=task_type)
    elif method == "psoft":
        twin = peft.PsoftConfig(r=config.r, psoft_alpha=config.alpha, psoft_dropout=config.dropout,
                                ab_svd_init=f"{config.init}_init", psoft_svd=config.svd,
                                psoft_svd_lowrank_niter=config.svd_niter, random_seed=config.random_seed,
                                psoft_orth=config.orth, psoft_mag_a=config.mag_a, psoft_mag_b=config.mag_b,
                                use_cayley_neumann=config.use_cayley_neumann,
                                num_cayley_neumann_terms=config.num_cayley_neumann_terms,
                                cayley_neumann_eps=config.cayley_neumann_eps, target_modules=modules, task_type=task_type)
    elif method == "ln_tuning":
        twin = peft.LNTuningConfig(target_modules=modules, task_type=task_type)
    elif method == "prompt":
        init = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}.get(config.init, "SAMPLE_VOCAB")  # peftlab's default: vocab
        twin = peft.PromptTuningConfig(num_virtual_tokens=config.length, prompt_tuning_init=init, task_type=task_type)
    elif method == "prefix":
        twin = peft.PrefixTuningConfig(num_virtual_tokens=config.length, prefix_projection=config.reparam,
                                       encoder_hidden_size=config.hidden, task_type=task_type)
    elif method == "ptuning":
        twin = peft.PromptEncoderConfig(num_virtual_tokens=config.length, encoder_hidden_size=config.hidden or
                                        model.config.hidden_size, encoder_num_layers=config.encoder_layers,
                                        task_type=task_type)
    else:
        raise ValueError(f"no HF PEFT twin for {method}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(model, twin)
    if method == "trainable_tokens" and task.kind == "classification":
        # peft's TRAINABLE_TOKENS takes no modules_to_save, so the new head would stay at its random init; it
        # trains in place, as peftlab's does
        for name, parameter in model.named_parameters():
            if re.search(r"\.(classifier|score)\.", name):
                parameter.requires_grad_(True)
    return model


def twin_step(model, method: str):
    """HF PEFT's AdaLoRA reallocates its budget when its trainer calls ``update_and_allocate``."""
    if method != HF + "adalora":
        return None
    return lambda step: model.base_model.update_and_allocate(step)


# ---- measurements ----------------------------------------------------------------------------

def evaluate(model, tokenizer, task: Task, held_out, eval_rows) -> float:
    model.eval()
    with torch.inference_mode():
        if task.kind == "classification":
            predictions, labels = [], []
            order = sorted(range(len(held_out)), key=lambda i: len(held_out[i]["input_ids"]))  # less padding
            for first in range(0, len(order), 64):
                batch = held_out.collate([held_out[i] for i in order[first:first + 64]])
                labels += batch.pop("labels").tolist()
                predictions += model(**batch).logits.argmax(-1).tolist()
            return classification_metric(task.metric, predictions, labels)
        if task.metric == "perplexity":
            losses, counts = 0.0, 0
            for first in range(0, len(held_out), 8):
                batch = held_out.collate([held_out[i] for i in range(first, min(first + 8, len(held_out)))])
                tokens = int((batch["labels"][:, 1:] != -100).sum())
                losses += float(model(**batch).loss) * tokens
                counts += tokens
            return math.exp(losses / max(counts, 1))
    from ..tasks.generation import evaluate as generation_eval, generate

    if task.metric == "exact_match":
        return generation_eval(model, tokenizer, eval_rows, system=task.system, prompt_key=task.prompt_key,
                               response_key=task.response_key, max_new_tokens=task.max_new_tokens)["exact_match"]
    outputs = generate(model, tokenizer, [r[task.prompt_key] for r in eval_rows], system=task.system,
                       max_new_tokens=task.max_new_tokens or 256)
    hits = [final_number(o) is not None and final_number(o) == final_number(str(r[task.response_key]))
            for o, r in zip(outputs, eval_rows)]
    return sum(hits) / len(hits)


def latency(model, method: str, held_out, task: Task) -> dict:
    """Median seconds of a forward pass over the first evaluation rows: the base model, the
    adapted one, and the merged one where the method merges."""
    import peftlab

    batch = held_out.collate([held_out[i] for i in range(min(LATENCY_ROWS, len(held_out)))])
    batch.pop("labels", None)

    def timed(forward=model) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(LATENCY_REPEATS + 1):
                start = time.perf_counter()
                forward(**batch)
                times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    model.eval()
    adapted = timed()
    if method == FULL:
        return {"base": adapted, "adapted": adapted, "merged": adapted}
    if method.startswith(HF):
        base = timed(model.get_base_model())  # peft's disable_adapter() fails on classifiers with prompts
        merged = None
        if hasattr(model.base_model, "merge_adapter") and not model.peft_config["default"].is_prompt_learning:
            try:
                model.base_model.merge_adapter()
            except NotImplementedError:  # peft's Poly, for one, cannot merge
                return {"base": base, "adapted": adapted, "merged": None}
            merged = timed()
            try:
                model.base_model.unmerge_adapter()
            except NotImplementedError:  # peft's OSF cannot unmerge; nothing uses the model after this
                pass
        return {"base": base, "adapted": adapted, "merged": merged}
    with peftlab.disabled(model):
        base = timed()
    merged = None
    try:
        peftlab.merge(model)
    except peftlab.StateError:
        pass  # the method does not merge
    else:
        merged = timed()
        peftlab.unmerge(model)
    return {"base": base, "adapted": adapted, "merged": merged}


def adapter_bytes(model, method: str) -> int:
    """Bytes on disk of what the method saves (the whole model for full fine-tuning)."""
    import peftlab

    if method == FULL:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method.startswith(HF):
            model.save_pretrained(folder)
        else:
            peftlab.save(model, folder)
        return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    cell = json.loads(sys.stdin.read())
    try:
        result = run_cell(cell)
    except Exception as error:  # reported as a failed cell, so the grid goes on
        result = {"key": cell["key"], "task": cell["task"]["name"], "method": cell["method"], "seed": cell["seed"],
                  "failed": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
