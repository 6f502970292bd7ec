"""The serving engine's defining properties: the stepped decoder equals the model's own forward,
the mixed-batch LoRA delta equals its per-segment reference, and a running batch that mixes many
adapters and base rows (joining and leaving at every step) answers each request exactly as that
adapter alone would, in peftlab and in HF PEFT."""
from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from peftlab.errors import AdapterFormatError, ConfigError, IncompatibleBaseError, StateError
from peftlab.formats.io import fingerprint
from peftlab.serve.engine import Engine, QueueFull, Request, sample
from peftlab.serve.lora_bank import LoraBank, StepRouting, lora_delta, segmented_lora_delta
from peftlab.serve.runner import DecoderRunner, PackedLinear, padded_rows
from serve_helpers import TARGETS, Collector, greedy_alone, greedy_peft, save_adapters, tiny_lm

import peftlab


def make_engine(model, tokenizer, adapters: dict, fingerprint_of=None, **options):
    bank_options = {k: options.pop(k) for k in ("max_loras", "max_cpu_loras", "max_rank", "merge_share") if k in options}
    bank = LoraBank(model, base_fingerprint=fingerprint(fingerprint_of or model), **{"max_loras": 16, **bank_options})
    for name, path in adapters.items():
        bank.register(name, path)
    runner = DecoderRunner(model, max_sequences=options.pop("max_batch", 32), capacity=8)
    return Engine(runner, bank, tokenizer, [tokenizer.eos_token_id], max_batch=runner.max_sequences, **options)


def prompts(count: int, seed: int = 0, vocab: int = 51) -> list:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(3, 12))] for _ in range(count)]


def run_all(engine, requests, join_every: int = 0):
    """Drive the engine by hand; with ``join_every``, one more request joins every that many steps."""
    waiting = list(requests)
    if not join_every:
        for r in waiting:
            engine.submit(r)
        waiting = []
    steps = 0
    while waiting or engine.busy():
        if waiting and steps % max(join_every, 1) == 0:
            engine.submit(waiting.pop(0))
        engine.step()
        steps += 1
        assert steps < 2000
    return steps


def test_packed_steps_equal_the_models_own_forward():
    model, _ = tiny_lm()
    reference = copy.deepcopy(model)  # the runner hands the model's linear layers to oneDNN
    runner = DecoderRunner(model, max_sequences=4, capacity=4)  # small: the cache must grow on the way
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    sequences = prompts(3, seed=1)

    def expected(ids):
        return reference(torch.tensor([ids])).logits[0, -1]

    logits = runner.step([], [], sequences[:1])  # one prompt alone
    torch.testing.assert_close(logits[0], expected(sequences[0]), rtol=1e-4, atol=1e-5)
    lengths = [len(sequences[0])]
    nxt = [int(torch.randint(8, 51, ()))]
    logits = runner.step(nxt, lengths, sequences[1:])  # a running row and two prompts of different lengths, packed
    sequences[0].append(nxt[0])
    assert logits.shape[0] == 3
    for slot, ids in enumerate(sequences):
        torch.testing.assert_close(logits[slot], expected(ids), rtol=1e-4, atol=1e-5)
    lengths = [len(s) for s in sequences]
    for _ in range(5):  # rows of different lengths decode together
        nxt = [int(torch.randint(8, 51, ())) for _ in sequences]
        logits = runner.step(nxt, lengths)
        for i, ids in enumerate(sequences):
            ids.append(nxt[i])
            torch.testing.assert_close(logits[i], expected(ids), rtol=1e-4, atol=1e-5)
        lengths = [n + 1 for n in lengths]
    runner.release(0, 2, lengths[2])  # slot 2's sequence moves into slot 0
    logits = runner.step([5, 6], [lengths[2], lengths[1]])
    torch.testing.assert_close(logits[0], expected(sequences[2] + [5]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[1], expected(sequences[1] + [6]), rtol=1e-4, atol=1e-5)


def test_packed_linear_equals_the_linear_layer_and_the_bank_wraps_it():
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 80)
    with torch.no_grad():
        layer.weight.normal_(generator=g)
    x = torch.randn(7, 3, 48, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(layer)(x), layer(x), rtol=1e-4, atol=1e-4)
    sizes = [padded_rows(n) for n in range(1, 4097)]
    assert all(0 <= size - n < max(8, n / 8) for n, size in enumerate(sizes, 1))  # at most 7 rows or 12.5% more
    assert len(set(sizes)) <= 60  # a few compiled kernels cover every batch: memory stays flat in a server
    model, _ = tiny_lm()
    DecoderRunner(model, max_sequences=2)  # packed first, banked after: the bank still finds every target
    bank = LoraBank(model)
    assert len(bank.shapes) == 7 * len(model.model.layers)


