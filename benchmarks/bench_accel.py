"""The accelerator table (issue 36): the engine alone, `serve run`, mlx_lm.server and vllm-mlx on
one card, under one client load, in one run.

    python -m benchmarks accel --out accel.json                      # on the lent GPU machine
    python -m benchmarks accel --clients 1 5 --max-tokens 16 --rounds 1 --waves 1   # a smoke run

Every target serves the same model (`--model`, default the Qwen3-0.6B-shaped 8-bit model with
random weights and bf16 scales) and gets the same load: for each client count, `--waves` waves of
that many concurrent streamed completions (a ~32-token text prompt unique to each request, so no
prefix cache helps, temperature 0, `--max-tokens` new tokens, `ignore_eos` where the target takes
it). All servers are up together (idle ones cost a 16-core host nothing that shows) and measured in
turn, `--rounds` times in a rotating order, so a slow minute of the card hits every target alike;
tok/s is the median of the rounds, TTFT percentiles are over every request. Four MLX processes share
the card's memory: on an 80 GB H100 the 64-client waves ran it out in the third round (2026-12-06),
so read errors there as memory, not as the server (`--peers` runs fewer).

The engine runs in this process (AsyncEngine with the YAML's engine options, as bench_engine and
bench_http do); `serve run` gets a one-model YAML (every setting default but the batch width and
`allow_ignore_eos`); mlx_lm.server decodes as many requests at once as our engine may; vllm-mlx
runs with `--continuous-batching` if it imports and starts here (if not, the report says why).
Per target and client count: tok/s, TTFT p50/p99, errors, tokens per request and this process's
CPU per second (is the client the bottleneck?); for `serve run` also the CPU ms per token of its
proxy, router and model replica. Then serve-run/engine and each target/best-peer ratios, and the
TTFT p50 that `serve run` adds to the engine's. Stops Ray at the start and the end (`ray stop
--force`): run it only where nothing else of Ray's runs.

`--hops` adds per-hop timestamps of every request and the engine's step log (benchmarks.accel_hops,
deployments.hop_trace); `--staggered` then adds `engine (staggered)`, the engine alone fed the
arrival offsets measured through `serve run`; `--serve-env KEY=VALUE` sets `serve run`'s
environment (Ray Serve's switches, say).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from . import accel_hops
from . import accel_servers as servers
from .accel_hops import Hops
from .client import make_client, request_body, stream_request
from .client_pool import ClientPool, Sent
from .host_cpu import HostCpu
from .metrics import RequestResult, ratio, summarize
from .report import emit, fmt, md_table, write_json

ENGINE = "engine"
SERVE = "serve run"
STAGGERED = "engine (staggered)"
PEERS = ("mlx_lm.server", "vllm-mlx")
PROMPT_WORDS = "the quick brown fox jumps over a lazy dog "


def prompt_text(tag: str, chars: int = 32) -> str:
    """A short text prompt unique to TAG: with the synthetic byte-level tokenizer, one token a byte."""
    text = f"{tag} {PROMPT_WORDS * 4}"
    return text[:chars]


# --- one request, one wave -------------------------------------------------------------------


async def engine_request(engine, prompt: str, max_tokens: int, stamp=None) -> RequestResult:
    """One request to the engine in this process; `stamp(stream, first_token_time)` after it (--hops)."""
    from engine.request import PromptInput
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    result, start, first = RequestResult(), time.perf_counter(), None
    try:
        stream = engine.submit(PromptInput(text=prompt), params)
        async for out in stream:
            if out.token_ids:
                now = time.perf_counter() - start
                result.ttft = result.ttft if result.ttft is not None else now
                first = first or out.first_token_time
                result.chunk_times.append(now)
                result.completion_tokens += len(out.token_ids)
        result.ok, result.latency = True, time.perf_counter() - start
        if stamp is not None:
            stamp(stream, first)
    except Exception as exc:  # noqa: BLE001 - counted, as the HTTP client counts its errors
        result.error = f"{type(exc).__name__}: {str(exc)[:120]}"
    return result


class Target:
    """What one row measures: the engine in this process or a server over HTTP."""

    def __init__(
        self,
        label: str,
        engine=None,
        server: servers.Server | None = None,
        hops: Hops | None = None,
        client_procs: int = 1,
    ):
        self.label, self.engine, self.server, self.hops = label, engine, server, hops
        self.client = make_client_for(server) if server else None
        # a wave's requests from several client processes (benchmarks.client_pool); 1: from this one
        self.pool = ClientPool(server.base_url, client_procs) if server and client_procs > 1 else None
        if self.client is not None and hops is not None:
            self.client.event_hooks = {"request": [accel_hops.add_header], "response": []}
        self.ignore_eos = True
        self.staggered = label == STAGGERED  # replays serve run's arrival offsets (--staggered)

    async def one(self, prompt: str, max_tokens: int, where: tuple[int, str] | None = None) -> RequestResult:
        """One request; `where` (clients, wave) stamps it for --hops."""
        key = self.hops.begin(self.label, *where) if self.hops is not None and where is not None else None
        if self.engine is not None:
            stamp = (lambda stream, first: self.hops.engine_stream(key, stream, first)) if key else None
            result = await engine_request(self.engine, prompt, max_tokens, stamp)
        else:
            body = request_body(
                self.server.model, prompt=prompt, max_tokens=max_tokens, ignore_eos=self.ignore_eos, stream=True
            )
            result = await stream_request(self.client, "/v1/completions", body)
        if key is not None:
            self.hops.first(key, result.ttft)
        return result

    async def probe(self) -> None:
        """Send ignore_eos only where the server takes it (mlx_lm.server has no such field)."""
        if self.server is None:
            return
        r = await self.one("probe", 2)
        if not r.ok and r.status in (400, 422):
            self.ignore_eos = False


def make_client_for(server: servers.Server):
    from .client import Target as ClientTarget

    return make_client(ClientTarget(server.label, server.base_url, []), timeout_s=600, max_connections=256)


async def wave(
    target: Target, n: int, max_tokens: int, tag: str, index: int = 0
) -> tuple[list[RequestResult], float, float]:
    """N requests at once (the staggered engine: at serve run's offsets, its `index`-th such wave);
    (results, wall seconds, this process's CPU seconds)."""
    if target.pool is not None:
        return await pool_wave(target, n, max_tokens, tag)
    offsets = target.hops.replay(n, index) if target.staggered else None
    offsets = offsets or [0.0] * n

    async def one(i: int) -> RequestResult:
        if offsets[i]:
            await asyncio.sleep(offsets[i])
        return await target.one(prompt_text(f"{tag}c{i}"), max_tokens, (n, tag))

    cpu0, start, began = time.process_time(), time.perf_counter(), time.time()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    if target.hops is not None:
        target.hops.wave_done(target.label, n, tag, began, target.engine)
    return list(results), time.perf_counter() - start, time.process_time() - cpu0


async def pool_wave(target: Target, n: int, max_tokens: int, tag: str) -> tuple[list[RequestResult], float, float]:
    """`wave` from the target's client processes, all starting at one instant."""
    hops, requests = target.hops, []
    for i in range(n):
        key = hops.begin(target.label, n, tag) if hops is not None else None
        body = request_body(
            target.server.model, prompt=prompt_text(f"{tag}c{i}"), max_tokens=max_tokens, ignore_eos=target.ignore_eos
        )
        requests.append(Sent("/v1/completions", body, key))
    began = time.time()
    done = await target.pool.wave(requests)
    if hops is not None:
        for request, result, sent in zip(requests, done.results, done.sent):
            hops.stamps[request.key]["sent"] = sent
            hops.first(request.key, result.ttft)
        hops.wave_done(target.label, n, tag, began)
    return done.results, done.seconds, done.cpu_seconds


# --- the run ---------------------------------------------------------------------------------


class Run:
    """Every target's results, per client count and round."""

    def __init__(self, args, targets: list[Target]):
        self.args, self.targets = args, targets
        self.results: dict[tuple[str, int], list[RequestResult]] = {}
        self.rates: dict[tuple[str, int], list[float]] = {}
        self.client_cpu: dict[tuple[str, int], list[float]] = {}
        self.serve_cpu: dict[int, list[dict]] = {}
        self.spans: dict[tuple[str, int], list[tuple[float, float]]] = {}  # wall times of each level
        self.host: HostCpu | None = None
        self.deadline = time.monotonic() + args.budget_s  # no level starts after it
        self.skipped: list[str] = []

    async def level(self, target: Target, n: int, rnd: int) -> None:
        results, wall, cpu = [], 0.0, 0.0
        procs = serve_procs(target)
        before, began = cpu_seconds(procs), time.time()
        for w in range(self.args.waves):
            res, secs, used = await wave(target, n, self.args.max_tokens, f"r{rnd}w{w}", rnd * self.args.waves + w)
            results, wall, cpu = results + res, wall + secs, cpu + used
        key = (target.label, n)
        self.spans.setdefault(key, []).append((began, time.time()))
        tokens = sum(r.completion_tokens for r in results if r.ok)
        self.results.setdefault(key, []).extend(results)
        self.rates.setdefault(key, []).append(round(tokens / wall, 2))
        self.client_cpu.setdefault(key, []).append(round(cpu / wall, 2))
        if procs:
            after = cpu_seconds(procs)
            per_token = {r: round(1000 * (after[r] - before[r]) / max(1, tokens), 3) for r in after}
            self.serve_cpu.setdefault(n, []).append(per_token)

    async def round(self, rnd: int) -> None:
        k = rnd % len(self.targets)
        for target in self.targets[k:] + self.targets[:k]:  # rotate: no target always first
            for n in self.args.clients:
                if time.monotonic() > self.deadline:
                    self.skipped.append(f"round {rnd + 1}: {target.label} at {n}")
                    continue
                await self.level(target, n, rnd)
            say(
                f"round {rnd + 1}: {target.label}: "
                + ", ".join(f"{n}: {self.rates[(target.label, n)][-1]}" for n in self.args.clients)
            )

    async def warm_up(self) -> None:
        """Every shape of the run once per target (compiled traces, kernels, connections)."""
        for target in self.targets:
            await target.probe()
            t0 = time.monotonic()
            for n in self.args.clients:
                await wave(target, n, self.args.max_tokens, f"warm{n}")
            say(f"warm: {target.label} in {time.monotonic() - t0:.1f} s (ignore_eos {target.ignore_eos})")

    def rows(self) -> list[dict]:
        out = []
        for target in self.targets:
            for n in self.args.clients:
                key = (target.label, n)
                s = summarize(self.results.get(key, []), 1.0)
                rates = self.rates.get(key, [])
                out.append(
                    {
                        "target": target.label,
                        "clients": n,
                        "tok_s": statistics.median(rates) if rates else None,
                        "tok_s_rounds": rates,
                        "ttft_p50_ms": s["ttft_p50_ms"],
                        "ttft_p99_ms": s["ttft_p99_ms"],
                        "itl_p50_ms": s["itl_p50_ms"],
                        "tpot_p50_ms": s["tpot_p50_ms"],  # decode speed apart from the late start
                        "latency_p50_ms": s["latency_p50_ms"],
                        "requests": s["requests"],
                        "errors": s["errors"],
                        "error_kinds": s["error_kinds"],
                        "tokens_per_request": s["tokens_per_request"],
                        "client_cpu_per_s": self.client_cpu.get(key),
                    }
                )
        return out


def serve_procs(target: Target) -> dict:
    if target.label != SERVE:
        return {}
    from .bench_http import serve_processes

    return serve_processes(f"model-{servers.MODEL_NAME}")


def cpu_seconds(procs: dict) -> dict:
    from .bench_http import cpu_seconds as cpu

    return cpu(procs) if procs else {}


def say(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, file=sys.stderr, flush=True)


# --- comparisons and the table ---------------------------------------------------------------


def compare(rows: list[dict], clients: list[int]) -> dict:
    """Per client count: serve-run/engine tok/s, the TTFT p50 serve run adds, and each target's
    tok/s over the best peer's (and whether serve run beat both peers on tok/s and TTFT p50)."""
    by = {(r["target"], r["clients"]): r for r in rows}
    out = {}
    for n in clients:
        eng, srv = by.get((ENGINE, n)), by.get((SERVE, n))
        peers = [by[(p, n)] for p in PEERS if (p, n) in by and by[(p, n)]["tok_s"]]
        best = max(peers, key=lambda r: r["tok_s"]) if peers else None
        c = {
            "serve_over_engine": ratio(srv and srv["tok_s"], eng and eng["tok_s"], 3),
            "serve_added_ttft_p50_ms": _minus(srv and srv["ttft_p50_ms"], eng and eng["ttft_p50_ms"]),
            "best_peer": best["target"] if best else None,
            "serve_over_best_peer": ratio(srv and srv["tok_s"], best and best["tok_s"], 3),
        }
        if srv and peers:
            c["serve_ahead_of_every_peer"] = all(
                srv["tok_s"] > p["tok_s"] and (srv["ttft_p50_ms"] or 1e9) <= (p["ttft_p50_ms"] or 1e9) for p in peers
            )
        out[str(n)] = c
    return out


def _minus(a, b):
    return round(a - b, 1) if a is not None and b is not None else None


def goals(comparison: dict) -> dict:
    """Issue 36's goals, met or not, per client count."""
    out = {}
    for n, c in comparison.items():
        out[n] = {
            "serve_ge_95pct_engine": None if c["serve_over_engine"] is None else c["serve_over_engine"] >= 0.95,
            "added_ttft_p50_le_15ms": None
            if c["serve_added_ttft_p50_ms"] is None
            else c["serve_added_ttft_p50_ms"] <= 15.0,
            "ahead_of_both_peers": c.get("serve_ahead_of_every_peer"),
        }
    return out


def table(doc: dict) -> str:
    header = ["clients", "target", "tok/s (rounds)", "TTFT p50 ms", "TTFT p99 ms", "errors", "tok/req"]
    lines = []
    for r in doc["rows"]:
        rounds = "/".join(fmt(x) for x in r["tok_s_rounds"])
        lines.append(
            [
                r["clients"],
                r["target"],
                f"{fmt(r['tok_s'])} ({rounds})",
                r["ttft_p50_ms"],
                r["ttft_p99_ms"],
                r["errors"],
                r["tokens_per_request"],
            ]
        )
    lines.sort(key=lambda row: row[0])
    out = md_table(header, lines)
    cmp_rows = [
        [n, c["serve_over_engine"], c["serve_added_ttft_p50_ms"], c["best_peer"] or "n/a", c["serve_over_best_peer"]]
        for n, c in doc["compare"].items()
    ]
    out += "\n\n" + md_table(
        ["clients", "serve run / engine", "added TTFT p50 ms", "best peer", "serve run / best peer"], cmp_rows
    )
    if doc.get("hops"):
        out += "\n\nPer hop, ms p50 (p99); the engine's admission of a wave: spread, steps; new traces:\n\n"
        out += accel_hops.table(doc["hops"])
    if doc.get("host_cpu"):
        out += "\n\nThe host's busy vCPUs while each target served (benchmarks.host_cpu, 100 ms samples):\n\n"
        out += md_table(
            ["target @ clients", "busy vCPUs mean / p90", "vCPUs > half busy p50 / max"],
            [
                [
                    k,
                    f"{v['busy_cpus_mean']} / {v['busy_cpus_p90']}",
                    f"{v['cpus_over_half_p50']} / {v['cpus_over_half_max']}",
                ]
                for k, v in doc["host_cpu"].items()
                if v
            ],
        )
    failed = {label: s["error"] for label, s in doc["servers"].items() if s.get("error")}
    for label, why in failed.items():
        out += f"\n\n{label} did not serve: {why[:600]}"
    return out


# --- the whole run ---------------------------------------------------------------------------


def launch_all(args, source: str, config: Path, workdir: Path, env: dict) -> dict[str, servers.Server]:
    """Every server started at once (each loads while the others do); waited for later. `env`:
    extra environment of `serve run` (its Ray processes inherit it)."""
    width = max(args.clients)
    launched = {SERVE: servers.launch_serve(config, workdir, env)}
    if "mlx_lm.server" in args.peers:
        launched["mlx_lm.server"] = servers.launch_mlx_lm_server(source, 8081, width, workdir)
    if "vllm-mlx" in args.peers:
        launched["vllm-mlx"] = servers.launch_vllm_mlx(source, 8082, width, workdir)
    return launched


def server_report(launched: dict[str, servers.Server]) -> dict:
    out = {}
    for label, s in launched.items():
        out[label] = {"ready_s": s.ready_s, "error": s.error, **s.info}
        if s.error is None:
            out[label]["log_tail"] = s.log_tail(800)
    return out


async def profile_serve(args, target: Target, outdir: Path) -> dict:
    """py-spy on serve run's proxy, router and replica while waves of --profile-clients repeat."""
    from . import accel_profile

    procs = serve_procs(target)
    running = accel_profile.start(procs, args.profile_s, outdir, gil=args.profile_gil)
    if not running:
        return {"error": "py-spy not found" if procs else "serve processes not found"}
    deadline, waves, results = time.perf_counter() + args.profile_s, 0, []
    while time.perf_counter() < deadline:
        res, _, _ = await wave(target, args.profile_clients, args.max_tokens, f"prof{waves}")
        results, waves = results + res, waves + 1
    summary = summarize(results, 1.0)
    return {
        "clients": args.profile_clients,
        "seconds": args.profile_s,
        "gil_only": args.profile_gil,
        "waves": waves,
        "ttft_p50_ms": summary["ttft_p50_ms"],
        "errors": summary["errors"],
        "processes": accel_profile.finish(running, outdir),
    }


def machine_info() -> dict:
    import subprocess

    from .report import machine, mlx_machine

    info = {**mlx_machine(), "packages": machine()["packages"], "cpus": machine()["cpus"]}
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        info["gpu"] = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    return info


def finish_doc(doc: dict, run: Run) -> None:
    doc["rows"] = run.rows()
    doc["compare"] = compare(doc["rows"], run.args.clients)
    doc["goals"] = goals(doc["compare"])
    doc["serve_cpu_ms_per_token"] = {str(n): v for n, v in run.serve_cpu.items()}
    doc["skipped_for_time"] = run.skipped
    if run.host is not None:  # the host's busy CPUs while each target served each client count
        doc["host_cpu"] = {f"{label} @ {n}": run.host.over(spans) for (label, n), spans in run.spans.items()}
    hops = next((t.hops for t in run.targets if t.hops is not None), None)
    if hops is not None:  # after each round too: a run cut short keeps what it measured
        doc["hops"] = hops.summary([t.label for t in run.targets], run.args.clients)


async def measure(args, doc: dict, targets: list[Target], workdir: Path | None = None) -> Run:
    """Warm-up, then the rounds while the time budget lasts; the JSON saved after each round. With
    `workdir`, the host's busy CPUs are sampled there (benchmarks.host_cpu)."""
    run = Run(args, targets)
    run.host = HostCpu.start(workdir / "host_cpu.jsonl") if workdir is not None else None
    try:
        await run_rounds(args, doc, run)
    finally:
        if run.host is not None:
            run.host.stop()
    return run


async def run_rounds(args, doc: dict, run: Run) -> None:
    await run.warm_up()
    last = 0.0
    for rnd in range(args.rounds):
        if rnd and time.monotonic() + last > run.deadline:
            say(f"time budget spent: {rnd} of {args.rounds} rounds")
            break
        t0 = time.monotonic()
        await run.round(rnd)
        last = time.monotonic() - t0
        doc["rounds_done"] = rnd + 1
        finish_doc(doc, run)
        if args.out:
            write_json(doc, args.out)


async def main_async(args) -> dict:
    from deployments import hop_trace
    from deployments.config import check_serve_config
    from engine.engine import AsyncEngine
    from engine.loading.loader import default_cache_dir
    from engine.loading.synthetic import local_source
    from engine.memory import apply_process_limits
    from engine.threads import share_gil_with_engine

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="accel-"))
    workdir.mkdir(parents=True, exist_ok=True)
    source = local_source(args.model, default_cache_dir())  # the peers load a directory: the same one
    config = servers.write_yaml(source, max(args.clients), workdir, args.router_replicas, not args.no_gather)
    engine_config = check_serve_config(str(config))[0].models[0].engine
    doc = {"machine": machine_info(), "model": args.model, "source": source, "clients": args.clients}
    doc.update({"max_tokens": args.max_tokens, "waves": args.waves, "rounds": args.rounds})
    doc["client_procs"] = args.client_procs
    doc["engine_config"] = engine_config.model_dump(mode="json", exclude_defaults=True)
    env = dict(kv.split("=", 1) for kv in args.serve_env)
    hops = Hops(workdir) if args.hops else None
    if hops is not None:
        env[hop_trace.ENV] = str(hops.folder)
    doc["serve_env"] = env
    launched = launch_all(args, source, config, workdir, env)
    engine = AsyncEngine.from_source(source, engine_config)
    apply_process_limits(engine.footprint.total)  # capped as a model replica caps itself (GovernedReplica)
    doc["engine_gil_switch_interval_s"] = share_gil_with_engine()  # as ModelServer sets it
    if hops is not None:
        engine.step_log = collections.deque(maxlen=100_000)
    targets: list[Target] = []
    try:
        for s in launched.values():
            servers.wait_ready(s, args.start_timeout_s)
            say(f"{s.label}: " + (f"ready in {s.ready_s} s" if s.error is None else f"FAILED: {s.error[:300]}"))
        doc["servers"] = server_report(launched)
        targets += [Target(ENGINE, engine=engine, hops=hops)]
        targets += [
            Target(label, server=s, hops=hops, client_procs=args.client_procs)
            for label, s in launched.items()
            if s.proc is not None
        ]
        if args.staggered and hops is not None:
            targets.insert(2, Target(STAGGERED, engine=engine, hops=hops))  # after serve run: its offsets first
        await measure(args, doc, targets, workdir)
        serve = next((t for t in targets if t.label == SERVE), None)
        if args.profile_s and serve is not None:
            doc["profile"] = await profile_serve(args, serve, workdir / "profile")
    finally:
        for target in targets:
            if target.pool is not None:
                target.pool.close()
        for s in launched.values():
            servers.stop(s)
        engine.shutdown()
    doc["servers"] = server_report(launched)
    if hops is not None:
        doc["hops"] = hops.summary([t.label for t in targets], args.clients)
    return doc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="synthetic:qwen3-0.6b-8bit", help="a model source or synthetic:SHAPE")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 5, 16, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=3, help="waves per client count and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every target, in rotating order")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, help="peer servers to run")
    p.add_argument("--budget-s", type=float, default=400, help="start no round that would end after this")
    p.add_argument("--start-timeout-s", type=float, default=300, help="wait this long for each server")
    p.add_argument("--profile-s", type=float, default=0, help="then py-spy serve run's processes this long")
    p.add_argument("--profile-clients", type=int, default=16, help="clients of the profiled waves")
    p.add_argument("--profile-gil", action="store_true", help="profile only threads holding the GIL (py-spy --gil)")
    p.add_argument("--workdir", help="YAML, server logs and profiles (default: a temporary folder)")
    p.add_argument("--out", help="write the JSON here (also after each round)")
    p.add_argument("--hops", action="store_true", help="per-hop timestamps of every request (deployments.hop_trace)")
    p.add_argument(
        "--staggered", action="store_true", help="with --hops: also the engine fed serve run's measured arrival offsets"
    )
    p.add_argument("--router-replicas", type=int, default=1, help="serve run's router replicas")
    p.add_argument("--no-gather", action="store_true", help="serve run's router sends each request in its own call")
    p.add_argument(
        "--client-procs",
        type=int,
        default=min(8, max(1, (os.cpu_count() or 2) // 2)),
        help="processes sending the HTTP waves (benchmarks.client_pool); 1: this process",
    )
    p.add_argument(
        "--serve-env", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="environment of `serve run`"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    doc = runner(main_async(args))
    emit(doc, table(doc), args.out)


if __name__ == "__main__":
    main()
