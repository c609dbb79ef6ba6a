"""Prometheus metrics of a served model (prometheus_client, the optional `[serve]` extra): vLLM's
names and meanings under a `structlm:` prefix, each labelled with the served `model_name`, in a
registry of the app's own.

Per request, recorded from the engine thread as the engine's `Observer`:

    structlm:time_to_first_token_seconds  histogram  arrival to the first sampled token
    structlm:inter_token_latency_seconds  histogram  between consecutive sampled tokens of a request
                                                     (vLLM's time_per_output_token_seconds)
    structlm:e2e_request_latency_seconds  histogram  arrival to the end, whatever the finish reason
    structlm:request_queue_time_seconds   histogram  waiting in the queue for a KV cache slot
    structlm:prompt_tokens_total          counter    prompt tokens prefilled
    structlm:generation_tokens_total      counter    completion tokens, as `usage` counts them (the
                                                     end-of-text token is not one)
    structlm:request_success_total        counter    finished requests by finished_reason: stop,
                                                     length, abort (the client left), error

The engine's state, read at each scrape: the gauges structlm:num_requests_running (holding a slot:
prefilling or decoding), structlm:num_requests_waiting, structlm:tokens_per_second (decoded over the
last 10 s), structlm:batch_size (the last decode step), structlm:peak_batch_size; the counters
structlm:decode_steps_total, structlm:prefill_chunks_total and structlm:layer_calls_total (the
calls of each structured layer shape by path: merged dense matrix or structured factors).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from structlm.serving.engine import Engine, Observer

# buckets after vLLM's (vllm/v1/metrics/loggers.py), but inter-token latency also gets three below
# 10 ms (a small model decodes faster), and queue time takes the time-to-first-token buckets (vLLM:
# the latency ones, from 0.3 s), as a server with free slots queues for milliseconds
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# the engine's finish reasons -> vLLM's finished_reason labels
REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


class ServingMetrics(Observer):
    """The metrics of one app over one engine: set it as the engine's observer, `render()` the
    Prometheus text for /metrics."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = CollectorRegistry()
        name = [model_name]

        def histogram(metric: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"structlm:{metric}", doc, ["model_name"], buckets=buckets,
                             registry=self.registry).labels(*name)

        def counter(metric: str, doc: str) -> Counter:
            return Counter(f"structlm:{metric}", doc, ["model_name"],
                           registry=self.registry).labels(*name)

        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from a request's arrival to its first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds",
                             "Time between consecutive tokens of a request.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from a request's arrival to its end.", LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Time a request waited for a KV cache slot.", TTFT_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("generation_tokens", "Completion tokens generated.")
        success = Counter("structlm:request_success", "Finished requests by finish reason.",
                          ["model_name", "finished_reason"], registry=self.registry)
        self.success = {k: success.labels(model_name, v) for k, v in REASONS.items()}
        self.registry.register(EngineCollector(engine, model_name))

    def admitted(self, queued_s: float) -> None:
        self.queue.observe(queued_s)

    def prefilled(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def token(self, gap_s: float, first: bool, output: bool) -> None:
        (self.ttft if first else self.itl).observe(gap_s)
        if output:
            self.generation_tokens.inc()

    def finished(self, reason: str, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)
        self.success[reason].inc()

    def render(self) -> bytes:
        """The registry in Prometheus's text format."""
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """The engine's state and step counters, read at each scrape."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        e, s, name = self.engine, self.engine.stats, [self.model_name]

        def family(kind: type[GaugeMetricFamily | CounterMetricFamily], metric: str, doc: str,
                   value: float) -> Metric:
            out = kind(f"structlm:{metric}", doc, labels=["model_name"])
            out.add_metric(name, value)
            return out

        yield family(GaugeMetricFamily, "num_requests_running",
                     "Requests holding a KV cache slot (prefilling or decoding).", e.running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Requests waiting for a slot.",
                     e.queue_depth)
        yield family(GaugeMetricFamily, "tokens_per_second",
                     "Decoded tokens per second over the last 10 s.", round(s.tokens_per_s(), 3))
        yield family(GaugeMetricFamily, "batch_size", "Sequences in the last decode step.",
                     s.last_batch)
        yield family(GaugeMetricFamily, "peak_batch_size",
                     "The most sequences one decode step has held.", s.peak_batch)
        yield family(CounterMetricFamily, "decode_steps", "Decode forwards.", s.decode_steps)
        yield family(CounterMetricFamily, "prefill_chunks", "Prefill forwards.", s.prefill_chunks)
        layers = CounterMetricFamily(
            "structlm:layer_calls",
            "Calls of each structured layer shape by path (merged dense or structured factors).",
            labels=["model_name", "kind", "d_in", "d_out", "path"])
        for (kind, d_in, d_out), paths in e.layer_paths().items():
            for path, calls in paths.items():
                layers.add_metric([*name, kind, str(d_in), str(d_out), path], calls)
        yield layers