def test_a_packed_layer_gives_its_weight_back_exactly():
    """DoRA's norms and merged mode need W; oneDNN's reordered copy reads back bit for bit."""
    from peftlab.serve.lora_bank import dense_weight

    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    assert torch.equal(dense_weight(PackedLinear(linear)), linear.weight.detach())


def test_gather_lora_delta_equals_the_per_segment_reference():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 16, 4, generator=g), torch.randn(6, 4, 24, generator=g)
    A[0], B[0] = 0, 0
    x = torch.randn(9, 3, 16, generator=g)
    for slots in ([0, 3, 3, 1, 5, 0, 2, 2, 4], [2] * 9, [0] * 8 + [1], [5, 4, 3, 2, 1, 1, 2, 3, 4]):
        routing = StepRouting(slots)
        expected = segmented_lora_delta(x, A, B, routing)
        torch.testing.assert_close(lora_delta(x, A, B, routing), expected)
        for row, slot in enumerate(slots):  # and both are each row's own x @ A @ B
            torch.testing.assert_close(expected[row], x[row] @ A[slot] @ B[slot])


@pytest.mark.parametrize("join_every", [0, 3])
def test_mixed_batch_of_eight_adapters_and_base_rows_equals_each_alone(tmp_path, join_every):
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 8, r=4)
    paths["a7"] = save_adapters(base, tmp_path / "r8", 1, r=8)["a0"]  # mixed ranks: padded to the bank's rank
    engine = make_engine(model, tokenizer, paths)
    rng = random.Random(0)
    names = list(paths) + [None, None, None]
    requests = [Request(adapter=names[i % len(names)], prompt_ids=ids, max_tokens=rng.randint(4, 10),
                        on_event=Collector(), temperature=0) for i, ids in enumerate(prompts(22, seed=2))]
    run_all(engine, requests, join_every)
    eos = [tokenizer.eos_token_id]
    for r in requests:
        folder = paths[r.adapter] if r.adapter else None
        alone = greedy_alone(base, folder, r.prompt_ids, r.max_tokens, eos)
        assert r.output_ids == alone, (r.adapter, r.output_ids, alone)
        assert r.output_ids == greedy_peft(base, folder, r.prompt_ids, r.max_tokens, eos)
        assert r.on_event.done["completion_tokens"] == len(r.output_ids)
        assert r.on_event.text == tokenizer.decode(r.output_ids, skip_special_tokens=True)
    assert not engine.running and engine.bank.residency()["in_use"] == 0  # every slot and reference freed


