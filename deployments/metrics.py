"""Prometheus metrics of the router, per model (prometheus_client ships with ray[serve]).

Request, token and latency figures are measured by the router as the client sees them; running
and waiting sequences and the KV cache figures are read from each engine at scrape time. Every
router replica keeps its own registry, so run one router replica when /metrics is scraped.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the router)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30, 60)
COLD_BUCKETS = (0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)
# engine stats key -> (metric suffix, help) for the figures that get their own gauges
ENGINE_GAUGES = {
    "running": ("running_sequences", "Sequences decoding now."),
    "waiting": ("waiting_requests", "Requests waiting for a slot or for their prefill."),
    "kv_cache_bytes": ("kv_cache_bytes", "Bytes of KV cache held by running sequences."),
    "speculative_acceptance_rate": (
        "speculative_acceptance_rate",
        "Speculative decoding: draft tokens kept / draft tokens proposed.",
    ),
    "speculative_tokens_per_step": (
        "speculative_tokens_per_step",
        "Speculative decoding: tokens a drafting sequence gets from one forward pass (1 without).",
    ),
}
CACHE_GAUGES = {
    "blocks_total": ("cache_blocks_total", "KV blocks in the pool."),
    "blocks_used": ("cache_blocks_used", "KV blocks held by running requests."),
    "blocks_free": ("cache_blocks_free", "KV blocks free."),
    "hit_rate": ("cache_hit_rate", "Admitted prompts that reused cached blocks (full or prefix hits) / prompts."),
    "token_hit_rate": ("cache_token_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens."),
    "bytes": ("cache_bytes", "Bytes of the KV block pool."),
}


def derived_cache_stats(stats: dict[str, Any], cache: dict[str, Any]) -> dict[str, float]:
    """Hit rates from the engine's counters, unless the cache reports them itself."""
    out = {}
    queries = cache.get("queries") or 0
    if "hit_rate" not in cache and queries:
        out["hit_rate"] = (cache.get("hits", 0) + cache.get("prefix_hits", 0)) / queries
    prompt_tokens = stats.get("prompt_tokens") or 0
    if "token_hit_rate" not in cache and "tokens_reused" in cache and prompt_tokens:
        out["token_hit_rate"] = cache["tokens_reused"] / prompt_tokens
    return out


