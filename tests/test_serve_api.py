"""The HTTP API: OpenAI-compatible answers (checked with the official ``openai`` client against
a real server on localhost), keys and tenants, limits, the bounded queue, runtime adapter
loading confined to the adapter root, disconnects, draining on shutdown, and /metrics."""
from __future__ import annotations

import copy
import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from peftlab.errors import ConfigError  # noqa: E402
from peftlab.serve import build_server  # noqa: E402
from peftlab.serve.engine import Request  # noqa: E402
from serve_helpers import Collector, greedy_alone, save_adapters, tiny_lm  # noqa: E402

KEYS = {"k0": {"a0"}, "k1": {"a1"}, "admin": {"*"}}


@pytest.fixture
def served(tmp_path):
    """(app, engine, base copy, adapter paths) of a tiny server with adapters a0..a2."""
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path / "root", 3)
    app, engine = build_server("tiny", paths, model=model, tokenizer=tokenizer, max_queue=2, max_prompt_tokens=40,
                               max_tokens_limit=20, adapter_root=str(tmp_path / "root"), drain_seconds=20)
    return app, engine, base, paths, tokenizer


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def test_models_keys_and_tenants(served, tmp_path):
    app, engine, base, *_ = served
    with TestClient(app) as client:  # no keys: open
        assert client.get("/v1/models").status_code == 200
    keyed, _ = keyed_server(served)
    with TestClient(keyed) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=auth("nope")).status_code == 401
        listed = client.get("/v1/models", headers=auth("k0")).json()["data"]
        assert [(m["id"], m["parent"]) for m in listed] == [("tiny", None), ("a0", "tiny")]
        admin = [m["id"] for m in client.get("/v1/models", headers=auth("admin")).json()["data"]]
        assert admin == ["tiny", "a0", "a1", "a2"]
        other = client.post("/v1/completions", headers=auth("k0"), json={"model": "a1", "prompt": "abc", "max_tokens": 2})
        assert other.status_code == 404 and "a1" not in other.json()["error"]["message"].split("available")[1]
        mine = client.post("/v1/completions", headers=auth("k0"), json={"model": "a0", "prompt": "abc", "max_tokens": 2,
                                                                         "temperature": 0})
        assert mine.status_code == 200 and mine.json()["usage"]["completion_tokens"] <= 2


def keyed_server(served):
    _, engine, base, paths, tokenizer = served
    model = copy.deepcopy(base)
    return build_server("tiny", paths, model=model, tokenizer=tokenizer, keys=KEYS)


