"""``peftlab serve --ray``: two replicas on a local Ray Serve, the same API, adapter affinity, and
what a replica's death costs (only the requests it was streaming; the others run elsewhere)."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_helpers import greedy_alone, save_adapters, tiny_lm  # noqa: E402
from test_serve_api import free_port  # noqa: E402

from peftlab.serve.replicas import deploy  # noqa: E402

PROMPTS = [[5, 9, 14, 3], [7, 7, 21, 30, 2], [11, 4, 8]]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, local_ray):
    folder = tmp_path_factory.mktemp("ray-serve")
    model, tokenizer = tiny_lm()
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    paths = save_adapters(model, folder, 2)
    url = deploy(str(folder / "base"), paths, replicas=2, port=free_port(), replica_cpus=0, max_batch=2, max_queue=16,
                 keys={"k-all": {"*"}, "k-a0": {"a0"}}, adapter_root=str(folder))
    yield url, model, tokenizer, paths, folder
    serve.shutdown()


def complete(url, model, prompt, tokens=6, key="k-all", **extra):
    answer = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                        json={"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, **extra})
    return answer


def expected(base, tokenizer, adapter, prompt, tokens=6) -> str:
    return tokenizer.decode(greedy_alone(base, adapter, prompt, tokens, [tokenizer.eos_token_id]), skip_special_tokens=True)


def routed(url) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()["routed"]


def test_replicas_answer_as_the_adapter_alone_with_the_same_keys_and_limits(deployed):
    url, base, tokenizer, paths, _ = deployed
    for name in ("a0", "a1", "base"):
        for prompt in PROMPTS:
            answer = complete(url, name, prompt)
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["text"] == expected(base, tokenizer, paths.get(name), prompt), name
    assert complete(url, "a1", PROMPTS[0], key="k-a0").status_code == 404  # another tenant's adapter
    assert complete(url, "a0", PROMPTS[0], key="wrong").status_code == 401
    assert "max-tokens-limit" in complete(url, "a0", PROMPTS[0], tokens=100000).json()["error"]["message"]
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer k-a0"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["base", "a0"]


def test_requests_for_one_adapter_stay_on_the_replica_that_holds_it(deployed):
    url, *_ = deployed
    for name in ("a0", "a1"):
        before = routed(url).get(name, {})
        assert complete(url, name, PROMPTS[1]).status_code == 200
        first = next(r for r, n in routed(url)[name].items() if n > before.get(r, 0))
        time.sleep(2)  # the replica reports the adapter it loaded to Ray's router
        for _ in range(5):
            assert complete(url, name, PROMPTS[2]).status_code == 200
        after = routed(url)[name]
        assert after[first] == before.get(first, 0) + 6, (name, before, after)


def test_runtime_loading_reaches_the_replicas_and_bad_adapters_are_refused(deployed):
    url, base, tokenizer, paths, folder = deployed
    headers = {"Authorization": "Bearer k-all"}
    loaded = httpx.post(f"{url}/v1/load_lora_adapter", headers=headers, timeout=60,
                        json={"lora_name": "again", "lora_path": "a1"})
    assert loaded.status_code == 200, loaded.text
    answer = complete(url, "again", PROMPTS[0])
    assert answer.json()["choices"][0]["text"] == expected(base, tokenizer, paths["a1"], PROMPTS[0])
    (folder / "broken").mkdir()
    (folder / "broken" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    refused = httpx.post(f"{url}/v1/load_lora_adapter", headers=headers, timeout=60,
                         json={"lora_name": "broken", "lora_path": "broken"})
    assert refused.status_code == 400 and "broken" in refused.json()["error"]["message"]


def test_a_dead_replica_costs_only_the_requests_it_was_streaming(deployed, local_ray):
    url, base, tokenizer, paths, _ = deployed
    complete(url, "a0", PROMPTS[0])
    holder = max(routed(url)["a0"].items(), key=lambda item: item[1])[0]
    time.sleep(2)
    streams, started = [], threading.Barrier(3)

    def stream():  # a long answer for a0, streamed: it lands on the replica holding a0
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", headers={"Authorization": "Bearer k-all"}, timeout=120,
                          json={"model": "a0", "prompt": PROMPTS[1], "max_tokens": 240, "temperature": 0,
                                "ignore_eos": True, "stream": True}) as answer:
            for line in answer.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    events.append(line)
                    if len(events) == 1:
                        started.wait(timeout=60)
        streams.append(events)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)  # both are streaming
    actor = next(n for n in local_ray.util.list_named_actors(all_namespaces=True)
                 if n["name"].startswith("SERVE_REPLICA::") and n["name"].endswith(holder))
    local_ray.kill(local_ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)

    async def after_the_death():  # sent at once, while the router may still pick the dead replica
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/completions", headers={"Authorization": "Bearer k-all"},
                                                      json={"model": "a0", "prompt": p, "max_tokens": 6, "temperature": 0})
                                          for p in PROMPTS])

    answers = asyncio.run(after_the_death())
    for thread in threads:
        thread.join(timeout=120)
    for prompt, answer in zip(PROMPTS, answers):
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected(base, tokenizer, paths["a0"], prompt)
    assert len(streams) == 2
    for events in streams:
        assert "the replica running this request stopped" in events[-1] and "send the request again" in events[-1]
        assert len(events) > 1  # it had streamed text before the error

    def running_replicas():
        overview = serve.status().applications["peftlab-engine"].deployments["EngineReplica"]
        return overview.replica_states.get("RUNNING", 0)

    deadline = time.time() + 120
    while running_replicas() < 2 and time.time() < deadline:  # Ray Serve starts a new one
        time.sleep(1)
    assert running_replicas() == 2


class FakeCall:
    """A streamed call to a replica: its events, then (optionally) an error, as Ray raises it."""

    def __init__(self, events, error=None):
        self.events, self.error, self.cancelled = list(events), error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.error is not None:
            raise self.error
        raise StopAsyncIteration

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """Stands in for the replicas' deployment handle: each call plays the next planned FakeCall."""

    def __init__(self, *calls):
        self.calls, self.model_ids, self.specs = list(calls), [], []
        self.generate = self

    def options(self, *, multiplexed_model_id, stream):
        self.model_ids.append(multiplexed_model_id)
        return self

    def remote(self, spec):
        self.specs.append(dict(spec))
        return self.calls.pop(0)


