"""The five scenarios. Each takes a Ctx (one target, one model) and returns a JSON-able dict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from ..client import Model, Target, cache_stats, request_body, stream_request
from ..metrics import RequestResult, gen_tok_s, percentile, ratio, summarize
from . import prompts

CHAT, TEXT = "/v1/chat/completions", "/v1/completions"
COUNTERS = {"misses": "MISS", "hits": "HIT", "prefix_hits": "PREFIX_HIT"}


class OutOfTime(Exception):
    """The run's time budget is spent: the remaining work is reported as skipped."""


@dataclass
class Ctx:
    client: httpx.AsyncClient
    target: Target
    model: Model
    max_tokens: int
    prompt_set: str
    nonce: str
    deadline: float  # time.monotonic()
    progress: Callable[[int], None]
    concurrency: tuple[int, ...] = (1, 2, 5, 10, 16, 32)
    sweep_min_requests: int = 2
    batch_size: int = 5
    single_requests: int = 2
    stream_requests: int = 3
    paged_users: int = 10

    @property
    def ignore_eos(self) -> bool:
        return self.target.ignore_eos.get(self.model.request_name, True)

    def chat_body(
        self, i: int, max_tokens: int | None = None, system: str | None = None, question: str | None = None
    ) -> dict:
        msgs = prompts.chat(question, system) if question else prompts.seed_messages(i, self.prompt_set)
        return request_body(
            self.model.request_name, messages=msgs, max_tokens=max_tokens or self.max_tokens, ignore_eos=self.ignore_eos
        )

    async def stats(self) -> dict | None:
        """The model's cache stats. A server whose first answer has no stats is not asked again (a
        failure after a success is taken as transient: None this time only)."""
        name, seen = self.model.request_name, self.target.stats_seen
        if seen.get(name) is False:
            return None
        out = await cache_stats(self.client, name)
        seen[name] = seen.get(name, False) or out is not None
        return out

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime()


async def run_wave(
    ctx: Ctx, bodies: list[dict], concurrency: int, path: str = CHAT
) -> tuple[list[RequestResult], float]:
    """Closed loop: `concurrency` workers send `bodies` in order, each taking the next when its
    request ends. Returns the results (in body order) and the wave's wall time."""
    ctx.check_time()
    results: list[RequestResult | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async def worker():
        for i in next_index:
            results[i] = await stream_request(ctx.client, path, bodies[i])
            ctx.progress(1)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(bodies))))))
    return results, time.perf_counter() - start


async def warm_up(ctx: Ctx) -> dict:
    """One short request: loads/compiles on the server, and finds whether it accepts ignore_eos
    (servers that refuse unknown fields answer 400; the benchmark then runs without it)."""
    body = ctx.chat_body(0, max_tokens=4)
    r = await stream_request(ctx.client, CHAT, body)
    if not r.ok and r.status == 400 and "ignore_eos" in (r.error or ""):
        ctx.target.ignore_eos[ctx.model.request_name] = False
        r = await stream_request(ctx.client, CHAT, ctx.chat_body(0, max_tokens=4))
    ctx.progress(1)
    return {"ok": r.ok, "error": r.error, "ignore_eos": ctx.ignore_eos, "latency_s": r.latency}


async def batching(ctx: Ctx) -> dict:
    """The seed's table: one request at a time vs `batch_size` at once, aggregate tok/s."""
    single = summarize(*await run_wave(ctx, [ctx.chat_body(i) for i in range(ctx.single_requests)], 1))
    n = ctx.batch_size
    together = summarize(*await run_wave(ctx, [ctx.chat_body(i) for i in range(n)], n))
    return {"single": single, "concurrent": together, "batch": n, "speedup": ratio(together["tok_s"], single["tok_s"])}


