"""Ray Serve's own floor for a burst (issue 36): how long `serve run`'s path takes to deliver N
concurrent streamed requests to one replica, and their first chunk back, when the replica does
nothing else. Through `serve run` a 64-client burst reaches our model replica over ~100 ms and
its handle hop is 42-46 ms p50 at 64 clients (6 at 5): is that Ray's per-request cost in one
replica process, or ours?

    python -m benchmarks.lab.serve_floor --clients 1 5 16 64 --waves 4 --ingress-replicas 4

The same shape as our app, with no model: an ingress deployment (`--ingress-replicas`, Ray's HTTP
proxy in front) that streams what it gets from a handle to one `Sink` replica, whose generator
notes when each request arrived (time.time()) and yields one small chunk. Per client count: the
sink's arrival spread per wave (last minus first, ms), the client's time to that chunk (p50 / p99),
and the handle hop (ingress call to sink arrival, ms p50 / p99). `--gather`: the ingress sends its
requests as the router does by default (deployments.gather: those that come while its last call
is on its way go together, in one call). Starts its own Ray (a local cluster in this process):
run it where no other Ray runs. `--port` keeps it off 8000.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from ..metrics import percentile
from ..report import emit, md_table


def build_app(ingress_replicas: int, gather: bool = False):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import StreamingResponse

    @serve.deployment(max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    class Sink:
        def __init__(self):
            self.arrived: list[tuple[str, float]] = []
            self.running: dict[str, dict] = {}  # generate_many's calls (deployments.gather)

        async def generate(self, key: str, sent: float):
            self.arrived.append((key, time.time(), sent))
            yield {"key": key, "text": "x"}

        async def generate_many(self, call_id: str, requests: list[tuple[str, float]]):
            from deployments.gather import serve_gathered

            running = self.running[call_id] = {}
            try:
                async for items in serve_gathered(lambda r: self.generate(*r), requests, running, repr):
                    yield items
            finally:
                self.running.pop(call_id, None)

        async def cancel_gathered(self, call_id: str, indices: list[int]) -> None:
            for i in indices:
                task = self.running.get(call_id, {}).get(i)
                if task is not None:
                    task.cancel()

        def take(self) -> list[tuple[str, float, float]]:
            out, self.arrived = self.arrived, []
            return out

    @serve.deployment(num_replicas=ingress_replicas, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
    class Ingress:
        def __init__(self, sink):
            self.sink = sink.options(stream=True, method_name="generate")
            self.gathered = None
            if gather:
                from deployments.gather import Gatherer

                self.gathered = Gatherer(sink)

        async def __call__(self, request: Request):
            key = request.query_params["key"]

            async def body():
                if self.gathered is not None:
                    async for item in self.gathered.open((key, time.time())):
                        yield f"{item['text']}\n"
                    return
                async for item in self.sink.remote(key, time.time()):
                    yield f"{item['text']}\n"

            return StreamingResponse(body(), media_type="text/plain")

    return Ingress.bind(Sink.bind())


async def wave(client, url: str, n: int, tag: str) -> list[float]:
    async def one(i: int) -> float:
        start = time.perf_counter()
        async with client.stream("GET", url, params={"key": f"{tag}-{i}"}) as resp:
            resp.raise_for_status()
            async for _ in resp.aiter_bytes():
                return time.perf_counter() - start
        return time.perf_counter() - start

    return await asyncio.gather(*(one(i) for i in range(n)))


async def measure(args) -> dict:
    import httpx
    import ray
    from ray import serve

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(args.ingress_replicas, args.gather), name="floor", route_prefix="/")
    sink = serve.get_deployment_handle("Sink", app_name="floor")
    url = f"http://127.0.0.1:{args.port}/"
    levels = {}
    try:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1000)) as client:
            await wave(client, url, 4, "warm")
            await sink.take.remote()
            for n in args.clients:
                ttfts, spreads, hops = [], [], []
                for w in range(args.waves):
                    ttfts += await wave(client, url, n, f"{n}-{w}")
                    arrived = await sink.take.remote()
                    times = [t for _, t, _ in arrived]
                    spreads.append(1000 * (max(times) - min(times)))
                    hops += [1000 * (t - sent) for _, t, sent in arrived]
                levels[n] = {
                    "ttft_ms_p50_p99": [round(1000 * percentile(ttfts, 50), 1), round(1000 * percentile(ttfts, 99), 1)],
                    "sink_spread_ms_waves": [round(s, 1) for s in spreads],
                    "sink_spread_ms_median": round(statistics.median(spreads), 1),
                    "handle_hop_ms_p50_p99": [round(percentile(hops, 50), 1), round(percentile(hops, 99), 1)],
                }
                print(n, levels[n], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    doc = {
        "clients": args.clients,
        "waves": args.waves,
        "ingress_replicas": args.ingress_replicas,
        "gather": args.gather,
    }
    return {**doc, "levels": levels}


def table(doc: dict) -> str:
    rows = [
        [
            n,
            f"{v['ttft_ms_p50_p99'][0]} / {v['ttft_ms_p50_p99'][1]}",
            v["sink_spread_ms_median"],
            f"{v['handle_hop_ms_p50_p99'][0]} / {v['handle_hop_ms_p50_p99'][1]}",
        ]
        for n, v in doc["levels"].items()
    ]
    return md_table(
        ["clients", "first chunk ms p50 / p99", "arrival spread at the sink ms", "handle hop ms p50 / p99"], rows
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 5, 16, 64])
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--ingress-replicas", type=int, default=4)
    p.add_argument("--cpus", type=int, default=None, help="Ray's CPU count (default: the machine's)")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument(
        "--gather", action="store_true", help="the ingress gathers its requests into calls as the router does"
    )
    p.add_argument("--out", help="write the JSON here too")
    args = p.parse_args(argv)
    doc = asyncio.run(measure(args))
    emit(doc, table(doc), args.out)


if __name__ == "__main__":
    main()
