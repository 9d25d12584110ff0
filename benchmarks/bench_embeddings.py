"""Embeddings per second of the bundled all-MiniLM-L6-v2, four ways on the same CPU in one run.

    python -m benchmarks embeddings [--seconds 10] [--clients 1 16 64] [--sizes short long]

- `http-batched`: `serve run` with the model behind @serve.batch (`embedding.max_batch_size`,
  --max-batch-size), POST /v1/embeddings as OpenAI's SDK sends it (base64), one input a request;
- `http-unbatched`: the same server's second copy of the model with max_batch_size 1: each request
  is its own engine call (the question of issue 34: does @serve.batch pay?);
- `engine`: EmbeddingEngine in this process, the clients' inputs as one call (what merging them
  at best gives, without HTTP or Ray);
- `sentence-transformers`: `model.encode` on the same batches, in the venv given by --st-python
  (a subprocess running benchmarks/st_embeddings_worker.py; skipped, with a message, without it).

Inputs are short (~10 tokens) or long (~200 tokens), different in every request. Each cell runs
--seconds after a warm-up; one serve run hosts both HTTP copies, measured one at a time. Every
engine uses --threads CPU threads (OpenBLAS for MLX, torch's intra-op threads). Prints a JSON
document and a table; the figures only mean something on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from deployments import launch

from .client import BASE
from .metrics import percentile, ratio
from .report import emit, machine, md_table

SOURCE = "all-minilm-l6-v2"
COPIES = {"http-batched": "minilm-batched", "http-unbatched": "minilm-unbatched"}
MODES = ("http", "engine", "st")
WORKER = Path(__file__).with_name("st_embeddings_worker.py")
SENTENCES = (
    "A man is eating food in the park",
    "The girl is carrying a small baby",
    "Two men pushed their carts through the woods",
    "A woman is playing the violin on stage",
    "The new movie is awesome and everyone loved it",
    "A cheetah is running behind its prey",
)


def make_texts(size: str, n: int) -> list[str]:
    """n different inputs: short ones of about 10 tokens, long ones of about 200."""
    if size == "short":
        return [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(n)]
    words = " ".join(f"{s}, and then" for s in SENTENCES).split()
    return [f"Story {i}: " + " ".join(words[(i + k) % len(words)] for k in range(170)) + "." for i in range(n)]


def texts_by_size(sizes: list[str], clients: list[int]) -> dict[str, list[str]]:
    return {size: make_texts(size, max(256, 4 * max(clients))) for size in sizes}


def cell_stats(done: int, wall: float, latencies: list[float], errors: int) -> dict:
    return {
        "embeddings_per_s": done / wall if wall > 0 else None,
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "requests": len(latencies),
        "errors": errors,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --- over HTTP ----------------------------------------------------------------------------------


async def http_cell(model: str, texts: list[str], clients: int, seconds: float) -> dict:
    """`clients` clients, each sending one input a request in a loop for `seconds`."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=BASE, limits=limits, timeout=300) as http:

        async def post(text: str) -> bool:
            r = await http.post("/v1/embeddings", json={"model": model, "input": text, "encoding_format": "base64"})
            return r.status_code == 200

        await post(texts[0])  # warm-up
        latencies: list[float] = []
        errors = 0
        end = time.monotonic() + seconds

        async def client(k: int) -> None:
            nonlocal errors
            i = k
            while time.monotonic() < end:
                t = time.monotonic()
                if await post(texts[i % len(texts)]):
                    latencies.append(time.monotonic() - t)
                else:
                    errors += 1
                i += clients

        start = time.monotonic()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return cell_stats(len(latencies), time.monotonic() - start, latencies, errors)


def serve_config(max_batch_size: int, threads: int) -> dict:
    """One app, the model twice: with @serve.batch and without (max_batch_size 1), both pinned."""

    def copy(name: str, batch: int) -> dict:
        return {
            "name": name,
            "kind": "embedding",
            "source": SOURCE,
            "load": "eager",
            "keep_alive": "forever",
            "embedding": {"max_batch_size": batch},
            "deployment": {"num_cpus": 0, "env_vars": {"OPENBLAS_NUM_THREADS": str(threads)}},
        }

    app = {
        "name": "orchard",
        "route_prefix": "/",
        "import_path": "deployments.app:build_app",
        "autoscaling_policy": {"policy_function": "deployments.governor:governor_policy"},
        "args": {
            "models": [copy(COPIES["http-batched"], max_batch_size), copy(COPIES["http-unbatched"], 1)],
            "router": {"max_ongoing_requests": 1024},
        },
    }
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "logging_config": {"encoding": "TEXT", "log_level": "WARNING", "enable_access_log": False},
        "applications": [app],
    }


def run_http(args, texts: dict[str, list[str]]) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "embeddings.yaml"
        config.write_text(yaml.safe_dump(serve_config(args.max_batch_size, args.threads), sort_keys=False))
        launch.ray_stop()
        proc = launch.start(config)
        try:
            ready_s = launch.wait_healthy(proc, 300)
            print(f"serve run healthy after {ready_s:.0f} s", flush=True)
            cells = []
            for mode, model in COPIES.items():
                for size, inputs in texts.items():
                    for clients in args.clients:
                        stats = asyncio.run(http_cell(model, inputs, clients, args.seconds))
                        cells.append({"mode": mode, "size": size, "clients": clients, **stats})
                        print(f"{mode} {size} x{clients}: {stats['embeddings_per_s']:.1f}/s", flush=True)
            return cells
        finally:
            launch.stop(proc)


