"""Client processes for HTTP load: a wave's requests sent from several processes at one instant.

One asyncio process with httpx spends ~1 ms of its own CPU on each request it sends, so a wave of
64 left it over ~60 ms (measured on the H100 host, 2026-12-07: the first request sent 58 ms before
the last), and every request's TTFT counted its place in that queue, a delay no user of a server
meets: 64 users are 64 clients. A `ClientPool` keeps `processes` workers (spawned, so none
inherits the parent's MLX or Ray threads), each with its own event loop and connection pool; a
wave is split among them round-robin and each starts at the same wall-clock instant. Every
request is timed in its worker as `client.stream_request` times it.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from dataclasses import dataclass

from .metrics import RequestResult

START_MARGIN_S = 0.05  # the workers' common start is this far after the parent sends the wave


@dataclass
class Sent:
    """One request of a wave: where to, what, and the hop key for its x-request-id (or None)."""

    path: str
    body: dict
    key: str | None = None


@dataclass
class WaveResult:
    results: list[RequestResult]  # in the order the requests were given
    sent: list[float]  # each request's send time (time.time())
    seconds: float  # from the common start to the last request's end
    cpu_seconds: float  # the workers' CPU over the wave


class ClientPool:
    """`processes` client processes against one base URL; `close()` ends them."""

    def __init__(self, base_url: str, processes: int, timeout_s: float = 600.0):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child, base_url, timeout_s), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    async def wave(self, requests: list[Sent]) -> WaveResult:
        start = time.time() + START_MARGIN_S
        shares = [list(range(i, len(requests), len(self.conns))) for i in range(len(self.conns))]
        busy = [(conn, share) for conn, share in zip(self.conns, shares) if share]
        for conn, share in busy:
            conn.send(([requests[i] for i in share], start))
        replies = await asyncio.gather(*(asyncio.to_thread(conn.recv) for conn, _ in busy))
        results: list[RequestResult | None] = [None] * len(requests)
        sent = [0.0] * len(requests)
        end, cpu = start, 0.0
        for (_, share), (items, worker_end, worker_cpu) in zip(busy, replies):
            for i, (result, at) in zip(share, items):
                results[i], sent[i] = result, at
            end, cpu = max(end, worker_end), cpu + worker_cpu
        return WaveResult(results, sent, end - start, cpu)

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def _worker(conn, base_url: str, timeout_s: float) -> None:
    try:
        import uvloop

        uvloop.run(_serve(conn, base_url, timeout_s))
    except ImportError:
        asyncio.run(_serve(conn, base_url, timeout_s))


async def _serve(conn, base_url: str, timeout_s: float) -> None:
    from .client import Target, make_client

    client = make_client(Target("pool", base_url, []), timeout_s=timeout_s, max_connections=256)
    async with client:
        while True:
            job = await asyncio.to_thread(conn.recv)
            if job is None:
                return
            requests, start = job
            await asyncio.sleep(max(0.0, start - time.time()))
            cpu = time.process_time()
            items = await asyncio.gather(*(_one(client, r) for r in requests))
            conn.send((items, time.time(), time.process_time() - cpu))


async def _one(client, request: Sent) -> tuple[RequestResult, float]:
    from .accel_hops import HEADER
    from .client import stream_request

    headers = {HEADER: request.key} if request.key else None
    sent = time.time()
    return await stream_request(client, request.path, request.body, headers=headers), sent
