"""The server's Prometheus metrics, rendered in the text exposition format (``GET /metrics``).

Latencies are observed on the scheduler thread as tokens are sampled; gauges (running,
queued, KV pages) come from the scheduler's snapshot at render time.
"""

from __future__ import annotations

import bisect
import threading

PREFIX = "mpt_relax"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    """Cumulative-bucket histogram: counts per upper bound, sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return out + [f"{name}_sum {self.sum!r}", f"{name}_count {self.count}"]


class Metrics:
    """Counters and histograms of one server; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.requests: dict[str, int] = {}  # by outcome: stop, length, cancelled, error
        self.rejected: dict[str, int] = {}  # by HTTP status

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def finished(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def rejected_request(self, status: int) -> None:
        with self._lock:
            self.rejected[str(status)] = self.rejected.get(str(status), 0) + 1

    def render(self, stats: dict, model: str) -> str:
        p = PREFIX
        lines = []

        def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} {kind}"] + samples)

        with self._lock:
            metric("model_loaded", "gauge", "1 once the model is loaded and the scheduler runs.",
                   [f'{p}_model_loaded{{model="{model}"}} {int(bool(stats.get("ready")))}'])
            metric("requests_running", "gauge", "Requests in the running batch.",
                   [f"{p}_requests_running {stats.get('running', 0)}"])
            metric("requests_queued", "gauge", "Requests waiting for admission.",
                   [f"{p}_requests_queued {stats.get('queued', 0)}"])
            metric("kv_pages_total", "gauge", "KV-cache pages in the pool.",
                   [f"{p}_kv_pages_total {stats.get('kv_pages_total', 0)}"])
            metric("kv_pages_in_use", "gauge", "KV-cache pages held by sequences.",
                   [f"{p}_kv_pages_in_use {stats.get('kv_pages_total', 0) - stats.get('kv_pages_free', 0)}"])
            metric("scheduler_steps_total", "counter", "Scheduler steps run.",
                   [f"{p}_scheduler_steps_total {stats.get('steps', 0)}"])
            metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.",
                   [f"{p}_prompt_tokens_total {stats.get('prompt_tokens', 0)}"])
            metric("generation_tokens_total", "counter", "Tokens generated.",
                   [f"{p}_generation_tokens_total {stats.get('tokens_generated', 0)}"])
            metric("requests_finished_total", "counter", "Requests ended, by outcome.",
                   [f'{p}_requests_finished_total{{outcome="{k}"}} {v}' for k, v in sorted(self.requests.items())])
            metric("requests_rejected_total", "counter", "Requests refused before running, by HTTP status.",
                   [f'{p}_requests_rejected_total{{status="{k}"}} {v}' for k, v in sorted(self.rejected.items())])
            metric("time_to_first_token_seconds", "histogram", "From arrival to the first sampled token.",
                   self.ttft.lines(f"{p}_time_to_first_token_seconds"))
            metric("inter_token_latency_seconds", "histogram", "Between consecutive tokens of a request.",
                   self.itl.lines(f"{p}_inter_token_latency_seconds"))
        return "\n".join(lines) + "\n"