class RouterMetrics:
    def __init__(self, prefix: str = "orchard"):
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_metrics(prefix)
        self._engine_metrics(prefix)
        self._governor_metrics(prefix)

    def _request_metrics(self, p: str) -> None:
        """What the router sees of each request: counts, tokens, latencies."""
        r = self.registry
        self.requests = Counter(
            f"{p}_requests", "HTTP requests by model, endpoint and status.", ["model", "endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens.", ["model"], registry=r)
        self.cached_tokens = Counter(
            f"{p}_cached_prompt_tokens", "Prompt tokens served from the prefix cache.", ["model"], registry=r
        )
        self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated tokens.", ["model"], registry=r)
        latency = dict(buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds", "Request arrival to first token, at the router.", ["model"], **latency
        )
        self.itl = Histogram(
            f"{p}_inter_token_latency_seconds",
            "Time between tokens (chunk gap / tokens in it).",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{p}_request_duration_seconds", "Request arrival to last token.", ["model"], **latency
        )
        self.cold_ttft = Histogram(
            f"{p}_cold_request_first_token_seconds",
            "Arrival to first token of requests that found their model unloaded.",
            ["model"],
            buckets=COLD_BUCKETS,
            registry=r,
        )

    def _engine_metrics(self, p: str) -> None:
        """Each model's engine and cache, as its stats call reports them at a scrape."""
        r = self.registry
        self.up = Gauge(
            f"{p}_model_up", "1 when the model answered the stats call of this scrape.", ["model"], registry=r
        )
        self.engine = {k: Gauge(f"{p}_{name}", doc, ["model"], registry=r) for k, (name, doc) in ENGINE_GAUGES.items()}
        self.cache = {k: Gauge(f"{p}_{name}", doc, ["model"], registry=r) for k, (name, doc) in CACHE_GAUGES.items()}
        self.engine_other = Gauge(
            f"{p}_engine_stat", "Other numeric engine and cache statistics.", ["model", "stat"], registry=r
        )
        self.routing = Gauge(
            f"{p}_prefix_routing_decisions",
            "Prefix-affinity routing in this router: requests "
            "routed by affinity, as a new prefix or by balance, and replica reports taken.",
            ["model", "decision"],
            registry=r,
        )

    def _governor_metrics(self, p: str) -> None:
        """The memory governor (deployments.governor), as this router sees Ray Serve's replicas."""
        r = self.registry
        self.budget = Gauge(f"{p}_memory_budget_bytes", "The host memory budget all models share.", registry=r)
        self.used = Gauge(f"{p}_memory_used_bytes", "Footprints of the models loaded or loading.", registry=r)
        self.footprint = Gauge(
            f"{p}_model_footprint_bytes", "A model's footprint (measured once loaded).", ["model"], registry=r
        )
        self.loaded = Gauge(f"{p}_model_loaded", "1 when the model is loaded, else 0.", ["model"], registry=r)
        self.state = Gauge(f"{p}_model_state", "1 for the model's current state.", ["model", "state"], registry=r)
        self.loads = Counter(f"{p}_model_loads", "Times the model was loaded.", ["model"], registry=r)
        self.unloads = Counter(f"{p}_model_unloads", "Times the model was unloaded.", ["model"], registry=r)
        self.cold_start = Histogram(
            f"{p}_model_cold_start_seconds",
            "Replica start to ready (process, imports, load, warm-up), per load.",
            ["model"],
            buckets=COLD_BUCKETS,
            registry=r,
        )
        self._seen: dict[str, tuple[int, int, int]] = {}  # loads, unloads, cold starts already counted

    def observe_request(self, model: str, endpoint: str, status: int) -> None:
        self.requests.labels(model, endpoint, str(status)).inc()

    def observe_usage(self, model: str, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens.labels(model).inc(usage.get("prompt_tokens", 0))
        self.completion_tokens.labels(model).inc(usage.get("completion_tokens", 0))
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        self.cached_tokens.labels(model).inc(cached)

    def observe_gap(self, model: str, gap_s: float, n_tokens: int) -> None:
        """A chunk of n tokens arrived gap_s after the previous one."""
        if n_tokens > 0:
            per_token = gap_s / n_tokens
            itl = self.itl.labels(model)
            for _ in range(n_tokens):
                itl.observe(per_token)

    def set_engine_stats(self, model: str, stats: dict[str, Any] | None) -> None:
        """Gauges from one model's `stats()`; None when the model did not answer."""
        self.up.labels(model).set(0 if stats is None else 1)
        if stats is None:
            return
        cache = stats.get("cache") if isinstance(stats.get("cache"), dict) else {}
        for key, value in _numbers(stats, skip={"cache"}):
            gauge = self.engine.get(key)
            (gauge.labels(model) if gauge else self.engine_other.labels(model, key)).set(value)
        for key, value in [*_numbers(cache), *derived_cache_stats(stats, cache).items()]:
            gauge = self.cache.get(key)
            (gauge.labels(model) if gauge else self.engine_other.labels(model, f"cache_{key}")).set(value)

    def set_governor(self, directory) -> None:
        """Gauges and counters from the router's ModelDirectory (deployments.model_directory)."""
        from .model_directory import LOADED, LOADING, UNLOADED, UNLOADING

        self.budget.set(directory.budget_bytes)
        self.used.set(directory.used_bytes())
        for rec in directory.models.values():
            self.footprint.labels(rec.name).set(rec.footprint_bytes)
            self.loaded.labels(rec.name).set(1 if rec.state == LOADED else 0)
            for state in (LOADED, LOADING, UNLOADING, UNLOADED):
                self.state.labels(rec.name, state).set(1 if rec.state == state else 0)
            loads, unloads, colds = self._seen.get(rec.name, (0, 0, 0))
            self.loads.labels(rec.name).inc(rec.loads - loads)
            self.unloads.labels(rec.name).inc(rec.unloads - unloads)
            for seconds in rec.cold_starts[colds:]:
                if seconds is not None:
                    self.cold_start.labels(rec.name).observe(seconds)
            self._seen[rec.name] = (rec.loads, rec.unloads, len(rec.cold_starts))

    def set_routing(self, model: str, decisions: dict[str, int] | None) -> None:
        """The model's prefix-affinity router decisions (deployments.request_router.routing_decisions)."""
        for decision, n in (decisions or {}).items():
            self.routing.labels(model, decision).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _numbers(stats: dict[str, Any], skip: set[str] = frozenset(), prefix: str = ""):
    """(dotted key, value) for every number in a nested dict (booleans as 0/1)."""
    for key, value in stats.items():
        if key in skip:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numbers(value, prefix=f"{name}_")
        elif isinstance(value, (int, float)):
            yield name, float(value)
