"""Prometheus metrics of the server, in the text exposition format (version 0.0.4).

Counters, gauges and histograms with labels, thread-safe, no dependency: the engine thread
records and the HTTP thread renders ``GET /metrics``.
"""
from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metric:
    def __init__(self, name: str, help: str, kind: str, buckets=None):
        self.name, self.help, self.kind, self.buckets = name, help, kind, buckets
        self.values = {}  # label tuple -> value, or [bucket counts..., sum, count] for histograms
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, **labels) -> None:
        with self.lock:
            self.values[tuple(sorted(labels.items()))] = float(value)

    def observe(self, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            row = self.values.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    row[i] += 1
            row[-2] += value
            row[-1] += 1

    def render(self) -> list:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self.lock:
            items = sorted(self.values.items())
        for key, value in items:
            if self.kind != "histogram":
                lines.append(f"{self.name}{_labels(key)} {_number(value)}")
                continue
            for bound, count in zip(self.buckets, value):
                lines.append(f"{self.name}_bucket{_labels(key, le=_number(bound))} {count}")
            lines.append(f"{self.name}_bucket{_labels(key, le='+Inf')} {value[-1]}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(value[-2])}")
            lines.append(f"{self.name}_count{_labels(key)} {value[-1]}")
        return lines


def _labels(key: tuple, **extra) -> str:
    pairs = list(key) + list(extra.items())
    if not pairs:
        return ""
    escaped = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class ServerMetrics:
    """What ``/metrics`` shows. Per-adapter series are labelled ``adapter`` (the base model's
    name for base rows)."""

    def __init__(self):
        self.requests = Metric("peftlab_requests_total", "Requests finished, by adapter and outcome", "counter")
        self.rejected = Metric("peftlab_requests_rejected_total", "Requests refused before running, by reason", "counter")
        self.prompt_tokens = Metric("peftlab_prompt_tokens_total", "Prompt tokens prefilled, by adapter", "counter")
        self.prefix_hits = Metric("peftlab_prefix_cache_hit_tokens_total", "Prompt tokens whose keys and values came "
                                  "from the prefix cache instead of being prefilled, by adapter", "counter")
        self.prefix_cached = Metric("peftlab_prefix_cache_tokens", "Positions held by the prefix cache", "gauge")
        self.output_tokens = Metric("peftlab_generation_tokens_total", "Tokens generated, by adapter", "counter")
        self.queue_time = Metric("peftlab_queue_time_seconds", "Time from arrival to the first scheduled step",
                                 "histogram", LATENCY_BUCKETS)
        self.ttft = Metric("peftlab_time_to_first_token_seconds", "Time from arrival to the first output token",
                           "histogram", LATENCY_BUCKETS)
        self.tpot = Metric("peftlab_time_per_output_token_seconds", "Mean time between output tokens of a request",
                           "histogram", LATENCY_BUCKETS)
        self.e2e = Metric("peftlab_request_latency_seconds", "Time from arrival to the last token", "histogram",
                          LATENCY_BUCKETS)
        self.cache = Metric("peftlab_adapter_cache_total", "Adapter lookups: slot hit, cpu hit, or disk load (miss)",
                            "counter")
        self.residency = Metric("peftlab_adapters_resident", "Adapters resident in compute slots, in the CPU cache, "
                                                             "in use, registered", "gauge")
        self.running = Metric("peftlab_running_requests", "Requests in the running batch", "gauge")
        self.waiting = Metric("peftlab_waiting_requests", "Requests in the queue", "gauge")
        self.all = [self.requests, self.rejected, self.prompt_tokens, self.prefix_hits, self.prefix_cached,
                    self.output_tokens, self.queue_time, self.ttft, self.tpot, self.e2e, self.cache, self.residency,
                    self.running, self.waiting]

    def render(self, bank=None, prefix=None) -> str:
        if bank is not None:
            for level, value in bank.residency().items():
                self.residency.set(value, level=level)
            if hasattr(bank, "stats"):  # an ingress's adapter directory keeps no cache: its replicas do
                with bank.lock:
                    stats = dict(bank.stats)
                for kind in ("slot_hits", "cpu_hits", "disk_loads"):
                    self.cache.set(stats[kind], result=kind)
        if prefix is not None:
            self.prefix_cached.set(prefix.cached_tokens())
        return "\n".join(line for metric in self.all for line in metric.render()) + "\n"
