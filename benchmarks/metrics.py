"""Pure statistics over request results: percentiles, wave summaries, error counts."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    """One HTTP request as the client saw it. Times are seconds from the request's start."""

    ok: bool = False
    error: str | None = None
    status: int | None = None
    ttft: float | None = None  # first content chunk
    latency: float | None = None  # last byte
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    completion_tokens: int = 0
    tokens_from_usage: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    text: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("chunk_times")
        d["chunks"] = len(self.chunk_times)
        return d


def percentile(values, q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of `values`; None for no values."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    rank = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(rank), math.ceil(rank)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def itl_samples(r: RequestResult) -> list[float]:
    """Gaps between consecutive content chunks. A chunk carrying several tokens shows one gap."""
    t = r.chunk_times
    return [b - a for a, b in zip(t, t[1:])]


def tpot(r: RequestResult) -> float | None:
    """Time per output token after the first: (last chunk - first chunk) / (tokens - 1)."""
    if not r.ok or r.completion_tokens < 2 or len(r.chunk_times) < 2:
        return None
    return (r.chunk_times[-1] - r.chunk_times[0]) / (r.completion_tokens - 1)


def gen_tok_s(r: RequestResult) -> float | None:
    """Generation speed of one request, excluding the time to the first token."""
    t = tpot(r)
    return 1.0 / t if t else None


def error_counts(results: list[RequestResult]) -> dict[str, int]:
    return dict(Counter(r.error or "unknown error" for r in results if not r.ok))


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 1)


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Aggregate one wave (requests run together): throughput over the wave's wall time,
    TTFT / ITL / TPOT percentiles over the successful requests, errors by kind."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    itls = [g for r in ok for g in itl_samples(r)]
    tpots = [tpot(r) for r in ok]
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": error_counts(results),
        "completion_tokens": tokens,
        "tokens_per_request": round(tokens / len(ok), 1) if ok else None,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "wall_s": round(wall_s, 3),
        "tok_s": round(tokens / wall_s, 2) if wall_s > 0 and ok else None,
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "itl_p50_ms": _ms(percentile(itls, 50)),
        "itl_p99_ms": _ms(percentile(itls, 99)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)),
        "latency_p50_ms": _ms(percentile([r.latency for r in ok], 50)),
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a is not None and b else None