async def streaming(ctx: Ctx) -> dict:
    """Single streamed requests one after another: TTFT and generation speed after the first token."""
    results, wall = await run_wave(ctx, [ctx.chat_body(i) for i in range(ctx.stream_requests)], 1)
    out = summarize(results, wall)
    speeds = [gen_tok_s(r) for r in results if r.ok]
    out["gen_tok_s_p50"] = round(percentile(speeds, 50), 2) if any(s is not None for s in speeds) else None
    out["chunks_per_request"] = round(sum(len(r.chunk_times) for r in results if r.ok) / max(1, out["ok"]), 1)
    return out


def classify_delta(before: dict | None, after: dict | None) -> tuple[str | None, int | None]:
    """(MISS / HIT / PREFIX_HIT, tokens reused) from two cache-stats snapshots; "none" when no
    counter moved, joined with "+" when several did; (None, None) without counters."""
    if not before or not after or not any(k in after for k in COUNTERS):
        return None, None
    moved = [label for key, label in COUNTERS.items() if after.get(key, 0) - before.get(key, 0) > 0]
    reused = after.get("tokens_reused", 0) - before.get("tokens_reused", 0) if "tokens_reused" in after else None
    return ("+".join(moved) or "none"), reused


def classify_usage(cached: int | None, prompt_tokens: int | None) -> str | None:
    """The same label from usage.prompt_tokens_details.cached_tokens, where the server reports it."""
    if cached is None or not prompt_tokens:
        return None
    if cached == 0:
        return "MISS"
    return "HIT" if cached >= prompt_tokens - 1 else "PREFIX_HIT"


def prefix_status(expected: str, from_stats: str | None, from_usage: str | None) -> str:
    if from_stats is not None:
        return "ok" if from_stats == expected else "MISMATCH"
    if from_usage is not None:
        return "ok (usage)" if from_usage == expected else "MISMATCH (usage)"
    return "n/a"


async def prefix(ctx: Ctx) -> dict:
    """The prefix-cache table, one request at a time, cache counters read around each step."""
    rows, has_stats, reachable = [], None, False
    for step in prompts.prefix_steps(ctx.nonce):
        ctx.check_time()
        before = await ctx.stats()
        body = request_body(ctx.model.request_name, prompt=step["prompt"], max_tokens=4, ignore_eos=ctx.ignore_eos)
        r = await stream_request(ctx.client, TEXT, body)
        ctx.progress(1)
        after = await ctx.stats()
        actual, reused = classify_delta(before and before["cache"], after and after["cache"])
        has_stats = has_stats or actual is not None
        reachable = reachable or after is not None
        usage = classify_usage(r.cached_tokens, r.prompt_tokens) if r.ok else None
        rows.append(
            {
                "step": step["step"],
                "description": step["description"],
                "expected": step["expected"],
                "actual": actual,
                "tokens_reused": reused,
                "prompt_tokens": r.prompt_tokens,
                "cached_tokens": r.cached_tokens,
                "usage_label": usage,
                "error": r.error,
                "status": "error" if not r.ok else prefix_status(step["expected"], actual, usage),
            }
        )
    return {"stats_endpoint": bool(has_stats), "stats_reachable": reachable, "rows": rows}


PEAK_KEYS = {
    "cache": ("blocks_used", "bytes_used", "blocks_total", "bytes", "live_sequences"),
    "engine": ("kv_cache_bytes", "running"),
}


def track_peaks(peaks: dict, snapshot: dict | None) -> None:
    """Keep the maximum of each memory figure seen in the cache-stats snapshots."""
    if not snapshot:
        return
    for part, keys in PEAK_KEYS.items():
        for k in keys:
            v = snapshot.get(part, {}).get(k)
            if isinstance(v, (int, float)):
                peaks[k] = max(peaks.get(k, v), v)


def _saving(held, unshared) -> float | None:
    return round(1 - held / unshared, 3) if held is not None and unshared else None


