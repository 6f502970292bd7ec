"""The load generator's workload (seeded, power-law popularity, Gamma arrivals), its statistics,
and a whole run against live servers: peftlab's engine and the two HF PEFT baselines answer the
same greedy requests with the same text."""
from __future__ import annotations

import asyncio
import copy
import json
import statistics

import pytest

pytest.importorskip("fastapi")

from peftlab.errors import ConfigError  # noqa: E402
from peftlab.serve import build_server  # noqa: E402
from peftlab.serve.loadtest import Outcome, Workload, percentiles, plan, run_load, summarize  # noqa: E402
from serve_helpers import save_adapters, tiny_lm  # noqa: E402
from test_serve_api import LiveServer  # noqa: E402


def test_the_workload_is_seeded_power_law_and_gamma():
    adapters = [f"a{i}" for i in range(8)]
    workload = Workload(adapters=adapters, rate=4.0, cv=1.0, alpha=1.0, requests=4000, seed=3)
    planned = plan(workload)
    assert [(p.at, p.model, p.prompt) for p in planned[:50]] == [(p.at, p.model, p.prompt) for p in plan(workload)[:50]]
    counts = [sum(p.model == a for p in planned) for a in adapters]
    assert counts == sorted(counts, reverse=True)  # popularity falls with rank...
    assert counts[0] / counts[3] == pytest.approx(4.0, rel=0.25)  # ...as (i + 1) ** -alpha
    gaps = [b.at - a.at for a, b in zip(planned, planned[1:])]
    assert statistics.fmean(gaps) == pytest.approx(0.25, rel=0.06)
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(1.0, rel=0.08)  # Poisson: cv = 1
    bursty = plan(Workload(adapters=adapters, rate=4.0, cv=3.0, requests=4000, seed=3))
    gaps = [b.at - a.at for a, b in zip(bursty, bursty[1:])]
    assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(3.0, rel=0.15)
    assert all(16 <= p.max_tokens <= 64 for p in planned)
    with pytest.raises(ConfigError):
        plan(Workload(adapters=adapters, prompt_tokens=(5, 2)))


def test_percentiles_and_slo_attainment():
    assert percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])["p90"] == 9
    outcomes = [Outcome("a", sent=0.0, status=200, first=t, done=t + 1, tokens=3) for t in (0.1, 0.2, 3.0)]
    outcomes.append(Outcome("a", sent=0.0, status=429, error="full"))
    summary = summarize(outcomes, seconds=2.0, slo=1.0)
    assert summary["completed"] == 3 and summary["errors"] == {"429": 1}
    assert summary["slo_attainment"] == 0.5 and summary["output_tokens_per_second"] == 4.5


@pytest.mark.parametrize("engine", ["peft-mixed", "peft-swap"])
def test_baselines_and_the_engine_answer_the_same_requests_alike(tmp_path, engine):
    model, tokenizer = tiny_lm()
    base = copy.deepcopy(model)
    paths = save_adapters(base, tmp_path, 4)
    workload = Workload(adapters=list(paths), rate=50.0, requests=16, prompt_tokens=(3, 10), output_tokens=(2, 8),
                        base_share=0.25, base_name="tiny", seed=1)
    planned = plan(workload)  # no tokenizer: words as prompts
    texts = {}
    for kind in ("peftlab", engine):
        app, _ = build_server("tiny", paths, model=copy.deepcopy(base), tokenizer=tokenizer, engine=kind, max_batch=4)
        with LiveServer(app) as url:
            outcomes, seconds = asyncio.run(run_load(url, planned))
        summary = summarize(outcomes, seconds, slo=5.0)
        assert summary["completed"] == 16 and not summary["errors"], summary
        assert all(o.tokens == p.max_tokens for o, p in zip(outcomes, planned))  # ignore_eos: the drawn lengths
        texts[kind] = [o.text for o in outcomes]
    assert texts["peftlab"] == texts[engine]


def test_the_loadtest_command_writes_json_and_a_plot(tmp_path):
    from peftlab.cli import main

    model, tokenizer = tiny_lm()
    paths = save_adapters(copy.deepcopy(model), tmp_path, 2)
    app, _ = build_server("tiny", paths, model=model, tokenizer=tokenizer, keys={"k": {"*"}})
    with LiveServer(app) as url:
        code = main(["loadtest", "--url", url, "--api-key", "k", "--requests", "6", "--rate", "20", "--tokenizer", "none",
                     "--prompt-tokens", "3,6", "--output-tokens", "2,4", "--out", str(tmp_path / "out")])
    assert code == 0
    report = json.loads((tmp_path / "out" / "result.json").read_text())
    assert report["summary"]["completed"] == 6 and set(report["workload"]["adapters"]) == {"a0", "a1"}
    assert (tmp_path / "out" / "result.png").stat().st_size > 1000