def dispatch(handle, adapter="a0"):
    """Run one request through RayEngine over ``handle``; (the events it got, the engine)."""
    from peftlab.serve.engine import Request
    from peftlab.serve.metrics import ServerMetrics
    from peftlab.serve.replicas import AdapterDirectory, RayEngine

    engine = RayEngine(handle, AdapterDirectory({"a0": "/adapters/a0"}), None, max_queue=4, max_context=64,
                       metrics=ServerMetrics(), base_name="base")
    events = []

    async def run():
        engine.submit(Request(adapter=adapter, prompt_ids=[1, 2], max_tokens=3, on_event=events.append))
        while engine.busy():
            await asyncio.sleep(0.01)

    asyncio.run(run())
    return events, engine


def test_a_request_whose_replica_died_before_it_answered_runs_on_another():
    from ray.exceptions import ActorDiedError

    done = {"done": "length", "prompt_tokens": 2, "completion_tokens": 3}
    handle = FakeHandle(FakeCall([{"replica": "r1"}], ActorDiedError()),
                        FakeCall([{"replica": "r2"}, {"text": "abc"}, done]))
    events, engine = dispatch(handle)
    assert events == [{"text": "abc"}, done]
    assert handle.model_ids == ["a0#0", "a0#0"] and handle.specs[1]["folder"] == "/adapters/a0"
    assert engine.load()["routed"] == {"a0": {"r1": 1, "r2": 1}}
    assert engine.bank.in_use["a0"] == 0  # the adapter can be unloaded again
    assert 'outcome="ok"' in engine.metrics.render(engine.bank)


def test_a_request_whose_replica_died_mid_answer_gets_an_error_that_says_so():
    from ray.exceptions import ActorDiedError

    handle = FakeHandle(FakeCall([{"replica": "r1"}, {"text": "ab"}], ActorDiedError()), FakeCall([]))
    events, _ = dispatch(handle)
    assert events[0] == {"text": "ab"} and len(handle.calls) == 1  # not run again: its text cannot be taken back
    assert "stopped (ActorDiedError) after 1 streamed piece(s) of text" in events[1]["error"]
    gone = [FakeCall([], ActorDiedError()) for _ in range(3)]
    events, _ = dispatch(FakeHandle(*gone))
    assert "send the request again" in events[-1]["error"] and not any(c.events for c in gone)
    failing = FakeHandle(FakeCall([], ValueError("a bug on the replica")), FakeCall([]))
    events, _ = dispatch(failing)
    assert "ValueError" in events[-1]["error"] and len(failing.calls) == 1  # a request's own failure is not retried