def paged_memory(peaks: dict, cache: dict, results: list[RequestResult]) -> dict:
    """KV memory at peak against what one unshared copy per user would take (every user's prompt +
    completion tokens at the pool's bytes per token), and against the floor: the tokens no cache can
    share (all tokens minus those the server reported as served from its cache)."""
    ok = [r for r in results if r.ok]
    tokens = sum((r.prompt_tokens or 0) + r.completion_tokens for r in ok)
    cached = sum(r.cached_tokens or 0 for r in ok)
    bs, block_bytes = cache.get("block_size"), cache.get("block_bytes")
    per_token = block_bytes / bs if bs and block_bytes else None
    known = per_token and ok and all(r.prompt_tokens for r in ok)
    unshared = round(tokens * per_token) if known else None
    floor = round((tokens - cached) * per_token) if known else None
    pool, engine = peaks.get("bytes_used"), peaks.get("kv_cache_bytes")
    return {
        "paged": cache.get("enabled"),
        "block_size": bs,
        "block_bytes": block_bytes,
        "peak_blocks_used": peaks.get("blocks_used"),
        "peak_pool_bytes": pool,
        # the engine's own figure: the blocks its running rows hold plus any decode working copy
        "peak_engine_kv_bytes": engine,
        "peak_running": peaks.get("running"),
        "tokens_all_users": tokens,
        "cached_tokens_all_users": cached,
        "unshared_kv_bytes": unshared,
        "floor_kv_bytes": floor,
        "saving": _saving(pool, unshared),
        "saving_engine": _saving(engine, unshared),
        "best_saving": _saving(floor, unshared),
    }


async def paged(ctx: Ctx) -> dict:
    """`paged_users` users at once, one ~500-token system prompt, distinct short questions;
    the cache-stats endpoint is polled while they run (n/a where the server has none)."""
    system = prompts.system_prompt(ctx.nonce)
    qs = prompts.USER_QUESTIONS
    bodies = [ctx.chat_body(i, system=system, question=qs[i % len(qs)]) for i in range(ctx.paged_users)]
    peaks = {}
    before = await ctx.stats()
    wave = asyncio.ensure_future(run_wave(ctx, bodies, len(bodies)))
    while not wave.done():
        track_peaks(peaks, await ctx.stats() if before else None)
        await asyncio.wait([wave], timeout=0.25)
    results, wall = wave.result()
    after = await ctx.stats()
    track_peaks(peaks, after)
    out = summarize(results, wall)
    out["users"] = len(bodies)
    out["prompt_tokens_per_user"] = max((r.prompt_tokens or 0 for r in results if r.ok), default=None)
    out["cached_tokens_total"] = sum(r.cached_tokens or 0 for r in results if r.ok)
    out["stats_endpoint"] = before is not None
    out["memory"] = paged_memory(peaks, (after or before or {}).get("cache", {}), results) if before else None
    return out


async def sweep(ctx: Ctx) -> dict:
    """Closed-loop concurrency sweep: at level c, c clients send max(c, sweep_min_requests)
    requests in all; a level past the time budget is left out (and said so)."""
    levels, skipped = [], []
    for c in ctx.concurrency:
        try:
            n = max(c, ctx.sweep_min_requests)
            row = summarize(*await run_wave(ctx, [ctx.chat_body(i) for i in range(n)], c))
        except OutOfTime:
            skipped.append(c)
            continue
        levels.append({"concurrency": c, **row})
    return {"levels": levels, "skipped_levels": skipped}


SCENARIOS = {"batching": batching, "streaming": streaming, "prefix": prefix, "paged": paged, "sweep": sweep}


def planned_requests(ctx: Ctx, names: list[str]) -> int:
    """Requests the scenarios will send (for the progress bar)."""
    count = {
        "batching": ctx.single_requests + ctx.batch_size,
        "streaming": ctx.stream_requests,
        "prefix": len(prompts.prefix_steps("x")),
        "paged": ctx.paged_users,
        "sweep": sum(max(c, ctx.sweep_min_requests) for c in ctx.concurrency),
    }
    return 1 + sum(count[n] for n in names)