MIXED_KINDS = {"dora": f"dora[r=4,alpha=8,targets={TARGETS}]", "dora-mlp": "dora[r=2,alpha=4,targets=[up_proj,down_proj]]",
               "ia3": "ia3", "ia3-attention": "ia3[targets=[q_proj,o_proj],feedforward=[]]"}


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_lora_dora_and_ia3_adapters_mixed_in_one_batch_equal_each_alone(tmp_path, quantized):
    """DoRA's gain m / ||W + sBA|| and (IA)^3's scales are per feature, so rows of different adapters
    still share the base's pass: each request answers as its adapter alone, in peftlab and HF PEFT;
    on a 4-bit base too (against the same quantized base alone)."""
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 3, r=4)
    for kind, spec in MIXED_KINDS.items():
        paths[kind] = save_adapters(base, tmp_path / kind, 1, spec=spec)["a0"]
    if quantized:
        peftlab.quantize(model, "nf4")
        peftlab.quantize(base, "nf4")
    engine = make_engine(model, tokenizer, paths, fingerprint_of=base)
    names = list(paths) + [None]
    rng = random.Random(1)
    requests = [Request(adapter=names[i % len(names)], prompt_ids=ids, max_tokens=rng.randint(4, 8),
                        on_event=Collector(), temperature=0) for i, ids in enumerate(prompts(16, seed=4))]
    run_all(engine, requests, join_every=2)
    eos = [tokenizer.eos_token_id]
    for r in requests:
        folder = paths[r.adapter] if r.adapter else None
        assert r.output_ids == greedy_alone(base, folder, r.prompt_ids, r.max_tokens, eos), r.adapter
        if not quantized:
            assert r.output_ids == greedy_peft(base, folder, r.prompt_ids, r.max_tokens, eos), r.adapter
    assert not engine.running and engine.bank.residency()["in_use"] == 0