def test_answers_equal_the_adapter_alone_and_streams_equal_whole_answers(served):
    app, engine, base, paths, tokenizer = served
    prompt = "say cat twice"
    with TestClient(app) as client:
        for model in ("a0", "a2", "tiny"):
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            whole = client.post("/v1/completions", json=body).json()
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            expected = greedy_alone(base, paths.get(model), ids, 8, [tokenizer.eos_token_id])
            assert whole["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
            assert whole["object"] == "text_completion" and whole["model"] == model
            with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
            assert chunks[-1]["usage"] == whole["usage"]
        chat = client.post("/v1/chat/completions", json={"model": "a1", "messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4, "temperature": 0}).json()
        assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"


def test_a_quantized_base_serves_dora_and_ia3_adapters_trained_on_the_full_precision_one(tmp_path):
    """--quantize nf4: the adapters' base check is against the weights they were trained on, and
    each answer equals the adapter alone on the same 4-bit base."""
    import peftlab

    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = {"dora": save_adapters(base, tmp_path / "dora", 1, spec="dora[r=4]")["a0"],
             "ia3": save_adapters(base, tmp_path / "ia3", 1, spec="ia3")["a0"]}
    app, engine = build_server("tiny", paths, model=model, tokenizer=tokenizer, quantize="nf4")
    peftlab.quantize(base, "nf4")
    assert peftlab.quant.weight_bytes(model)["quantized"] < peftlab.quant.weight_bytes(model)["fp32_quantized"]
    with TestClient(app) as client:
        for name in paths:
            answer = client.post("/v1/completions", json={"model": name, "prompt": "abc", "max_tokens": 6,
                                                          "temperature": 0}).json()
            ids = tokenizer("abc", add_special_tokens=False)["input_ids"]
            expected = greedy_alone(base, paths[name], ids, 6, [tokenizer.eos_token_id])
            assert answer["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    with pytest.raises(ConfigError, match="--quantize must be one of"):
        build_server("tiny", {}, model=copy.deepcopy(base), tokenizer=tokenizer, quantize="nf3")


def test_bad_requests_get_clear_errors(served):
    app, engine, *_ = served
    with TestClient(app) as client:
        def error(body, status):
            response = client.post("/v1/completions", json=body)
            assert response.status_code == status, response.text
            return response.json()["error"]["message"]

        assert "available: tiny, a0, a1, a2" in error({"model": "zz", "prompt": "a"}, 404)
        assert "'model' is required" in error({"prompt": "a"}, 400)
        assert "at most 20" in error({"model": "a0", "prompt": "a", "max_tokens": 21}, 400)
        assert "at most 40" in error({"model": "a0", "prompt": "a" * 41}, 400)
        assert "between 0.0 and 2.0" in error({"model": "a0", "prompt": "a", "temperature": 3}, 400)
        assert "'stop'" in error({"model": "a0", "prompt": "a", "stop": [1]}, 400)
        assert "'prompt'" in error({"model": "a0", "prompt": ["a", "b"]}, 400)
        assert "'messages'" in client.post("/v1/chat/completions", json={"model": "a0", "messages": "hi"}).json()["error"][
            "message"]
        assert client.post("/v1/completions", content=b"{not json").status_code == 400


def test_a_full_queue_answers_429_with_retry_after(served):
    app, engine, *_ = served
    client = TestClient(app)  # not entered: the engine is not running, so the queue stays full
    for _ in range(2):
        engine.submit(Request(adapter=None, prompt_ids=[9], max_tokens=1, on_event=Collector()))
    response = client.post("/v1/completions", json={"model": "a0", "prompt": "abc", "max_tokens": 2})
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert "queue is full" in response.json()["error"]["message"]


def test_runtime_loading_stays_under_the_adapter_root(served, tmp_path):
    app, engine, base, paths, _ = served
    outside = save_adapters(base, tmp_path / "outside", 1)["a0"]
    (tmp_path / "root" / "pickled").mkdir()
    (tmp_path / "root" / "pickled" / "adapter_model.bin").write_bytes(b"x")
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside" / "a0")
    with TestClient(app) as client:
        def load(name, path):
            return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

        assert load("new", "a1").status_code == 200  # a1's folder again, under a new name
        assert "new" in [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert load("x", "../outside/a0").status_code == 400
        assert load("x", outside).status_code == 400
        assert "outside" in load("x", "link").json()["error"]["message"]  # a link out of the root
        assert "safetensors" in load("x", "pickled").json()["error"]["message"]
        assert load("../evil", "a1").status_code == 400
        assert load("tiny", "a1").status_code == 400  # the base model's name
        assert "already loaded" in load("new", "a1").json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}).status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "new"}).status_code == 404
    closed, _ = build_server("tiny", {}, model=copy.deepcopy(base), tokenizer=engine.tokenizer)
    with TestClient(closed) as client:
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a1"})
        assert response.status_code == 403 and "--adapter-root" in response.json()["error"]["message"]
    with pytest.raises(ConfigError, match="--max-step-tokens must be a positive integer"):
        build_server("tiny", {}, model=copy.deepcopy(base), tokenizer=engine.tokenizer, max_step_tokens=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn server on localhost, in a thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=20))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_the_official_openai_client_against_a_live_server(served):
    openai = pytest.importorskip("openai")
    app, engine, base, paths, tokenizer = keyed_server(served) + served[2:]
    with LiveServer(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="admin")
        assert {m.id for m in client.models.list().data} == {"tiny", "a0", "a1", "a2"}
        completion = client.completions.create(model="a1", prompt="say dog twice", max_tokens=6, temperature=0)
        ids = tokenizer("say dog twice", add_special_tokens=False)["input_ids"]
        expected = greedy_alone(base, paths["a1"], ids, 6, [tokenizer.eos_token_id])
        assert completion.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        stream = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                                temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        whole = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                               temperature=0)
        assert streamed == whole.choices[0].message.content
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="a", max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong").models.list()
        metrics = openai.OpenAI(base_url=f"{url}/v1", api_key="admin")._client.get(f"{url}/metrics").text
        assert 'peftlab_requests_total{adapter="a1",outcome="ok"} 1' in metrics
        assert "peftlab_time_to_first_token_seconds_bucket" in metrics and "peftlab_adapters_resident" in metrics


def test_a_client_that_goes_away_frees_its_row_and_shutdown_drains(served):
    import httpx

    app, engine, *_ = served
    body = {"model": "a0", "prompt": "abc", "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True}
    slow = engine.runner.step

    def slower(*args):
        time.sleep(0.05)
        return slow(*args)

    engine.runner.step = slower
    with LiveServer(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            next(response.iter_lines())  # the first token arrived; now hang up
        deadline = time.time() + 10
        while engine.busy():
            assert time.time() < deadline, "the abandoned request kept running"
            time.sleep(0.05)
        assert "outcome=\"cancelled\"" in httpx.get(f"{url}/metrics").text

        answers = []
        thread = threading.Thread(target=lambda: answers.append(
            httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60).json()))
        thread.start()
        while not engine.busy():
            time.sleep(0.01)
    thread.join(timeout=30)  # the server stopped only after the running request finished
    assert answers and answers[0]["choices"][0]["finish_reason"] == "length"
    assert answers[0]["usage"]["completion_tokens"] == 20


def test_the_serve_command_answers_and_drains_on_sigterm(tmp_path):
    """``peftlab serve`` as a user runs it: its own process, the engine in the main thread, uvicorn
    beside it; SIGTERM lets the running request finish, then the process exits cleanly."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    model, tokenizer = tiny_lm()
    paths = save_adapters(copy.deepcopy(model), tmp_path, 1)
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "peftlab", "serve", "--base", str(tmp_path / "base"),
                                "--adapter", f"a0={paths['a0']}", "--port", str(port), "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        body = {"model": "a0", "prompt": "say cat", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        answers = []
        thread = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=body,
                                                                           timeout=60).json()))
        thread.start()
        while thread.is_alive() and httpx.get(f"{url}/health", timeout=5).json()["running"] == 0:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # while the request runs (or just after it finished)
        thread.join(timeout=60)
        assert process.wait(timeout=60) == 0
        assert answers and answers[0]["usage"]["completion_tokens"] == 200
    finally:
        if process.poll() is None:
            process.kill()
