"""Prometheus metrics in the app's own registry: HTTP traffic, tokens, latency, engine and pack cache."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class EngineCollector(Collector):
    """Reads the engine's stats and the pack cache at scrape time (nothing is copied between)."""

    def __init__(self, engine_of: Callable[[], object | None]):
        self._engine_of = engine_of

    def collect(self) -> Iterator[Metric]:
        engine = self._engine_of()
        if engine is None:
            return
        stats = engine.stats() or {}
        yield _gauge("skillpack_queue_depth", "Requests waiting to be scheduled.", stats.get("queue_depth", 0))
        yield _gauge("skillpack_running_requests", "Requests in the running batch.", stats.get("running", 0))
        cache = stats.get("pack_cache", {})
        for key, doc in (("hits", "Pack lookups served from memory."), ("misses", "Pack lookups that had to load."),
                         ("loads", "Packs loaded from disk."), ("evictions", "Packs evicted under the byte budget.")):
            family = CounterMetricFamily(f"skillpack_pack_cache_{key}", doc)
            family.add_metric([], float(cache.get(key, 0)))
            yield family
        statuses = engine.pack_cache.status()
        yield _gauge("skillpack_packs_registered", "Packs the server offers.", len(statuses))
        resident = GaugeMetricFamily("skillpack_packs_resident", "Packs held in memory, by place.", labels=["state"])
        for state in ("host", "device"):
            resident.add_metric([state], sum(1 for s in statuses if s.state == state))
        yield resident
        yield self._lora_info(stats)

    @staticmethod
    def _lora_info(stats: dict) -> Metric:
        # the shape of vLLM's lora_requests_info, which LoRA-aware gateways read to route
        # requests to a replica that already runs their adapter: the value is a timestamp,
        # the adapters are comma-separated label values.
        per_pack = stats.get("packs", {})
        running = sorted(n for n, c in per_pack.items() if c.get("running", 0) > 0)
        waiting = sorted(n for n, c in per_pack.items() if c.get("waiting", 0) > 0)
        info = GaugeMetricFamily(
            "skillpack_lora_requests_info", "Running and waiting packs (vLLM lora_requests_info shape).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(running), ",".join(waiting), str(stats.get("max_packs", 0))], time.time())
        return info


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    """The server's metrics; one instance per app, in its own registry."""

    def __init__(self, engine_of: Callable[[], object | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("skillpack_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("skillpack_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("skillpack_generation_tokens", "Tokens generated.", registry=r)
        self.e2e_latency = Histogram("skillpack_e2e_request_latency_seconds",
                                     "Generation request latency, first byte in to last byte out.",
                                     ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("skillpack_time_to_first_token_seconds", "Time to the first generated token.",
                              ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        r.register(EngineCollector(engine_of))

    def render(self) -> bytes:
        return generate_latest(self.registry)