def tiny_qwen2():
    """A tiny Qwen2: its q/k/v projections have biases, which DoRA's gain leaves alone."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    _, tokenizer = tiny_lm()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    return model, tokenizer


@pytest.mark.parametrize("make", [tiny_lm, tiny_qwen2], ids=["llama", "qwen2-biases"])
def test_the_banks_dora_gain_and_ia3_scales_equal_the_methods_own_layers(tmp_path, make):
    """One step, one adapter at a time: the served logits are the adapter's own model's."""
    model, tokenizer = make()
    base = copy.deepcopy(model)
    paths = {kind: save_adapters(base, tmp_path / kind, 1, spec=spec)["a0"] for kind, spec in MIXED_KINDS.items()}
    engine = make_engine(model, tokenizer, paths)
    bank, ids = engine.bank, prompts(1, seed=9)[0]
    for kind, folder in paths.items():
        slot = bank.acquire(kind)
        bank.set_rows([slot] * len(ids))
        served = engine.runner.step([], [], [ids])
        alone = copy.deepcopy(base)
        peftlab.load(alone, folder)
        with torch.inference_mode():
            expected = alone(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(served[0], expected, rtol=1e-4, atol=1e-4)
        bank.release(kind)


def test_merged_mode_follows_the_dominant_adapter_and_answers_as_unmerged(tmp_path, monkeypatch):
    """dLoRA's merged mode: while one adapter holds most of the batch it is merged into the base and
    the other rows (other adapters, base rows) take its delta back off; when the mix shifts it is
    unmerged (and another merged). Every answer equals its adapter alone, and the base comes back."""
    import peftlab.serve.lora_bank as lora_bank

    monkeypatch.setattr(lora_bank, "SWITCH_STEPS", 2)
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 3, r=4)
    paths["dora"] = save_adapters(base, tmp_path / "dora", 1, spec=MIXED_KINDS["dora"])["a0"]
    engine = make_engine(model, tokenizer, paths, merge_share=0.55)
    weights = {n: m.base_layer.weight.to_dense().clone() for n, m in engine.bank.layers.items()}
    waves = [["a0"] * 7 + ["a1", None], ["a2"] * 7 + ["a0", "dora"], ["dora"] * 6 + ["a1"]]
    requests = []
    for wave, names in enumerate(waves):  # the dominant adapter changes from wave to wave
        batch = [Request(adapter=name, prompt_ids=ids, max_tokens=6 + i % 4, on_event=Collector(), temperature=0)
                 for i, (name, ids) in enumerate(zip(names, prompts(len(names), seed=20 + wave)))]
        run_all(engine, batch)
        requests += batch
    eos = [tokenizer.eos_token_id]
    for r in requests:
        folder = paths[r.adapter] if r.adapter else None
        assert r.output_ids == greedy_alone(base, folder, r.prompt_ids, r.max_tokens, eos), r.adapter
    bank = engine.bank
    assert bank.stats["merges"] >= 2 and bank.stats["unmerges"] >= 1  # a0, then a2; never the DoRA adapter
    bank.unmerge()
    for name, W in weights.items():
        torch.testing.assert_close(bank.layers[name].base_layer.weight.to_dense(), W, rtol=0, atol=1e-6)


def test_a_merged_step_equals_the_unmerged_step(tmp_path):
    model, tokenizer = tiny_lm()
    paths = save_adapters(copy.deepcopy(model), tmp_path, 3, r=4)
    engine = make_engine(model, tokenizer, paths, merge_share=2.0)  # never by itself
    bank, batch = engine.bank, prompts(5, seed=3)
    slots = [bank.acquire(name) for name in ("a0", "a0", "a1", None, "a2")]
    rows = [s for s, ids in zip(slots, batch) for _ in ids]
    bank.set_rows(rows)
    unmerged = engine.runner.step([], [], batch)
    bank.merge(slots[0])
    bank.set_rows(rows)
    torch.testing.assert_close(engine.runner.step([], [], batch), unmerged, rtol=1e-5, atol=1e-5)
    bank.plan(rows)
    assert bank.merged == slots[0]  # the rows stay a0's: merge_share 2 never merges, but never unmerges a0 either


def test_a_cached_prefix_written_into_a_slot_gives_the_full_prefills_logits():
    model, _ = tiny_lm()
    runner = DecoderRunner(model, max_sequences=4, capacity=8)
    prompt = prompts(1, seed=5)[0] + prompts(1, seed=6)[0] + prompts(1, seed=7)[0]
    whole = runner.step([], [], [prompt])
    cached = runner.read(0, 0, 16)
    runner.write(2, 0, cached)
    runner.step([], [], [[9], [10], prompt[16:]], [0, 0, 16])  # two unrelated rows fill slots 0 and 1
    part = runner.step([], [], [[9], [10], prompt[16:]], [0, 0, 16])
    torch.testing.assert_close(part[2], whole[0], rtol=1e-5, atol=1e-5)


def test_prefix_caching_reuses_a_shared_prompt_start_per_adapter_and_answers_as_without(tmp_path):
    """Requests that share a long system prompt under one adapter prefill only what follows it;
    another adapter (or the base) never takes its keys and values; every answer equals the adapter
    alone; an adapter loaded again under the same name starts afresh."""
    from peftlab.serve.prefix_cache import PrefixCache

    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 2, r=4)
    engine = make_engine(model, tokenizer, paths, prefix_cache=PrefixCache(block_tokens=8, max_tokens=256))
    system = [t for ids in prompts(4, seed=11) for t in ids][:40]  # 40 tokens: 5 blocks of 8
    questions = prompts(6, seed=12)
    names = ["a0", "a0", "a0", "a1", None, "a1"]
    requests = []
    for name, question in zip(names, questions):  # one at a time, so each finds what the last stored
        request = Request(adapter=name, prompt_ids=system + question, max_tokens=5, on_event=Collector(), temperature=0)
        run_all(engine, [request])
        requests.append(request)
    assert [r.cached for r in requests] == [0, 40, 40, 0, 0, 40]  # per adapter: the first computes, the rest reuse
    eos = [tokenizer.eos_token_id]
    for r in requests:
        folder = paths[r.adapter] if r.adapter else None
        assert r.output_ids == greedy_alone(base, folder, r.prompt_ids, r.max_tokens, eos), r.adapter
    engine.bank.unregister("a1")
    engine.bank.register("a1", paths["a0"])  # another adapter under an old name: nothing of the old one's is reused
    again = Request(adapter="a1", prompt_ids=system + questions[0], max_tokens=5, on_event=Collector(), temperature=0)
    run_all(engine, [again])
    assert again.cached == 0 and again.output_ids == requests[0].output_ids  # a0's weights, computed afresh


def test_the_prefix_store_keeps_its_bound_least_recently_used_first():
    from peftlab.serve.prefix_cache import PrefixCache

    cache = PrefixCache(block_tokens=2, max_tokens=6)  # three blocks
    read = lambda start, stop: torch.full((1, 2, 1, stop - start, 1), float(start))  # noqa: E731
    cache.store("a", [1, 2, 3, 4], 0, read)
    cached, blocks = cache.lookup("a", [1, 2, 3, 4, 5])
    assert cached == 4 and [float(b.flatten()[0]) for b in blocks] == [0.0, 2.0]
    assert cache.lookup("b", [1, 2, 3, 4, 5])[0] == 0 and cache.lookup("a", [1, 2, 3, 4])[0] == 2  # the last token is computed
    cache.store("a", [7, 8, 9, 9], 0, read)  # four blocks for three places: the least recently used goes
    assert len(cache.blocks) == 3 and cache.stats["evicted_blocks"] == 1
    assert cache.lookup("a", [1, 2, 3, 4, 5])[0] == 2  # [1, 2][3, 4] was used least recently: evicted; [1, 2] serves
    with pytest.raises(ConfigError, match="prefix-cache-tokens"):
        PrefixCache(max_tokens=-1)


def test_requests_join_and_leave_at_every_step_without_recomputing_others(tmp_path):
    model, tokenizer = tiny_lm()
    paths = save_adapters(copy.deepcopy(model), tmp_path, 2)
    engine = make_engine(model, tokenizer, paths)
    steps = []  # (running tokens, prompt lengths) of each forward pass
    original = engine.runner.step
    engine.runner.step = lambda tokens, lengths, new=(), offsets=None: steps.append(
        (len(tokens), [len(p) for p in new])) or original(tokens, lengths, new, offsets)
    first = Request(adapter="a0", prompt_ids=[9, 10, 11], max_tokens=12, on_event=Collector(), temperature=0, ignore_eos=True)
    engine.submit(first)
    engine.step()
    engine.step()
    second = Request(adapter="a1", prompt_ids=[12, 13], max_tokens=3, on_event=Collector(), temperature=0, ignore_eos=True)
    engine.submit(second)
    engine.step()  # the newcomer's prompt shares the first request's decode step and yields its first token
    assert steps == [(0, [3]), (1, []), (1, [2])] and len(engine.running) == 2
    assert len(first.output_ids) == 3 and len(second.output_ids) == 1
    engine.step()
    engine.step()
    assert second.finish_reason == "length" and len(engine.running) == 1  # it left; the first runs on
    while engine.busy():
        engine.step()
    assert len(first.output_ids) == 12 and [p for _, p in steps if p] == [[3], [2]]  # nothing was prefilled again


def test_a_step_admits_prompts_up_to_its_token_budget(tmp_path):
    model, tokenizer = tiny_lm()
    engine = make_engine(model, tokenizer, save_adapters(copy.deepcopy(model), tmp_path, 1), max_step_tokens=5)
    admitted = []
    original = engine.runner.step
    engine.runner.step = lambda tokens, lengths, new=(), offsets=None: admitted.append([len(p) for p in new]) or original(
        tokens, lengths, new, offsets)
    for length in (7, 3, 2, 4):
        engine.submit(Request(adapter="a0", prompt_ids=list(range(9, 9 + length)), max_tokens=6, on_event=Collector(),
                              temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert admitted == [[7], [3, 2], [4]]  # a prompt longer than the budget still joins, alone


def test_a_step_whose_new_prompt_fails_turns_that_request_away_and_the_others_go_on(tmp_path):
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 1)
    engine = make_engine(model, tokenizer, paths)
    original = engine.runner.step

    def failing_on_new_prompts(tokens, lengths, new=(), offsets=None):
        if new and len(new[0]) == 5:
            raise RuntimeError("out of memory")
        return original(tokens, lengths, new, offsets)

    engine.runner.step = failing_on_new_prompts
    running = Request(adapter="a0", prompt_ids=[9, 10, 11], max_tokens=8, on_event=Collector(), temperature=0,
                      ignore_eos=True)
    engine.submit(running)
    engine.step()
    doomed = Request(adapter=None, prompt_ids=[12, 13, 14, 15, 16], max_tokens=8, on_event=Collector(), temperature=0)
    engine.submit(doomed)
    while engine.busy():
        engine.step()
    assert "out of memory" in doomed.on_event.error and doomed.output_ids == []
    assert running.output_ids == greedy_alone(base, paths["a0"], [9, 10, 11], 8, [])  # unharmed by the failed step
    assert engine.bank.residency()["in_use"] == 0


def test_bank_keeps_adapters_in_use_loads_the_rest_from_disk_and_refuses_what_it_cannot_serve(tmp_path):
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 4)
    engine = make_engine(model, tokenizer, paths, max_loras=2, max_cpu_loras=2)
    bank = engine.bank
    assert bank.acquire("a0") and bank.acquire("a1")
    assert bank.acquire("a2") is None  # both slots held by running requests: a2 waits
    bank.release("a0")
    slot = bank.acquire("a2")  # a0's slot, now free, is reused
    assert slot == 1 and bank.slot_of == {"a1": 2, "a2": 1}
    with pytest.raises(StateError, match="in use"):
        bank.unregister("a1")
    loads = bank.stats["disk_loads"]
    bank.release("a2")
    bank.release("a1")
    for name in ("a0", "a3", "a0"):  # the CPU cache holds 2: these come back from disk
        bank.acquire(name)
        bank.release(name)
    assert bank.stats["disk_loads"] > loads

    with pytest.raises(ConfigError, match="max-lora-rank"):
        bank.register("big", save_adapters(base, tmp_path / "big", 1, r=32)["a0"])
    with pytest.raises(AdapterFormatError, match="'LOHA' adapter.*peftlab merge"):
        bank.register("loha", save_adapters(base, tmp_path / "loha", 1, spec="loha[r=4]")["a0"])
    with pytest.raises(IncompatibleBaseError, match="another base"):
        bank.register("other", save_adapters(make_other_base(), tmp_path / "other", 1)["a0"])
    with pytest.raises(ConfigError, match="already loaded"):
        bank.register("a0", paths["a0"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(AdapterFormatError):
        bank.register("broken", tmp_path / "broken")
    assert sorted(bank.names()) == ["a0", "a1", "a2", "a3"]  # nothing half-registered


def make_other_base():
    from conftest import make_llama

    return make_llama(0, vocab_size=51, hidden_size=48, num_attention_heads=4, num_key_value_heads=2)


def test_stop_sequences_seeds_cancellation_and_the_queue_bound(tmp_path):
    model, tokenizer = tiny_lm()
    engine = make_engine(model, tokenizer, {}, max_queue=2)
    probe = Request(adapter=None, prompt_ids=[9, 10, 11], max_tokens=12, on_event=Collector(), temperature=0, ignore_eos=True)
    run_all(engine, [probe])
    full = probe.on_event.text
    stop = full[4:6]
    cut = Request(adapter=None, prompt_ids=[9, 10, 11], max_tokens=12, on_event=Collector(), temperature=0,
                  stop=(stop,), ignore_eos=True)
    run_all(engine, [cut])
    assert cut.finish_reason == "stop" and cut.on_event.text == full[: full.find(stop)]

    def sampled(seed):
        r = Request(adapter=None, prompt_ids=[9, 10], max_tokens=8, on_event=Collector(), temperature=1.0, seed=seed,
                    ignore_eos=True)
        run_all(engine, [r])
        return r.output_ids

    assert sampled(7) == sampled(7) and sampled(7) != sampled(8)

    long = Request(adapter=None, prompt_ids=[9], max_tokens=50, on_event=Collector(), temperature=0, ignore_eos=True)
    engine.submit(long)
    engine.step()
    long.cancel()
    engine.step()
    assert not engine.running and long.finish_reason is None and len(long.output_ids) < 50

    engine.submit(Request(adapter=None, prompt_ids=[9], max_tokens=1, on_event=Collector()))
    engine.submit(Request(adapter=None, prompt_ids=[9], max_tokens=1, on_event=Collector()))
    with pytest.raises(QueueFull):
        engine.submit(Request(adapter=None, prompt_ids=[9], max_tokens=1, on_event=Collector()))


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    request = Request(adapter=None, prompt_ids=[1], max_tokens=1, on_event=None, temperature=1.0, top_p=0.7)
    request.generator = torch.Generator().manual_seed(0)
    drawn = {sample(logits, request) for _ in range(300)}
    assert drawn == {0, 1}