# --- in-process and sentence-transformers -------------------------------------------------------


def run_engine(args, texts: dict[str, list[str]]) -> list[dict]:
    """The engine alone: `clients` inputs as one call, in a loop for --seconds."""
    from threadpoolctl import threadpool_limits

    from engine.embed.engine import EmbeddingEngine, load_embedding_model
    from engine.loading.embedding_source import embedding_model_dir
    from engine.loading.loader import default_cache_dir

    model, tokenizer, info = load_embedding_model(embedding_model_dir(SOURCE, default_cache_dir()))
    engine = EmbeddingEngine(model, tokenizer, info, max_batch_size=max(args.clients), adaptive_cpu_threads=False)
    cells = []
    with threadpool_limits(args.threads, user_api="blas"):
        for size, inputs in texts.items():
            for clients in args.clients:
                engine.embed(inputs[:clients])  # warm-up
                latencies, i, start = [], 0, time.monotonic()
                while time.monotonic() - start < args.seconds:
                    t = time.monotonic()
                    engine.embed([inputs[(i + k) % len(inputs)] for k in range(clients)])
                    latencies.append(time.monotonic() - t)
                    i += clients
                wall = time.monotonic() - start
                stats = cell_stats(len(latencies) * clients, wall, latencies, 0)
                cells.append({"mode": "engine", "size": size, "clients": clients, **stats})
    return cells


def run_st(args, texts: dict[str, list[str]]) -> tuple[list[dict], dict]:
    """sentence-transformers in its own venv on the same batches; ([], why) when it cannot run."""
    if not Path(args.st_python).exists():
        return [], {"skipped": f"{args.st_python} not found: give --st-python (a venv with sentence-transformers)"}
    from engine.loading.embedding_source import embedding_model_dir
    from engine.loading.loader import default_cache_dir

    model_dir = embedding_model_dir(SOURCE, default_cache_dir())
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(texts, f)
        f.flush()
        cmd = [args.st_python, str(WORKER), "--model", str(model_dir), "--texts", f.name, "--seconds"]
        cmd += [str(args.seconds), "--threads", str(args.threads), "--batches", *map(str, args.clients)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return [], {"skipped": f"the sentence-transformers worker failed: {done.stderr.strip()[-500:]}"}
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    cells = [
        {"mode": "sentence-transformers", "size": c["size"], "clients": c["batch"], **_st_stats(c)}
        for c in doc.pop("cells")
    ]
    return cells, doc


def _st_stats(c: dict) -> dict:
    return {"embeddings_per_s": c["embeddings_per_s"], "p50_ms": c["p50_call_ms"], "requests": c["calls"]}


# --- the report ---------------------------------------------------------------------------------

COLUMNS = ("http-batched", "http-unbatched", "engine", "sentence-transformers")


def table(cells: list[dict]) -> str:
    rate = {(c["mode"], c["size"], c["clients"]): c["embeddings_per_s"] for c in cells}
    keys = sorted({(c["size"], c["clients"]) for c in cells}, key=lambda k: (k[0] != "short", k[1]))
    rows = []
    for size, clients in keys:
        got = [rate.get((mode, size, clients)) for mode in COLUMNS]
        rows.append([size, clients, *got, ratio(got[0], got[1]), ratio(got[2], got[3])])
    header = ["inputs", "clients", *(f"{m} /s" for m in COLUMNS), "batched / unbatched", "engine / s-t"]
    return md_table(header, rows)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 16, 64], help="concurrent clients (batch sizes)")
    ap.add_argument("--sizes", nargs="+", choices=("short", "long"), default=["short", "long"])
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="http, engine, st")
    ap.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch's max_batch_size (http-batched)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of every engine")
    ap.add_argument("--st-python", default="/tmp/st/bin/python", help="a Python with sentence-transformers")
    ap.add_argument("--json-out")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from engine.loading.cpu_fast_path import reexec_with_openblas

    reexec_with_openblas()  # the engine in this process on the CPU fast path, as the replicas are
    texts = texts_by_size(args.sizes, args.clients)
    from engine.loading.cpu_fast_path import openblas_loaded

    doc: dict = {
        "machine": {**machine(), "openblas_preloaded": openblas_loaded()},
        "options": {k: v for k, v in vars(args).items() if k != "json_out"},
    }
    cells: list[dict] = []
    if "st" in args.modes:
        st_cells, doc["sentence_transformers"] = run_st(args, texts)
        cells += st_cells
        if not st_cells:
            print(f"sentence-transformers skipped: {doc['sentence_transformers']['skipped']}", flush=True)
    if "engine" in args.modes:
        cells += run_engine(args, texts)
    if "http" in args.modes:
        cells += run_http(args, texts)
    doc["cells"] = cells
    emit(doc, table(cells), args.json_out)
    return 0
